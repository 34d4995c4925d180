"""Memory at the floor: the compiled step's `memory_analysis()`, pinned.

A parameter-dominated MLP (1.7M parameters, batch 8) is trained by one jitted
step with params and optimizer state donated; its footprint is arguments +
outputs + temporaries - aliased bytes, in copies of the parameters. The
floors (measured on XLA:CPU, see benchmarks/RESULTS.md for the sizes):

- `optax.contrib.sam` holds the perturbed point (one copy) in the place of a
  plain step's gradient; `gx.sam(on_nonfinite="zero")` is within 0.1 copy of
  it, and `on_nonfinite="propagate"` (no check) is at it. The default
  `gx.sam` keeps `g` for the fallback: one copy more.
- `penalized_grad` and `finite_difference_gr` need `g` and `g'` at once: one
  copy over optax's SAM (F-GR's measure of its perturbed point adds 0.2).
- `every_k=5` adds its cache (one copy) and nothing else, with donation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_optax as gx

WIDTH, DEPTH, BATCH = 512, 5, 8


def _problem():
  sizes = [784] + [WIDTH] * DEPTH + [10]
  keys = jax.random.split(jax.random.key(0), len(sizes))
  params = [
    {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=False)
  ]
  x = jnp.ones((BATCH, sizes[0]))
  y = jnp.zeros(BATCH, jnp.int32)

  def loss_fn(p):
    h = x
    for layer in p[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    logits = h @ p[-1]["w"] + p[-1]["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss_fn


def copies(tx, index_grad_fn=False):
  """The donated step's footprint in parameter copies."""
  params, loss_fn = _problem()
  grad = jax.grad(loss_fn)
  grad_fn = (lambda q, i: grad(q)) if index_grad_fn else grad

  def step(p, s):
    g = grad(p)
    u, s = tx.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  compiled = (
    jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params)).compile()
  )
  m = compiled.memory_analysis()
  if m is None:
    pytest.skip("this backend reports no memory analysis")
  total = (
    m.argument_size_in_bytes
    + m.output_size_in_bytes
    + m.temp_size_in_bytes
    - m.alias_size_in_bytes
  )
  return total / sum(x.nbytes for x in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def floor():
  """`optax.contrib.sam`'s footprint (the same two gradients as gx.sam)."""
  tx = optax.contrib.sam(
    optax.sgd(0.1),
    optax.chain(optax.contrib.normalize(), optax.sgd(0.05)),
    sync_period=2,
    opaque_mode=True,
  )
  return copies(tx, index_grad_fn=True)


@pytest.mark.parametrize(
  "make, over_floor",
  [
    (lambda: gx.sam(0.05, on_nonfinite="zero"), 0.1),
    (lambda: gx.sam(0.05, on_nonfinite="propagate"), 0.05),
    (lambda: gx.sam(0.05), 1.1),
    (lambda: gx.penalized_grad(0.05, 0.8), 1.1),
    (lambda: gx.finite_difference_gr(0.1, 0.01), 1.3),
  ],
  ids=["sam-zero", "sam-propagate", "sam", "penalized_grad", "finite_difference_gr"],
)
def test_second_gradient_step_at_the_floor(floor, make, over_floor):
  extra = copies(optax.chain(make(), optax.sgd(0.1))) - floor
  assert extra <= over_floor, f"{extra:.2f} copies over optax.contrib.sam"


def test_every_k_adds_only_its_cache():
  one = copies(optax.chain(gx.sam(0.05), optax.sgd(0.1)))
  five = copies(optax.chain(gx.sam(0.05, every_k=5), optax.sgd(0.1)))
  assert 0.9 <= five - one <= 1.1, f"every_k=5 adds {five - one:.2f} copies"
