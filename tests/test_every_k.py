"""every_k reuse, its CPU mechanism and axis_name.

(The non-finite guard, with and without every_k, is test_reliability.py's
`test_faults_in_jit`.)
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_optax as gx
from gnorm_optax._src import canonical_conv


def quartic_problem():
  x = jax.random.normal(jax.random.key(0), (16, 3))
  params = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.3)}
  loss = lambda p: jnp.mean((x @ p["w"] + p["b"]) ** 4)
  return loss, params


class Counter:
  """Counts real executions (not traces) of a jitted grad_fn."""

  def __init__(self, grad):
    self.calls = 0
    self.grad = grad

  def _tick(self):
    self.calls += 1

  def __call__(self, p):
    jax.debug.callback(self._tick)
    return self.grad(p)


def train(tx, loss, params, steps, grad_fn=None, state=None):
  grad_fn = grad_fn or jax.grad(loss)

  @jax.jit
  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s, u

  state = tx.init(params) if state is None else state
  outs = []
  for _ in range(steps):
    params, state, u = step(params, state)
    outs.append(u)
  jax.effects_barrier()
  return params, state, outs


def test_cached_correction_is_reused_between_refreshes():
  loss, params = quartic_problem()
  rho, alpha, k = 0.1, 0.6, 3
  _, state, outs = train(gx.penalized_grad(rho, alpha, every_k=k), loss, params, 5)
  # Replay by hand: refresh on steps 0 and 3, reuse the correction g' - g.
  p, d = params, None
  lr_free = []
  for t in range(5):
    g = jax.grad(loss)(p)
    if t % k == 0:
      gn = jnp.sqrt(sum(jnp.sum(x**2) for x in jax.tree.leaves(g)))
      adv = jax.tree.map(lambda a, b, gn=gn: a + rho * b / gn, p, g)
      d = jax.tree.map(jnp.subtract, jax.grad(loss)(adv), g)
    u = jax.tree.map(lambda a, b: a + alpha * b, g, d)
    lr_free.append(u)
    p = optax.apply_updates(p, u)
  for ours, ref in zip(outs, lr_free, strict=True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5), ours, ref)
  assert int(state.count) == 5
  assert state.correction is not None


@pytest.mark.parametrize("bad", [0, -1])
def test_injected_every_k_below_one_refreshes_every_step(bad):
  """An injected every_k cannot be checked (it is traced): a value below 1 is
  taken as 1, so the extra gradient is computed on every step (the safe
  reading), never a modulo by zero or a stale cache."""
  loss, params = quartic_problem()
  tx = optax.inject_hyperparams(gx.sam)(rho=0.05, every_k=3)
  state = tx.init(params)
  state.hyperparams["every_k"] = jnp.asarray(bad)
  counter = Counter(jax.grad(loss))
  _, _, outs = train(tx, loss, params, 4, grad_fn=counter, state=state)
  _, _, want = train(gx.sam(0.05), loss, params, 4)
  assert counter.calls == 4  # a refresh on every step
  jax.tree.map(np.testing.assert_array_equal, outs, want)


def test_every_k_one_keeps_no_cache():
  _, params = quartic_problem()
  assert gx.sam(0.1).init(params).correction is None
  cache = gx.sam(0.1, every_k=4).init(params).correction
  assert jax.tree.structure(cache) == jax.tree.structure(params)


# ----------------------------------------------------------------------------
# The XLA:CPU mechanism: convolutions inside the cond stay canonical.
# ----------------------------------------------------------------------------


def cnn_problem():
  keys = jax.random.split(jax.random.key(0), 4)
  params = {
    "c1": jax.random.normal(keys[0], (3, 3, 1, 8)) * 0.3,
    "c2": jax.random.normal(keys[1], (3, 3, 8, 8)) * 0.1,
    "w": jax.random.normal(keys[2], (8 * 8 * 8, 10)) * 0.05,
  }
  x = jax.random.normal(keys[3], (16, 8, 8, 1))
  y = jnp.arange(16) % 10

  def conv(h, k):
    return jax.lax.conv_general_dilated(
      h, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def loss(p):
    h = jax.nn.relu(conv(x, p["c1"]))
    h = jax.nn.relu(conv(h, p["c2"]))
    logits = h.reshape(16, -1) @ p["w"]
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

  return loss, params


def test_canonicalized_gradient_is_identical():
  loss, params = cnn_problem()
  grad = jax.jit(jax.grad(loss))
  fast = jax.jit(canonical_conv.canonicalize_convolutions(jax.grad(loss)))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
    grad(params),
    fast(params),
  )

  # Backward convolutions are non-canonical before the rewrite, not after.
  def conv_dims(fn):
    jaxpr = jax.make_jaxpr(fn)(params)
    specs = []
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        specs.append(tuple(map(tuple, eqn.params["dimension_numbers"])))
    return specs

  canonical = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  assert any(s != canonical for s in conv_dims(jax.grad(loss)))
  rewritten = conv_dims(canonical_conv.canonicalize_convolutions(jax.grad(loss)))
  assert rewritten and all(s == canonical for s in rewritten)


def test_every_k_step_compiles_only_canonical_convolutions_on_cpu():
  loss, params = cnn_problem()
  tx = optax.chain(gx.sam(0.05, every_k=2), optax.sgd(0.1))

  def step(p, s):
    u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
    return optax.apply_updates(p, u), s

  hlo = jax.jit(step).lower(params, tx.init(params)).compile().as_text()
  labels = re.findall(r"convolution\(.*?dim_labels=(\S+?)[,\s]", hlo)
  assert len(labels) >= 6  # forward and backward convs of both passes
  assert set(labels) == {"b01f_01io->b01f"}, labels


def test_every_k_result_matches_every_step_on_refresh():
  loss, params = cnn_problem()
  _, _, a = train(optax.chain(gx.sam(0.05, every_k=2), optax.sgd(0.1)), loss, params, 1)
  _, _, b = train(optax.chain(gx.sam(0.05), optax.sgd(0.1)), loss, params, 1)
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a[0], b[0]
  )


# ----------------------------------------------------------------------------
# axis_name: averaged gradients, synchronized or local perturbation.
# ----------------------------------------------------------------------------


def sharded_problem():
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (4, 8, 3))  # 4 shards of 8 examples
  y = jax.random.normal(keys[1], (4, 8))
  params = jax.random.normal(keys[2], (3,))
  loss = lambda p, xs, ys: jnp.mean((jnp.tanh(xs @ p) - ys) ** 2)
  return loss, params, x, y


@pytest.mark.parametrize("sync", [True, False])
def test_axis_name_matches_per_shard_computation(sync):
  loss, params, x, y = sharded_problem()
  rho, alpha = 0.2, 0.7
  tx = gx.penalized_grad(rho, alpha, axis_name="data", sync_perturbation=sync)

  def per_shard(xs, ys):
    g = jax.grad(loss)(params, xs, ys)
    u, _ = tx.update(
      g, tx.init(params), params, grad_fn=lambda p: jax.grad(loss)(p, xs, ys)
    )
    return u

  out = jax.vmap(per_shard, axis_name="data")(x, y)
  np.testing.assert_allclose(out[0], out[3], rtol=1e-6)  # replicated result

  grads = jnp.stack([jax.grad(loss)(params, x[i], y[i]) for i in range(4)])
  g_mean = grads.mean(0)
  directions = [g_mean] * 4 if sync else list(grads)
  adv = [
    jax.grad(loss)(params + rho * d / jnp.linalg.norm(d), x[i], y[i])
    for i, d in enumerate(directions)
  ]
  expected = (1 - alpha) * g_mean + alpha * jnp.stack(adv).mean(0)
  np.testing.assert_allclose(out[0], expected, rtol=1e-5)


def test_ensemble_axes_keep_the_cond_under_vmap():
  """Under `jax.vmap` with `gx.ensemble_axes` (one shared count), each
  member's steps equal its own unbatched run and the extra gradient runs on
  the refresh steps only; with every leaf batched it runs on every step."""
  loss, params = quartic_problem()
  members = jax.tree.map(lambda p: jnp.stack([p, 1.5 * p, -p]), params)
  tx = optax.chain(gx.sam(0.05, every_k=3), optax.sgd(0.01))
  n_steps = 5

  def run(state_axes):
    counter = Counter(jax.grad(loss))

    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=counter)
      return optax.apply_updates(p, u), s

    mapped = jax.jit(jax.vmap(step, in_axes=(0, state_axes), out_axes=(0, state_axes)))
    p, s = members, jax.vmap(tx.init, out_axes=state_axes)(members)
    for _ in range(n_steps):
      p, s = mapped(p, s)
    jax.block_until_ready(p)
    return p, counter.calls

  axes = gx.ensemble_axes(jax.eval_shape(tx.init, members))
  shared, calls_shared = run(axes)
  _, calls_batched = run(0)
  assert calls_batched == n_steps * calls_shared / 2  # refreshes: steps 0, 3

  for i in range(3):  # each member as if trained alone
    p = jax.tree.map(lambda m, i=i: m[i], members)
    s = tx.init(p)
    for _ in range(n_steps):
      u, s = tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))
      p = optax.apply_updates(p, u)
    jax.tree.map(
      lambda a, b, i=i: np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6),
      shared,
      p,
    )


def test_looksam_reuses_the_rescaled_orthogonal_component():
  """`reuse="looksam"` (Liu et al. 2022, Alg. 1): a refresh step is SAM's;
  the others add `alpha ||g|| / ||g_v|| g_v` to their own `g`, with `g_v` the
  part of the refresh step's `g'` orthogonal to its `g` (hand-written, in
  float64). (grad_fn's runs: the conformance suite's count.)"""
  loss, params = quartic_problem()
  rho, alpha, k = 0.1, 0.7, 3
  tx = optax.chain(
    gx.sam(rho, every_k=k, reuse="looksam", looksam_alpha=alpha), optax.sgd(0.01)
  )
  grad = jax.grad(loss)
  step = jax.jit(lambda p, s: tx.update(grad(p), s, p, grad_fn=grad))
  flat = lambda t: np.concatenate(
    [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]
  )
  p, s = params, tx.init(params)
  g_v = None
  for t in range(5):
    g = flat(jax.grad(loss)(p))
    u, s = step(p, s)
    if t % k == 0:  # SAM, and g_v from it
      scale = rho / np.linalg.norm(g)
      point = jax.tree.map(lambda x, gi, c=scale: x + c * gi, p, jax.grad(loss)(p))
      g_adv = flat(jax.grad(loss)(point))
      g_v = g_adv - (g_adv @ g) / (g @ g) * g
      expected = g_adv
    else:
      expected = g + alpha * np.linalg.norm(g) / np.linalg.norm(g_v) * g_v
    np.testing.assert_allclose(flat(u), -0.01 * expected, rtol=2e-5, atol=1e-7)
    p = optax.apply_updates(p, u)


@pytest.mark.parametrize("every_k", [1, 3])
def test_ae_sam_takes_the_extra_gradient_when_the_gradient_norm_is_high(every_k):
  """`ae_threshold=c` (AE-SAM, Jiang et al. 2023): running mean `mu` and
  variance `sigma^2` of `||g||^2` (decay 0.9, updated by the step's own);
  SAM's gradient when `||g||^2 >= mu + c sigma`, else `g` (every_k=1, the
  paper's SGD step) or `g` plus the last refresh's correction `g' - g`
  (every_k > 1). Hand-written policy, float64; grad_fn's runs: the
  conformance suite's count."""
  loss, params = quartic_problem()
  rho, c, decay, n = 0.05, 0.3, 0.9, 12
  tx = optax.chain(
    gx.sam(rho, ae_threshold=c, ae_decay=decay, every_k=every_k), optax.sgd(0.01)
  )
  grad = jax.grad(loss)
  step = jax.jit(lambda p, s: tx.update(grad(p), s, p, grad_fn=grad))
  flat = lambda t: np.concatenate(
    [np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(t)]
  )
  p, s = params, tx.init(params)
  mean = var = 0.0
  taken = []
  cached = None
  for _ in range(n):
    g_tree = jax.grad(loss)(p)
    g = flat(g_tree)
    sq = g @ g
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * (sq - mean) ** 2
    taken.append(sq >= mean + c * np.sqrt(var))
    if taken[-1]:
      scale = rho / np.linalg.norm(g)
      point = jax.tree.map(lambda x, gi, a=scale: x + a * gi, p, g_tree)
      expected = flat(jax.grad(loss)(point))
      cached = expected - g
    else:
      expected = g if every_k == 1 else g + cached
    u, s = step(p, s)
    np.testing.assert_allclose(flat(u), -0.01 * expected, rtol=2e-5, atol=1e-7)
    p = optax.apply_updates(p, u)
  assert taken[0] and not all(taken), taken  # both kinds of step happened


def test_ae_sam_with_a_cache_is_donated_and_injected():
  """AE-SAM's statistics live in `state.policy`: with every_k=3 (the cache
  reused on skipped steps), a donated jitted step under
  `optax.inject_hyperparams` (threshold and every_k injected) equals the
  plain transform. (every_k=1: the conformance case `sam-ae`.)"""
  loss, params = quartic_problem()
  plain = gx.sam(0.05, ae_threshold=0.2, every_k=3)
  injected = optax.inject_hyperparams(gx.sam)(0.05, ae_threshold=0.2, every_k=3)

  def step(p, s, tx):
    return tx.update(jax.grad(loss)(p), s, p, grad_fn=jax.grad(loss))

  jitted = jax.jit(step, donate_argnums=(1,), static_argnums=2)
  s_plain, s_inj = plain.init(params), injected.init(params)
  p = params
  for _ in range(5):
    u_plain, s_plain = step(p, s_plain, plain)
    u_inj, s_inj = jitted(p, s_inj, injected)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_inj, u_plain
    )
    p = optax.apply_updates(p, jax.tree.map(lambda x: -0.01 * x, u_plain))
  np.testing.assert_allclose(s_inj.inner_state.policy, s_plain.policy, rtol=1e-6)
