"""The NNX grad_fn helper never touches BatchNorm statistics or RNG streams."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gnorm_optax as gx
from gnorm_optax.flax import nnx_grad_fn, nnx_value_fn


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
      lambda x: jax.random.key_data(x)
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, state)


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


def test_grad_fn_reuses_the_clean_pass_dropout_mask_and_does_not_mutate():
  x, y = batch()
  model, _ = make(optax.sgd(0.1))
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  snapshot = non_params(model)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  g_twice = [grad_fn(params), grad_fn(params)]
  jax.tree.map(np.testing.assert_array_equal, non_params(model), snapshot)
  clean = nnx.as_pure(nnx.grad(loss_fn)(model, x, y))
  # Same dropout mask as the clean pass: the gradients agree exactly.
  for g in g_twice:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 g, clean)


def test_value_fn_matches_loss_and_drives_sam_like_grad_fn():
  x, y = batch()
  model, _ = make(optax.sgd(0.1))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  value_fn = nnx_value_fn(model, loss_fn, x, y)
  np.testing.assert_allclose(value_fn(params), loss_fn(nnx.clone(model), x, y),
                             rtol=1e-6)
  tx = gx.sam(0.1)
  g = nnx_grad_fn(model, loss_fn, x, y)(params)
  a, _ = tx.update(g, tx.init(params), params, value_fn=value_fn)
  b, _ = tx.update(g, tx.init(params), params,
                   grad_fn=nnx_grad_fn(model, loss_fn, x, y))
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6), a, b)
