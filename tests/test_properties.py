"""Property tests (hypothesis) over random pytrees.

Trees are nested dicts / lists / tuples of arrays of random shapes (scalars and
empty arrays included), mostly float32 with some bfloat16 leaves, some of them
all zero; with `x64` (under `jax.enable_x64`) mostly float64 leaves, mixed
with float32 and bfloat16 ones. The loss is a random quadratic-plus-quartic
over the tree, so `grad_fn` is a real gradient. Everything runs eagerly: every
example has a new tree structure, and compiling each would cost more than
running it. Shapes are drawn from a small pool so that the eager kernels are
reused across examples.

(The jitted float32 / bfloat16 dtype and shape checks of every case, every_k
variants included, are the conformance suite's.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import gnorm_optax as gx

SHAPES = [(), (3,), (2, 3), (2, 1, 2), (0,)]

PROPERTY_SETTINGS = settings(max_examples=20)
X64_SETTINGS = settings(max_examples=10)

pytestmark = pytest.mark.usefixtures("strict_rank_promotion")


@pytest.fixture(scope="module")
def every_step_cases(cases):
  """The cases without a `lax.cond`: every_k > 1 and AE-SAM's policy run the
  refresh through one, which compiles on every eager call; they are covered
  (jitted) by the conformance suite."""
  return [c for c in cases if "every_k" not in c.id and c.id != "sam-ae"]


# ----------------------------------------------------------------------------
# Strategies.
# ----------------------------------------------------------------------------

DTYPES = {"f64": jnp.float64, "f32": jnp.float32, "bf16": jnp.bfloat16}


def _leaf_specs(x64, allow_bf16):
  dtypes = ["f64", "f64", "f32"] if x64 else ["f32", "f32"]
  return st.fixed_dictionaries(
    {
      "shape": st.sampled_from(SHAPES),
      "dtype": st.sampled_from(dtypes + ["bf16"] if allow_bf16 else dtypes),
      "zero": st.sampled_from([False, False, False, True]),
      "exponent": st.integers(-2, 2),
    }
  )


def _containers(children):
  lists = st.lists(children, min_size=1, max_size=3)
  return st.one_of(
    lists,
    lists.map(tuple),
    st.dictionaries(st.sampled_from("abcd"), children, min_size=1, max_size=3),
  )


def _is_spec(x):
  return isinstance(x, dict) and "shape" in x and "exponent" in x


@jax.jit
def _leaf_loss(x, a, b):
  """One leaf's term of the random loss (jitted: compiled once per shape), in
  the leaf's compute dtype (float64 for a float64 leaf)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return jnp.sum(0.5 * a * x**2 + 0.25 * b * x**4)


@st.composite
def problems(draw, x64=False, allow_bf16=True):
  """`(params, loss)`: a random tree and a random quadratic+quartic loss.

  Draw it inside `jax.enable_x64(x64)`."""
  spec = draw(st.recursive(_leaf_specs(x64, allow_bf16), _containers, max_leaves=6))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

  def leaf(s):
    dtype = DTYPES[s["dtype"]]
    if s["zero"]:
      return jnp.zeros(s["shape"], dtype)
    x = rng.normal(size=s["shape"]) * 10.0 ** s["exponent"]
    return jnp.asarray(x, dtype)

  params = jax.tree.map(leaf, spec, is_leaf=_is_spec)
  want = [DTYPES[s["dtype"]] for s in jax.tree.leaves(spec, is_leaf=_is_spec)]
  assert [x.dtype for x in jax.tree.leaves(params)] == want  # x64 is on
  coeffs = jax.tree.map(
    lambda p: (
      jnp.asarray(rng.uniform(0.5, 2.0, p.shape), jnp.float32),
      jnp.asarray(rng.uniform(0.0, 0.5, p.shape), jnp.float32),
    ),
    params,
  )

  def loss(p):
    terms = jax.tree.map(lambda x, c: _leaf_loss(x, *c), p, coeffs)
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))

  return params, loss


def _spec(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


# ----------------------------------------------------------------------------
# Properties.
# ----------------------------------------------------------------------------

x64_modes = pytest.mark.parametrize("x64", [False, True], ids=["f32", "x64"])


def check_tree_shapes_dtypes_and_finiteness(cases, update_kwargs, problem, steps):
  params, loss = problem
  grads = jax.grad(loss)(params)
  for case in cases:
    tx = case.make(**case.hparams)
    state0 = state = tx.init(params)
    kwargs = update_kwargs(case, loss, loss(params))
    for _ in range(steps):
      updates, state = tx.update(grads, state, params, **kwargs)
      assert jax.tree.structure(updates) == jax.tree.structure(params), case.id
      for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
        assert u.shape == g.shape, case.id
        assert u.dtype == g.dtype, case.id
        assert np.all(np.isfinite(np.asarray(u, np.float64))), case.id
    assert _spec(state) == _spec(state0), case.id


@PROPERTY_SETTINGS
@given(problems())
def test_every_transform_keeps_tree_shapes_dtypes_and_finiteness(
  every_step_cases, update_kwargs, problem
):
  """Every case, two steps on float32 / bfloat16 trees: the updates have the
  tree, shapes and dtypes of the gradients, the state keeps its structure,
  shapes and dtypes, and finite params and gradients (some leaves zero) give
  finite updates."""
  check_tree_shapes_dtypes_and_finiteness(
    every_step_cases, update_kwargs, problem, steps=2
  )


# One case per code path (the float64 kernels are compiled for each new shape).
X64_CASES = (
  "penalized_grad-normalize_clean",
  "sam-adaptive",
  "finite_difference_gr-forward",
  "finite_difference_gr-central",
  "gradient_regularization",
  "flooding",
  "adaptive_gradient_regularization",
  "agr_adamw",
)


@X64_SETTINGS
@given(data=st.data())
def test_float64_mixes_keep_tree_shapes_dtypes_and_finiteness(
  every_step_cases, update_kwargs, data
):
  """The same on trees mixing float64, float32 and bfloat16 leaves, under
  jax.enable_x64, one step: float64 leaves get float64 updates."""
  cases = [c for c in every_step_cases if c.id in X64_CASES]
  assert len(cases) == len(X64_CASES)
  with jax.enable_x64(True):
    check_tree_shapes_dtypes_and_finiteness(
      cases, update_kwargs, data.draw(problems(x64=True)), steps=1
    )


IDENTITIES = {  # each returns g exactly
  "alpha=0": lambda: gx.penalized_grad(0.05, 0.0),
  "alpha=0 adaptive": lambda: gx.penalized_grad(0.05, 0.0, adaptive=True),
  "rho=0": lambda: gx.penalized_grad(0.0, 0.8),
  "rho=0 adaptive": lambda: gx.penalized_grad(0.0, 0.8, adaptive=True),
  "sam rho=0": lambda: gx.sam(0.0),
  "fd forward gamma=0": lambda: gx.finite_difference_gr(0.0, 0.01),
  "fd central gamma=0": lambda: gx.finite_difference_gr(0.0, 0.01, scheme="central"),
  "gr gamma=0": lambda: gx.gradient_regularization(0.0),
}


@x64_modes
@PROPERTY_SETTINGS
@given(data=st.data(), identity=st.sampled_from(sorted(IDENTITIES)))
def test_identities_return_gradient_exactly(x64, data, identity):
  """`alpha=0` and `rho=0` (penalized_grad, sam) and `gamma=0` (finite
  differences, exact GR) give `g` back bit for bit (`grad_fn` is a real
  gradient, evaluated eagerly like `g`, so `rho=0` evaluates it at `params`)."""
  with jax.enable_x64(x64):
    params, loss = data.draw(problems(x64=x64))
    tx = IDENTITIES[identity]()
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, tx.init(params), params, grad_fn=jax.grad(loss))
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert u.dtype == g.dtype and u.shape == g.shape
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


@x64_modes
@PROPERTY_SETTINGS
@given(data=st.data(), c=_scales)
def test_agr_is_scale_equivariant(x64, data, c):
  """`AGR(c g) == c AGR(g)` for c != 0, to the precision of each leaf's dtype
  (float32 and float64 trees: in bfloat16 the rounding of `c g` would
  dominate), and |AGR(g)| <= |g| entrywise."""
  with jax.enable_x64(x64):
    params, loss = data.draw(problems(x64=x64, allow_bf16=False))
    grads = jax.grad(loss)(params)
    scaled = _agr(jax.tree.map(lambda g: c * g, grads))
    plain = _agr(grads)
    for s, p, g in zip(
      jax.tree.leaves(scaled),
      jax.tree.leaves(plain),
      jax.tree.leaves(grads),
      strict=True,
    ):
      assert s.dtype == p.dtype == g.dtype
      rtol, atol = (1e-12, 1e-14) if g.dtype == jnp.float64 else (1e-5, 1e-6)
      big = float(np.max(np.abs(np.asarray(g)), initial=0.0))
      np.testing.assert_allclose(
        s, c * np.asarray(p), rtol=rtol, atol=atol * abs(c) * big
      )
      # |AGR(g)| <= |g| entrywise, up to rounding.
      assert np.all(np.abs(p) <= np.abs(g) * (1 + 10 * atol))


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
