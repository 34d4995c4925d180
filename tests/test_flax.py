"""The NNX grad_fn helper never touches BatchNorm statistics or RNG streams."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import gnorm_optax as gx
from gnorm_optax.flax import nnx_grad_fn
from gnorm_optax.flax import nnx_value_fn


class Net(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.out = nnx.Linear(4 * 6 * 6, 3, rngs=rngs)

  def __call__(self, x):
    h = self.drop(nnx.relu(self.bn(self.conv(x))))
    return self.out(h.reshape(h.shape[0], -1))


def loss_fn(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def batch():
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1)) * 2 + 1
  return x, jnp.arange(8) % 3


def make(tx):
  model = Net(nnx.Rngs(0, dropout=1))
  return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def step(model, optimizer, x, y):
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


def non_params(model):
  """BatchNorm statistics and RNG state, keys as their raw data."""
  state = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
  return jax.tree.map(
    lambda x: (
      jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
    ),
    state,
  )


def test_sam_step_keeps_batchnorm_statistics_of_plain_step():
  x, y = batch()
  plain, plain_opt = make(optax.sgd(0.1))
  sam, sam_opt = make(optax.chain(gx.sam(0.5), optax.sgd(0.1)))
  before = non_params(sam)
  step(plain, plain_opt, x, y)
  step(sam, sam_opt, x, y)
  # BatchNorm running statistics and dropout RNG counters: the clean pass only.
  jax.tree.map(np.testing.assert_array_equal, non_params(sam), non_params(plain))
  assert not np.allclose(sam.bn.mean[...], before["bn"]["mean"])  # they moved
  # ... while the parameters took different (SAM vs SGD) steps.
  assert not np.allclose(sam.out.kernel[...], plain.out.kernel[...])


def test_grad_fn_reuses_the_clean_pass_dropout_mask():
  """(That grad_fn leaves BatchNorm statistics and RNG counters alone is
  test_sam_step_keeps_batchnorm_statistics_of_plain_step.)"""
  x, y = batch()
  model, _ = make(optax.sgd(0.1))
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  g_twice = [grad_fn(params), grad_fn(params)]
  clean = nnx.as_pure(nnx.grad(loss_fn)(model, x, y))
  # Same dropout mask as the clean pass: the gradients agree exactly.
  for g in g_twice:
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g, clean
    )


def test_value_fn_matches_loss_and_its_gradient_is_grad_fn():
  """(That a transform given value_fn computes what it does with grad_fn is
  test_reliability.py's.)"""
  x, y = batch()
  model, _ = make(optax.sgd(0.1))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  value_fn = nnx_value_fn(model, loss_fn, x, y)
  np.testing.assert_allclose(
    value_fn(params), loss_fn(nnx.clone(model), x, y), rtol=1e-6
  )
  # Away from the model's params too: value_fn is a function of its argument.
  moved = jax.tree.map(lambda p: 1.1 * p, params)
  g = nnx_grad_fn(model, loss_fn, x, y)(moved)
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-7),
    jax.grad(value_fn)(moved),
    g,
  )


# --- Common mistakes: clear errors, or support. ------------------------------


def assert_trees_close(a, b):
  jax.tree.map(
    lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a, b
  )


def params_of(model):
  return nnx.as_pure(nnx.state(model, nnx.Param))


def test_swapped_model_and_loss_raise_at_build_time_naming_the_fix():
  x, y = batch()
  model, _ = make(optax.sgd(0.1))
  fix = r"nnx_grad_fn\(model, loss_fn, \*batch\)"
  with pytest.raises(TypeError, match=r"(?s)model comes first.*" + fix):
    nnx_grad_fn(loss_fn, model, x, y)
  with pytest.raises(TypeError, match=r"(?s)nnx\.Module as its first.*" + fix):
    nnx_grad_fn(x, loss_fn, y)
  with pytest.raises(TypeError, match=r"(?s)second argument.*" + fix):
    nnx_grad_fn(model, model, x, y)
  with pytest.raises(TypeError, match=r"nnx_value_fn\(model, loss_fn, \*batch\)"):
    nnx_value_fn(model, x, y)


def test_other_wrt_than_the_optimizer_raises_showing_both_structures():
  x, y = batch()
  model = Net(nnx.Rngs(0, dropout=1))
  wrt = nnx.Any(nnx.Param, nnx.BatchStat)
  optimizer = nnx.Optimizer(model, gx.sam(0.05), wrt=wrt)
  # What optimizer.update hands to grad_fn.
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)  # wrt=nnx.Param
  with pytest.raises(
    ValueError,
    match=(
      r"(?s)wrt=Param.*params: +\d+ leaves.*expected: +\d+ leaves"
      r".*not expected: \[bn\.mean, bn\.var\].*"
      r"nnx\.Optimizer\(model, tx, wrt=wrt\).*"
      r"nnx_grad_fn\(model, loss_fn, \*batch, wrt=wrt\)"
    ),
  ):
    grad_fn(params)
  # The same wrt on both sides works.
  g = nnx_grad_fn(model, loss_fn, x, y, wrt=wrt)(params)
  assert jax.tree.structure(g) == jax.tree.structure(params)


def test_tuple_loss_without_has_aux_raises_suggesting_it():
  x, y = batch()
  model, _ = make(optax.sgd(0.1))

  def aux_loss(m, x, y):
    return loss_fn(m, x, y), m(x)

  params = params_of(model)
  with pytest.raises(TypeError, match=r"has_aux=True\)"):
    nnx_grad_fn(model, aux_loss, x, y)(params)
  with pytest.raises(TypeError, match=r"has_aux=True\)"):
    nnx_value_fn(model, aux_loss, x, y)(params)
  with pytest.raises(TypeError, match=r"\(loss, aux\)"):
    nnx_grad_fn(model, loss_fn, x, y, has_aux=True)(params)
  with pytest.raises(TypeError, match=r"scalar loss.*\n.*jnp\.mean"):
    nnx_value_fn(model, lambda m, x, y: m(x), x, y)(params)


def test_has_aux_drops_aux_and_matches_nnx_grad():
  x, y = batch()
  model, _ = make(optax.sgd(0.1))

  def aux_loss(m, x, y):
    logits = m(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, {"logits": logits}

  grad_fn = nnx_grad_fn(model, aux_loss, x, y, has_aux=True)
  value_fn = nnx_value_fn(model, aux_loss, x, y, has_aux=True)
  snapshot = non_params(model)
  params = params_of(model)
  g, value = grad_fn(params), value_fn(params)
  jax.tree.map(np.testing.assert_array_equal, non_params(model), snapshot)
  assert jnp.shape(value) == ()
  (clean_loss, _), clean = nnx.value_and_grad(aux_loss, has_aux=True)(model, x, y)
  assert_trees_close(g, nnx.as_pure(clean))
  np.testing.assert_allclose(value, clean_loss, rtol=1e-6)


class RngNet(nnx.Module):
  """Dropout whose stream comes from the caller's `nnx.Rngs`."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(6, 3, rngs=rngs)
    self.bn = nnx.BatchNorm(6, rngs=rngs)
    self.drop = nnx.Dropout(0.5)

  def __call__(self, x, rngs):
    return self.lin(self.drop(self.bn(x), rngs=rngs))


def rng_loss(model, x, y, rngs):
  return optax.softmax_cross_entropy_with_integer_labels(model(x, rngs), y).mean()


def rng_state(rngs):
  return jax.tree.map(
    lambda v: (
      jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key) else v
    ),
    nnx.as_pure(nnx.state(rngs)),
  )


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_rngs_argument_is_snapshotted_and_gives_the_clean_pass_masks(as_kwarg):
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = jnp.arange(8) % 3
  model = RngNet(nnx.Rngs(0))
  rngs = nnx.Rngs(dropout=7)
  args, kwargs = ((x, y), {"rngs": rngs}) if as_kwarg else ((x, y, rngs), {})
  grad_fn = nnx_grad_fn(model, rng_loss, *args, **kwargs)
  value_fn = nnx_value_fn(model, rng_loss, *args, **kwargs)
  rngs_before, model_before = rng_state(rngs), non_params(model)
  params = params_of(model)
  g_twice = [grad_fn(params), grad_fn(params)]
  value = value_fn(params)
  # The caller's Rngs is not advanced, the model's state not written.
  jax.tree.map(np.testing.assert_array_equal, rng_state(rngs), rngs_before)
  jax.tree.map(np.testing.assert_array_equal, non_params(model), model_before)
  # The clean pass, run after: same stream, so the same gradient exactly.
  clean_loss, clean = nnx.value_and_grad(rng_loss)(model, x, y, rngs)
  for g in g_twice:
    assert_trees_close(g, nnx.as_pure(clean))
  np.testing.assert_allclose(value, clean_loss, rtol=1e-6)
  # (The clean pass does use, and advance, the stream.)
  assert rng_state(rngs)["dropout"]["count"] == rngs_before["dropout"]["count"] + 1
  other_mask = nnx.grad(rng_loss)(nnx.clone(model), x, y, rngs)
  assert not np.allclose(other_mask["lin"]["kernel"][...], clean["lin"]["kernel"][...])


class SharedRngNet(nnx.Module):
  """Holds the very `nnx.Rngs` that the loss also receives."""

  def __init__(self, rngs):
    self.lin = nnx.Linear(6, 3, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x, rngs):
    keep = jax.random.bernoulli(self.rngs.dropout(), 0.5, x.shape)
    keep2 = jax.random.bernoulli(rngs.dropout(), 0.5, x.shape)
    return self.lin(x * keep * keep2)


def test_rngs_shared_by_model_and_arguments_stays_shared_in_the_copy():
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = jnp.arange(8) % 3
  rngs = nnx.Rngs(0, dropout=3)
  model = SharedRngNet(rngs)
  grad_fn = nnx_grad_fn(model, rng_loss, x, y, rngs)
  before = rng_state(rngs)
  g = grad_fn(params_of(model))
  jax.tree.map(np.testing.assert_array_equal, rng_state(rngs), before)
  # One stream drawn twice (two different masks), as in the clean pass. (Flax's
  # nnx.grad rejects the aliased argument, so the clean pass reaches it through
  # the model.)
  clean = nnx.grad(lambda m: rng_loss(m, x, y, m.rngs))(model)
  assert_trees_close(g, nnx.as_pure(clean))


def test_module_argument_is_a_snapshotted_constant():
  x, y = batch()
  model, _ = make(optax.sgd(0.1))
  teacher = Net(nnx.Rngs(5, dropout=6))

  def distill(m, t, x):
    return jnp.mean((m(x) - jax.lax.stop_gradient(t(x))) ** 2)

  grad_fn = nnx_grad_fn(model, distill, teacher, x)
  teacher_before, model_before = non_params(teacher), non_params(model)
  g = grad_fn(params_of(model))
  jax.tree.map(np.testing.assert_array_equal, non_params(teacher), teacher_before)
  jax.tree.map(np.testing.assert_array_equal, non_params(model), model_before)
  assert jax.tree.structure(g) == jax.tree.structure(params_of(model))
  assert_trees_close(g, nnx.as_pure(nnx.grad(distill)(model, teacher, x)))


def test_rngs_argument_in_a_jitted_sam_step():
  x = jax.random.normal(jax.random.key(0), (8, 6))
  y = jnp.arange(8) % 3
  model = RngNet(nnx.Rngs(0))
  optimizer = nnx.Optimizer(
    model, optax.chain(gx.sam(0.1), optax.sgd(0.1)), wrt=nnx.Param
  )
  rngs = nnx.Rngs(dropout=7)

  @nnx.jit
  def rng_step(model, optimizer, rngs, x, y):
    grad_fn = nnx_grad_fn(model, rng_loss, x, y, rngs)
    loss, grads = nnx.value_and_grad(rng_loss)(model, x, y, rngs)
    optimizer.update(model, grads, grad_fn=grad_fn)
    return loss

  before = rng_state(rngs)
  first = rng_step(model, optimizer, rngs, x, y)
  # Only the clean pass advanced the caller's stream.
  assert rng_state(rngs)["dropout"]["count"] == before["dropout"]["count"] + 1
  assert rng_step(model, optimizer, rngs, x, y) < first
