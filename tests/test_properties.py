"""Property tests (hypothesis) over random pytrees.

Trees are nested dicts / lists / tuples of arrays of random shapes (scalars and
empty arrays included), mostly float32 with some bfloat16 leaves, some of them
all zero. The loss is a random quadratic-plus-quartic over the tree, so
`grad_fn` is a real gradient. Everything runs eagerly: every example has a new
tree structure, and compiling each would cost more than running it. Shapes are
drawn from a small pool so that the eager kernels are reused across examples.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_conformance import CASES, update_kwargs

import gnorm_optax as gx

# every_k > 1 runs its refresh through lax.cond, which compiles on every eager
# call; it is covered (jitted) by the conformance suite.
EVERY_STEP_CASES = [c for c in CASES if "every_k" not in c.id]

SHAPES = [(), (3,), (2, 3), (2, 1, 2), (0,)]

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None)


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
  with jax.numpy_rank_promotion("raise"):
    yield


# ----------------------------------------------------------------------------
# Strategies.
# ----------------------------------------------------------------------------

_leaf_specs = st.fixed_dictionaries({
    "shape": st.sampled_from(SHAPES),
    "bf16": st.sampled_from([False, False, True]),
    "zero": st.sampled_from([False, False, False, True]),
    "exponent": st.integers(-2, 2),
})


def _containers(children):
  lists = st.lists(children, min_size=1, max_size=3)
  return st.one_of(
      lists,
      lists.map(tuple),
      st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
  )


_tree_specs = st.recursive(_leaf_specs, _containers, max_leaves=6)


def _is_spec(x):
  return isinstance(x, dict) and "shape" in x and "exponent" in x


@jax.jit
def _leaf_loss(x, a, b):
  """One leaf's term of the random loss (jitted: compiled once per shape)."""
  x = x.astype(jnp.float32)
  return jnp.sum(0.5 * a * x**2 + 0.25 * b * x**4)


@st.composite
def problems(draw, allow_bf16=True):
  """`(params, loss)`: a random tree and a random quadratic+quartic loss."""
  spec = draw(_tree_specs)
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  def leaf(s):
    dtype = jnp.bfloat16 if (s["bf16"] and allow_bf16) else jnp.float32
    if s["zero"]:
      return jnp.zeros(s["shape"], dtype)
    x = rng.normal(size=s["shape"]) * 10.0 ** s["exponent"]
    return jnp.asarray(x, dtype)

  params = jax.tree.map(leaf, spec, is_leaf=_is_spec)
  coeffs = jax.tree.map(
      lambda p: (jnp.asarray(rng.uniform(0.5, 2.0, p.shape), jnp.float32),
                 jnp.asarray(rng.uniform(0.0, 0.5, p.shape), jnp.float32)),
      params,
  )

  def loss(p):
    terms = jax.tree.map(lambda x, c: _leaf_loss(x, *c), p, coeffs)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))

  return params, loss


def _run(case, params, grads, loss, steps=1):
  tx = case.make(**case.hparams)
  state = tx.init(params)
  kwargs = update_kwargs(case, loss, loss(params))
  for _ in range(steps):
    updates, state = tx.update(grads, state, params, **kwargs)
  return updates


def _leaves_f32(tree):
  return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(problems())
def test_every_transform_keeps_tree_shapes_and_dtypes(problem):
  params, loss = problem
  grads = jax.grad(loss)(params)
  for case in EVERY_STEP_CASES:
    updates = _run(case, params, grads, loss)
    assert jax.tree.structure(updates) == jax.tree.structure(params), case.id
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert u.shape == g.shape, case.id
      assert u.dtype == g.dtype, case.id


@PROPERTY_SETTINGS
@given(problems(), st.booleans())
def test_no_nan_from_finite_inputs(problem, zero_grads):
  """Finite params and gradients (some leaves, or all of them, zero) give
  finite updates, over two steps."""
  params, loss = problem
  grads = jax.grad(loss)(params)
  if zero_grads:
    grads = jax.tree.map(jnp.zeros_like, grads)
  for case in EVERY_STEP_CASES:
    for u in _leaves_f32(_run(case, params, grads, loss, steps=2)):
      assert np.all(np.isfinite(u)), case.id


@PROPERTY_SETTINGS
@given(problems(), st.booleans(), st.sampled_from(["alpha", "rho"]))
def test_penalized_grad_identities_return_gradient_exactly(problem, adaptive, zero):
  """`alpha=0` and `rho=0` give `g` back bit for bit (`grad_fn` is a real
  gradient, evaluated eagerly like `g`, so `rho=0` evaluates it at `params`)."""
  params, loss = problem
  hparams = {"rho": 0.05, "alpha": 0.8, zero: 0.0}
  tx = gx.penalized_grad(**hparams, adaptive=adaptive)
  grads = jax.grad(loss)(params)
  updates, state = tx.update(grads, tx.init(params), params,
                             grad_fn=jax.grad(loss))
  for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
    assert u.dtype == g.dtype and u.shape == g.shape
    np.testing.assert_array_equal(np.asarray(u, np.float32),
                                  np.asarray(g, np.float32))
    assert np.asarray(u).tobytes() == np.asarray(g).tobytes()  # bitwise
  assert int(state.nonfinite_count) == 0


_scales = st.tuples(
    st.sampled_from([-1.0, 1.0]),
    st.floats(1.0, 9.99),
    st.integers(-2, 2),
).map(lambda t: t[0] * t[1] * 10.0 ** t[2])


def _agr(tree):
  agr = gx.adaptive_gradient_regularization()
  return agr.update(tree, agr.init(tree))[0]


@PROPERTY_SETTINGS
@given(problems(allow_bf16=False), _scales)
def test_agr_is_scale_equivariant(problem, c):
  """`AGR(c g) == c AGR(g)` for c != 0 (float32 trees: in bfloat16 the
  rounding of `c g` would dominate)."""
  params, loss = problem
  grads = jax.grad(loss)(params)
  scaled = _agr(jax.tree.map(lambda g: c * g, grads))
  plain = _agr(grads)
  for s, p, g in zip(jax.tree.leaves(scaled), jax.tree.leaves(plain),
                     jax.tree.leaves(grads), strict=True):
    big = float(np.max(np.abs(g), initial=0.0))
    np.testing.assert_allclose(s, c * np.asarray(p), rtol=1e-5,
                               atol=1e-6 * abs(c) * big)
    # |AGR(g)| <= |g| entrywise, up to rounding.
    assert np.all(np.abs(p) <= np.abs(g) * (1 + 1e-6))


_SINGLE_ENTRY = (jnp.float32(0.1819237), jnp.array([0.0, 0.1819237, 0.0]))


@PROPERTY_SETTINGS
@given(problems(allow_bf16=False))
@example((_SINGLE_ENTRY, None))
def test_agr_keeps_sign_and_zeroes_single_entry_tensors(problem):
  """Each entry keeps its sign (the coefficient |g|/sum|g| is in [0, 1]), and
  a tensor with a single nonzero entry maps to exactly zero."""
  params, loss = problem
  grads = params if loss is None else jax.grad(loss)(params)
  for p, g in zip(jax.tree.leaves(_agr(grads)), jax.tree.leaves(grads), strict=True):
    p, g = np.asarray(p), np.asarray(g)
    assert np.all(p * g >= 0)
    assert np.all(np.abs(p) <= np.abs(g))
    if np.count_nonzero(g) == 1:
      np.testing.assert_array_equal(p, np.zeros_like(p))
