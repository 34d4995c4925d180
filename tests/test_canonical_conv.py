"""The CPU convolution rewrite used inside `every_k`'s `lax.cond`.

`canonical_conv.canonicalize_convolutions` must give the same values as the
function it rewrites for every convolution JAX emits (1-D, 2-D, grouped, with
their backward passes), and `for_xla_cpu` must fall back to the plain branch
when the rewrite fails and when its switch is off.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gnorm_optax._src import canonical_conv

# XLA's label of a canonical convolution: NHWC input, HWIO kernel, NHWC output
# (any number of spatial dimensions; XLA may add one for batch-grouped convs).
CANONICAL = re.compile(r"b(\d+)f_\1io->b\1f")


def _conv_loss(spatial: int, groups: int):
  """A two-layer conv net with `spatial` dims and a grouped second layer."""
  ones = (1,) * spatial
  specs = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}[spatial]
  keys = jax.random.split(jax.random.key(0), 3)
  size = (5,) * spatial
  x = jax.random.normal(keys[0], (3, *(8,) * spatial, 4))
  params = {
    "a": jax.random.normal(keys[1], (*size[:spatial], 4, 6)) * 0.3,
    "b": jax.random.normal(keys[2], (*size[:spatial], 6 // groups, 6)) * 0.3,
  }

  def loss(p):
    h = jax.lax.conv_general_dilated(x, p["a"], ones, "SAME", dimension_numbers=specs)
    h = jax.lax.conv_general_dilated(
      jnp.tanh(h),
      p["b"],
      ones,
      "SAME",
      dimension_numbers=specs,
      feature_group_count=groups,
    )
    return jnp.sum(jnp.tanh(h) ** 2)

  return loss, params


@pytest.mark.parametrize("spatial, groups", [(1, 1), (1, 2), (2, 3)])
def test_rewrite_keeps_values_of_1d_2d_and_grouped_convolution_gradients(
  spatial, groups
):
  loss, params = _conv_loss(spatial, groups)
  grad = jax.grad(loss)
  want = jax.jit(grad)(params)
  got = jax.jit(canonical_conv.canonicalize_convolutions(grad))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    want,
    got,
  )
  # The backward pass has non-canonical layouts; after the rewrite each
  # convolution XLA:CPU compiles is canonical, except batch-grouped ones
  # (the kernel gradient of a grouped conv), which are bound as written.
  hlo = (
    jax.jit(canonical_conv.canonicalize_convolutions(grad))
    .lower(params)
    .compile()
    .as_text()
  )
  convs = re.findall(r"convolution\(.*", hlo)
  labels = {
    re.search(r"dim_labels=([^,\s]+)", c).group(1)
    for c in convs
    if "batch_group_count" not in c
  }
  assert labels and all(CANONICAL.fullmatch(lab) for lab in labels), labels


def _branch_hlo(fn, x):
  return jax.jit(canonical_conv.for_xla_cpu(fn)).lower(x).as_text()


def test_switch_off_compiles_the_branch_as_written(monkeypatch):
  loss, params = _conv_loss(2, 1)
  grad = jax.grad(loss)
  calls = []
  real = canonical_conv._eval_jaxpr
  monkeypatch.setattr(
    canonical_conv, "_eval_jaxpr", lambda *a: calls.append(1) or real(*a)
  )
  jax.jit(canonical_conv.for_xla_cpu(grad)).lower(params)
  assert calls  # on CPU, with the switch on, the rewrite is traced
  calls.clear()
  monkeypatch.setattr(canonical_conv, "enabled", False)
  got = jax.jit(canonical_conv.for_xla_cpu(grad))(params)
  assert not calls
  jax.tree.map(np.testing.assert_array_equal, got, jax.jit(grad)(params))


def test_failed_rewrite_falls_back_to_the_plain_branch_with_a_warning(
  monkeypatch,
):
  loss, params = _conv_loss(2, 1)
  grad = jax.grad(loss)

  def broken(*args):
    raise NotImplementedError("no rule for this primitive")

  monkeypatch.setattr(canonical_conv, "_eval_jaxpr", broken)
  with pytest.warns(RuntimeWarning, match="convolution rewrite.*plain branch"):
    got = jax.jit(canonical_conv.for_xla_cpu(grad))(params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
    got,
    jax.jit(grad)(params),
  )


def test_other_backends_never_trace_the_rewrite(monkeypatch):
  loss, params = _conv_loss(1, 1)
  monkeypatch.setattr(canonical_conv.jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(
    canonical_conv,
    "_eval_jaxpr",
    lambda *a: pytest.fail("the jaxpr interpreter ran for a GPU backend"),
  )
  jax.jit(canonical_conv.for_xla_cpu(jax.grad(loss))).lower(params)
