"""Bad input gets a clear error naming the argument, the value and the fix."""

import jax
import jax.numpy as jnp
import optax
import pytest

import gnorm_optax as gx

PARAMS = {"w": jnp.ones((3,)), "b": jnp.zeros(())}
LOSS = lambda p: jnp.sum(p["w"] ** 2) + p["b"] ** 2
GRADS = jax.grad(LOSS)(PARAMS)

SECOND_GRADIENT = [
  lambda: gx.penalized_grad(0.05, 0.8),
  lambda: gx.sam(0.05),
  lambda: gx.finite_difference_gr(0.1, 0.01),
  lambda: gx.gradient_regularization(0.1),
  lambda: gx.sam(0.05, every_k=3),
]


@pytest.mark.parametrize("make", SECOND_GRADIENT)
def test_missing_grad_fn_shows_the_fix(make):
  tx = make()
  with pytest.raises(
    ValueError,
    match=r"(?s)needs grad_fn.*grad_fn=lambda p: jax.grad"
    r".*With Flax NNX.*nnx_grad_fn\(model, loss_fn, x, y\)",
  ):
    tx.update(GRADS, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize("make", SECOND_GRADIENT)
def test_missing_params_shows_the_fix(make):
  tx = make()
  with pytest.raises(
    ValueError, match=r"needs params.*tx.update\(grads, state, params"
  ):
    tx.update(GRADS, tx.init(PARAMS), grad_fn=jax.grad(LOSS))


def test_missing_params_inside_chain_and_jit():
  tx = optax.chain(gx.sam(0.05), optax.sgd(0.1))
  state = tx.init(PARAMS)
  step = jax.jit(lambda g, s: tx.update(g, s, grad_fn=jax.grad(LOSS)))
  with pytest.raises(ValueError, match="needs params"):
    step(GRADS, state)


def test_grad_fn_wins_over_value_fn():
  tx = gx.sam(0.1)
  other = lambda p: 3.0 * LOSS(p)
  a, _ = tx.update(
    GRADS, tx.init(PARAMS), PARAMS, grad_fn=jax.grad(LOSS), value_fn=other
  )
  b, _ = tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=jax.grad(LOSS))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert jnp.array_equal(x, y)


@pytest.mark.parametrize(
  "bad_grad_fn,match",
  [
    (lambda p: {"w": p["w"]}, "another structure than params"),
    (lambda p: [p["w"], p["b"]], "another structure than params"),
    (lambda p: {"w": p["w"][:2], "b": p["b"]}, r"float32\[2\] at \['w'\]"),
    (
      lambda p: {"w": p["w"].astype(jnp.bfloat16), "b": p["b"]},
      r"bfloat16\[3\] at \['w'\].*float32\[3\]",
    ),
  ],
)
@pytest.mark.parametrize("make", SECOND_GRADIENT)
def test_grad_fn_returning_wrong_tree(make, bad_grad_fn, match):
  tx = make()
  with pytest.raises(ValueError, match=match):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=bad_grad_fn)


@pytest.mark.parametrize(
  "factory,error,match",
  [
    # Out of range.
    (lambda: gx.penalized_grad(rho=-0.1), ValueError, r"rho must be >= 0.0, got -0.1"),
    (lambda: gx.sam(rho=-1), ValueError, r"rho must be >= 0.0, got -1"),
    (
      lambda: gx.finite_difference_gr(gamma=-0.5, epsilon=0.01),
      ValueError,
      r"gamma must be >= 0.0, got -0.5",
    ),
    (
      lambda: gx.gradient_regularization(gamma=-2.0),
      ValueError,
      r"gamma must be >= 0.0",
    ),
    (
      lambda: gx.finite_difference_gr(0.1, epsilon=0.0),
      ValueError,
      r"epsilon must be > 0.0, got 0.0; .*epsilon=0.01",
    ),
    (
      lambda: gx.finite_difference_gr(0.1, epsilon=-1e-3),
      ValueError,
      r"epsilon must be > 0.0",
    ),
    (
      lambda: gx.finite_difference_gr(0.1, 0.01, scheme="centered"),
      ValueError,
      r"scheme must be one of 'forward', 'backward', 'central'; got 'centered'",
    ),
    (
      lambda: gx.sam(0.05, on_nonfinite="skip"),
      ValueError,
      r"on_nonfinite must be one of 'clean', 'zero', 'propagate'; got 'skip'",
    ),
    (
      lambda: gx.sam(0.05, every_k=5, reuse="orthogonal"),
      ValueError,
      r"reuse must be one of 'correction', 'looksam'; got 'orthogonal'",
    ),
    (
      lambda: gx.penalized_grad(every_k=5, reuse="looksam", normalize_clean=True),
      ValueError,
      r"reuse='looksam' .* use reuse='correction' with normalize_clean=True",
    ),
    (
      lambda: gx.sam(0.05, every_k=0),
      ValueError,
      r"every_k must be an integer >= 1, got 0",
    ),
    (
      lambda: gx.penalized_grad(every_k=-3),
      ValueError,
      r"every_k must be an integer >= 1",
    ),
    (
      lambda: gx.penalized_grad(alpha=jnp.ones(2)),
      ValueError,
      r"alpha must be a scalar",
    ),
    (lambda: gx.flooding(level=-1.0), ValueError, r"level must be >= 0.0"),
    # Not finite.
    (lambda: gx.sam(rho=float("nan")), ValueError, "rho must be finite, got nan"),
    (
      lambda: gx.penalized_grad(alpha=float("nan")),
      ValueError,
      "alpha must be finite, got nan",
    ),
    (
      lambda: gx.finite_difference_gr(gamma=float("nan"), epsilon=0.01),
      ValueError,
      "gamma must be finite, got nan",
    ),
    (
      lambda: gx.finite_difference_gr(gamma=0.1, epsilon=float("nan")),
      ValueError,
      "epsilon must be finite, got nan",
    ),
    (
      lambda: gx.finite_difference_gr(gamma=0.1, epsilon=float("inf")),
      ValueError,
      "epsilon must be finite, got inf",
    ),
    (
      lambda: gx.gradient_regularization(gamma=jnp.nan),
      ValueError,
      "gamma must be finite, got nan",
    ),
    (
      lambda: gx.flooding(level=float("nan")),
      ValueError,
      "level must be finite, got nan",
    ),
    # Wrong types: strings, None, a float every_k.
    (lambda: gx.sam(rho="0.05"), TypeError, "rho must be a number or a schedule"),
    (
      lambda: gx.penalized_grad(alpha="0.8"),
      TypeError,
      "alpha must be a number or a schedule",
    ),
    (
      lambda: gx.finite_difference_gr(gamma="0.1", epsilon=0.01),
      TypeError,
      r"gamma must be a number or a schedule.*got '0.1' of type str",
    ),
    (
      lambda: gx.finite_difference_gr(gamma=0.1, epsilon="0.01"),
      TypeError,
      r"epsilon must be a number or a schedule.*got '0.01' of type str",
    ),
    (
      lambda: gx.finite_difference_gr(gamma=None, epsilon=0.1),
      TypeError,
      r"gamma must be a number or a schedule",
    ),
    (
      lambda: gx.gradient_regularization(gamma="0.1"),
      TypeError,
      "gamma must be a number or a schedule",
    ),
    (
      lambda: gx.flooding(level="0.1"),
      TypeError,
      "level must be a number or a schedule",
    ),
    (lambda: gx.sam(0.05, every_k=2.5), TypeError, r"every_k must be an integer"),
  ],
)
def test_bad_hyperparameters_fail_in_the_factory(factory, error, match):
  """Out of range, NaN / inf, strings and other wrong types: an error in the
  factory naming the argument and the value."""
  with pytest.raises(error, match=match):
    factory()


def test_schedule_returning_non_scalar():
  tx = gx.sam(lambda count: jnp.ones(2) * 0.1)
  with pytest.raises(ValueError, match="schedule for rho must return a scalar"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS, grad_fn=jax.grad(LOSS))


def test_flooding_needs_value():
  tx = gx.flooding(0.1)
  with pytest.raises(ValueError, match=r"flooding needs the loss.*value=loss"):
    tx.update(GRADS, tx.init(PARAMS), PARAMS)


# ----------------------------------------------------------------------------
# Chain order: the right order is the only one that passes quietly.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "factory,name",
  [
    (gx.sam, "sam"),
    (gx.penalized_grad, "penalized_grad"),
    (lambda opt: gx.finite_difference_gr(opt, 0.01), "finite_difference_gr"),
    (gx.gradient_regularization, "gradient_regularization"),
  ],
)
def test_an_optimizer_as_hyperparameter_shows_the_chain(factory, name):
  """`gx.sam(optax.adam(1e-3))`, the optax.contrib.sam habit."""
  with pytest.raises(TypeError) as info:
    factory(optax.adam(1e-3))
  message = str(info.value)
  assert f"optax.chain(gx.{name}(...), optimizer)" in message
  assert "optax.contrib.sam" in message
  assert len(message) < 400  # the optimizer object is not printed


@pytest.mark.parametrize("jit", [False, True])
def test_two_second_gradient_transforms_chained_raise(jit):
  tx = optax.chain(gx.sam(0.05), gx.finite_difference_gr(0.1, 0.01), optax.sgd(0.1))
  update = lambda g, s, p: tx.update(g, s, p, grad_fn=jax.grad(LOSS))
  with pytest.raises(
    ValueError,
    match=r"two of them are chained.*\n.*optax.chain"
    r"\(gx.finite_difference_gr\(\.\.\.\), optimizer\)",
  ):
    (jax.jit(update) if jit else update)(GRADS, tx.init(PARAMS), PARAMS)


def test_the_output_of_a_step_is_not_mistaken_for_a_chained_one():
  """The check looks only at the very arrays a second-gradient transform
  returned; a new gradient, or the same transform called again, passes."""
  tx = gx.sam(0.05)
  state = tx.init(PARAMS)
  out, state = tx.update(GRADS, state, PARAMS, grad_fn=jax.grad(LOSS))
  tx.update(GRADS, state, PARAMS, grad_fn=jax.grad(LOSS))
  other = gx.sam(0.1)
  other.update(
    jax.grad(LOSS)(PARAMS), other.init(PARAMS), PARAMS, grad_fn=jax.grad(LOSS)
  )
  del out
