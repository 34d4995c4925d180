"""Multi-device checks of the second-gradient transforms, on 8 CPU devices.

JAX fixes the number of devices when it starts, so these checks run in their
own process, started by `tests/test_sharding.py`:

    python tests/sharding_checks.py GROUP [GROUP ...]

sets `--xla_force_host_platform_device_count=8` before JAX initialises, runs
the checks of the named groups (see `GROUPS`) and prints one JSON line per
check: `{"group", "name", "ok", "message", "max_abs_err"}`.

The transforms: penalized_grad, sam, sam(adaptive=True), finite_difference_gr
forward / backward / central and gradient_regularization. To keep the
compilations few, each group traces all of them into one jitted program.

* `jit`: under `jax.jit` with the batch sharded over a mesh of 8 devices
  (`NamedSharding(mesh, P('data'))`) and the parameters replicated (on an
  `Auto` and on an `Explicit` mesh) or fully sharded (FSDP: each parameter's
  largest axis divisible by 8 over 'data'), two steps of `chain(tx, sgd)`
  give the single-device result. Nothing is passed: the gradients of
  `grad_fn` are global already.
* `mapped`: inside `jax.shard_map` (`check_vma=False`, and `check_vma=True`
  with the parameters cast to varying) and `jax.pmap` with `axis_name='data'`,
  the update equals a hand-written per-shard computation (per-shard float32
  gradients, the rest in numpy float64, then averaged): the perturbation is
  the averaged gradient (`sync_perturbation=True`; then also the
  single-device result) or each device's own (`False`: m-sharpness).
* `every_k`: `sam(every_k=3)` and `finite_difference_gr(central,
  every_k=2)` over 6 steps under jit + mesh (replicated, FSDP) equal the
  single-device run; under `shard_map`, `sam(every_k=3)` equals the
  single-device run (synchronized) or a per-shard replay with the cached
  correction (m-sharpness), for an MLP and for a CNN (whose convolutions the
  library rewrites inside the `cond` on XLA:CPU; with `check_vma=True`).
* `explicit`: on a mesh with `AxisType.Explicit` axes and FSDP-sharded
  params (the loss all-gathers them with `jax.sharding.reshard`), with the
  params and the state donated: every transform with `every_k=3` and every
  transform under `optax.inject_hyperparams` (whose state always keeps the
  `every_k` cache), 4 steps, equal the unsharded single-device run; the
  states keep the params' shardings.
* `reduced`: under `shard_map` with `check_vma=True` (JAX's default) and
  replicated params, JAX has already reduced the gradient over the axis (the
  transpose of the implicit broadcast is a `psum`), so there is no local
  gradient to average or to perturb with: the transform must raise a
  ValueError naming `axis_name` rather than return a wrong update.
"""

from __future__ import annotations

import os
import sys

NUM_DEVICES = 8

if __name__ == "__main__":  # Before JAX initialises; never on import.
  _flags = (
    f"--xla_force_host_platform_device_count={NUM_DEVICES}",
    # Halves XLA:CPU compile time; the programs compared here are compiled
    # with the same flag, and they are far too small for speed to matter.
    "--xla_backend_optimization_level=0",
  )
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_flags])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.flatten_util  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import gnorm_optax as gx  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
LR = 0.1
BATCH, FEATURES, HIDDEN, CLASSES = 64, 16, 32, 8
Results = dict[str, float]  # check name -> max abs error (raises on failure)

# ----------------------------------------------------------------------------
# The transforms, with what their per-shard reference needs.
# ----------------------------------------------------------------------------

# name -> (factory(**axis kwargs), reference formula, hyperparameters)
TRANSFORMS: dict[str, tuple[Callable[..., optax.GradientTransformation], str, dict]] = {
  "penalized_grad": (
    lambda **kw: gx.penalized_grad(0.1, 0.7, **kw),
    "gnp",
    dict(rho=0.1, alpha=0.7),
  ),
  "sam": (lambda **kw: gx.sam(0.1, **kw), "gnp", dict(rho=0.1, alpha=1.0)),
  "sam_adaptive": (
    lambda **kw: gx.sam(0.5, adaptive=True, eta=0.01, **kw),
    "asam",
    dict(rho=0.5, eta=0.01),
  ),
  "fdgr_forward": (
    lambda **kw: gx.finite_difference_gr(0.1, 0.01, scheme="forward", **kw),
    "forward",
    dict(gamma=0.1, epsilon=0.01),
  ),
  "fdgr_backward": (
    lambda **kw: gx.finite_difference_gr(0.1, 0.01, scheme="backward", **kw),
    "backward",
    dict(gamma=0.1, epsilon=0.01),
  ),
  "fdgr_central": (
    lambda **kw: gx.finite_difference_gr(0.1, 0.01, scheme="central", **kw),
    "central",
    dict(gamma=0.1, epsilon=0.01),
  ),
  "gradient_regularization": (
    # It has no sync_perturbation flag: it always steps along the mean g.
    lambda sync_perturbation=True, **kw: gx.gradient_regularization(0.1, **kw),
    "exact",
    dict(gamma=0.1),
  ),
}


def mapped_variants() -> dict[str, tuple[str, bool]]:
  """`"<name> sync"` / `"<name> local"` -> (transform name, sync_perturbation)."""
  out = {}
  for name in TRANSFORMS:
    out[f"{name} sync"] = (name, True)
    if name != "gradient_regularization":
      out[f"{name} local"] = (name, False)
  return out


# ----------------------------------------------------------------------------
# Problems: a tanh MLP, and a CNN for every_k; softmax cross-entropy.
# ----------------------------------------------------------------------------


def mlp_params(seed: int = 0) -> dict:
  k = jax.random.split(jax.random.key(seed), 3)
  return {
    "w1": jax.random.normal(k[0], (FEATURES, HIDDEN)) / 4,
    "b1": jax.random.normal(k[1], (HIDDEN,)) * 0.1,
    "w2": jax.random.normal(k[2], (HIDDEN, CLASSES)) / 6,
    "b2": jnp.zeros((CLASSES,)),
    # No axis divisible by 8: replicated under FSDP.
    "scale": jnp.array(1.2, jnp.float32),
    "gain": jnp.array([1.0, 0.9, 1.1], jnp.float32),
  }


def mlp_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  logits = p["scale"] * (h @ p["w2"] + p["b2"]) * jnp.mean(p["gain"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


CNN_IMAGE = (4, 4, 1)


def cnn_params(seed: int = 0) -> dict:
  k = jax.random.split(jax.random.key(seed), 2)
  return {
    "conv": jax.random.normal(k[0], (3, 3, 1, 8)) * 0.3,
    "w": jax.random.normal(k[1], (4 * 4 * 8, CLASSES)) * 0.05,
  }


def cnn_loss(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  h = jax.lax.conv_general_dilated(
    x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  logits = jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def batches(steps: int, shape=(FEATURES,), seed: int = 1):
  rng = np.random.default_rng(seed)
  return [
    (
      rng.normal(size=(BATCH, *shape)).astype(np.float32),
      rng.integers(0, CLASSES, BATCH).astype(np.int32),
    )
    for _ in range(steps)
  ]


# ----------------------------------------------------------------------------
# Meshes, shardings, comparisons.
# ----------------------------------------------------------------------------


def make_mesh(axis_type: AxisType = AxisType.Auto) -> jax.sharding.Mesh:
  return jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))


def fsdp_spec(x, n: int = NUM_DEVICES) -> P:
  """Shards the largest axis divisible by `n` over 'data'; else replicates."""
  axes = [i for i, d in enumerate(np.shape(x)) if d % n == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda i: np.shape(x)[i])
  return P(*[("data" if i == axis else None) for i in range(np.ndim(x))])


def shardings(tree, sharding_of: Callable) -> object:
  return jax.tree.map(sharding_of, tree)


def assert_close(actual, expected, what: str, rtol=RTOL, atol=ATOL) -> float:
  """allclose leaf by leaf; returns the largest absolute difference."""
  errs = []

  def one(a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)
    errs.append(float(np.max(np.abs(a - e), initial=0.0)))

  jax.tree.map(one, actual, expected)
  return max(errs, default=0.0)


def flat(tree) -> np.ndarray:
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)


def each(names, check: Callable[[str], float]) -> dict[str, Callable[[], float]]:
  return {name: functools.partial(check, name) for name in names}


def once(fn: Callable) -> Callable:
  """`functools.cache` that also remembers an exception: a broken program is
  compiled once, and every check that needs it reports the same error."""
  memo: dict = {}

  @functools.wraps(fn)
  def wrapper(*args):
    if args not in memo:
      try:
        memo[args] = (True, fn(*args))
      except Exception as e:  # noqa: BLE001 - re-raised to each caller
        memo[args] = (False, e)
    ok, value = memo[args]
    if not ok:
      raise value
    return value

  return wrapper


# ----------------------------------------------------------------------------
# jit + NamedSharding: nothing to pass, the single-device result.
# ----------------------------------------------------------------------------


def train_jit(txs: dict, loss, params, data, param_sharding, batch_sharding):
  """Trains every tx of `txs` on `data`, all in one jitted step function.

  Args:
    param_sharding: `leaf -> Sharding` for the parameters and the states.
    batch_sharding: the sharding of each batch array.

  Returns:
    `{name: (final params, [updates of each step], params shardings)}`.
  """

  def step(ps, ss, x, y):
    def grad_fn(q):
      return jax.grad(loss)(q, x, y)

    new_ps, new_ss, us = {}, {}, {}
    for name, tx in txs.items():
      us[name], new_ss[name] = tx.update(
        grad_fn(ps[name]), ss[name], ps[name], grad_fn=grad_fn
      )
      new_ps[name] = optax.apply_updates(ps[name], us[name])
    return new_ps, new_ss, us

  ps = {name: params for name in txs}
  ss = {name: tx.init(params) for name, tx in txs.items()}
  ps = jax.device_put(ps, shardings(ps, param_sharding))
  ss = jax.device_put(ss, shardings(ss, param_sharding))
  # Fixed output shardings: step 2 reuses step 1's executable.
  step = jax.jit(
    step,
    out_shardings=(
      shardings(ps, param_sharding),
      shardings(ss, param_sharding),
      shardings(ps, param_sharding),
    ),
  )
  updates = {name: [] for name in txs}
  for x, y in data:
    ps, ss, us = step(ps, ss, *jax.device_put((x, y), batch_sharding))
    for name in txs:
      updates[name].append(us[name])
  return {
    name: (ps[name], updates[name], shardings(ps[name], lambda a: a.sharding))
    for name in txs
  }


def single_device(tree_leaf) -> SingleDeviceSharding:
  del tree_leaf
  return SingleDeviceSharding(jax.devices()[0])


@once
def jit_runs() -> dict[str, dict]:
  """Two steps of every transform: single device, replicated, explicit, FSDP."""
  txs = {n: optax.chain(t[0](), optax.sgd(LR)) for n, t in TRANSFORMS.items()}
  params, data = mlp_params(), batches(2)
  auto, explicit = make_mesh(), make_mesh(AxisType.Explicit)

  def batch(m):
    return NamedSharding(m, P("data"))

  return {
    "single": train_jit(
      txs, mlp_loss, params, data, single_device, SingleDeviceSharding(jax.devices()[0])
    ),
    "replicated": train_jit(
      txs, mlp_loss, params, data, lambda _: NamedSharding(auto, P()), batch(auto)
    ),
    "explicit": train_jit(
      txs,
      mlp_loss,
      params,
      data,
      lambda _: NamedSharding(explicit, P()),
      batch(explicit),
    ),
    "fsdp": train_jit(
      txs,
      mlp_loss,
      params,
      data,
      lambda x: NamedSharding(auto, fsdp_spec(x)),
      batch(auto),
    ),
  }


def check_jit(layout: str, name: str) -> float:
  ref_params, ref_updates, _ = jit_runs()["single"][name]
  new_params, updates, layouts = jit_runs()[layout][name]
  # The layout really is data-parallel (replicated) or FSDP.
  specs = [s.spec for s in jax.tree.leaves(layouts)]
  assert all(len(s.device_set) == NUM_DEVICES for s in jax.tree.leaves(layouts))
  if layout == "fsdp":
    assert sum(s != P() for s in specs) == 4, specs  # w1, b1, w2, b2
  else:
    assert all(s == P() for s in specs), specs
  err = assert_close(updates, ref_updates, f"{name}: updates, {layout} vs single")
  return max(err, assert_close(new_params, ref_params, f"{name}: params"))


# ----------------------------------------------------------------------------
# shard_map / pmap with axis_name: averaged, synchronized or local.
# ----------------------------------------------------------------------------


@functools.cache
def _jitted_grads(loss):
  grad = jax.jit(jax.grad(loss))
  hvp = jax.jit(
    lambda p, v, x, y: jax.jvp(lambda q: jax.grad(loss)(q, x, y), (p,), (v,))[1]
  )
  return grad, hvp


class PerShard:
  """The hand-written reference: shard by shard, then averaged.

  The per-shard gradients (and Hessian-vector products, for the exact
  regularizer) are float32 JAX on one shard at a time; everything else
  (norms, perturbations, finite differences, means) is numpy float64 on the
  flattened parameters.
  """

  def __init__(self, loss, params, x, y):
    self.theta, unravel = jax.flatten_util.ravel_pytree(params)
    self.theta = np.asarray(self.theta, np.float64)
    self.tree = lambda v: unravel(jnp.asarray(v, jnp.float32))
    self.xs = np.split(np.asarray(x), NUM_DEVICES)
    self.ys = np.split(np.asarray(y), NUM_DEVICES)
    self._grad, self._hvp = _jitted_grads(loss)

  def grad(self, theta, i: int) -> np.ndarray:
    return flat(self._grad(self.tree(theta), self.xs[i], self.ys[i]))

  def hvp(self, theta, v, i: int) -> np.ndarray:
    return flat(self._hvp(self.tree(theta), self.tree(v), self.xs[i], self.ys[i]))

  def update(self, kind: str, hp: dict, sync: bool, theta=None):
    """Returns (the transform's output, the averaged clean gradient)."""
    theta = self.theta if theta is None else theta
    gs = [self.grad(theta, i) for i in range(NUM_DEVICES)]
    g = np.mean(gs, axis=0)
    dirs = [g] * NUM_DEVICES if sync else gs  # what each device perturbs with

    def mean_grad_at(steps):
      return np.mean([self.grad(theta + s, i) for i, s in enumerate(steps)], axis=0)

    if kind == "gnp":
      g2 = mean_grad_at([hp["rho"] * d / np.linalg.norm(d) for d in dirs])
      return (1 - hp["alpha"]) * g + hp["alpha"] * g2, g
    if kind == "asam":
      t = np.abs(theta) + hp["eta"]
      steps = [hp["rho"] * t**2 * d / np.linalg.norm(t * d) for d in dirs]
      return mean_grad_at(steps), g
    gamma = hp["gamma"]
    if kind == "exact":
      hg = np.mean([self.hvp(theta, d, i) for i, d in enumerate(dirs)], axis=0)
      return g + gamma * hg, g
    eps = hp["epsilon"]
    if kind == "forward":
      return g + gamma / eps * (mean_grad_at([eps * d for d in dirs]) - g), g
    if kind == "backward":
      return g + gamma / eps * (g - mean_grad_at([-eps * d for d in dirs])), g
    hi = mean_grad_at([eps * d for d in dirs])
    lo = mean_grad_at([-eps * d for d in dirs])
    return g + gamma / (2 * eps) * (hi - lo), g


def local_updates(txs: dict, loss, vary: bool) -> Callable:
  """The per-device body: every tx's update from the local batch."""

  def per_device(p, x, y):
    if vary:  # check_vma=True: gradients at varying params are local.
      p = jax.lax.pcast(p, "data", to="varying")

    def grad_fn(q):
      return jax.grad(loss)(q, x, y)

    g = grad_fn(p)
    return {k: tx.update(g, tx.init(p), p, grad_fn=grad_fn)[0] for k, tx in txs.items()}

  return per_device


def shard_map_updates(txs, loss, params, x, y, *, check_vma: bool, vary=None):
  """One update of every tx inside `jax.shard_map` (the batch split 8 ways).

  With `check_vma`, the params are cast to varying (`vary`, by default) so
  that `jax.grad` gives each device its own gradient.
  """
  mesh = make_mesh()
  vary = check_vma if vary is None else vary
  f = jax.jit(
    jax.shard_map(
      local_updates(txs, loss, vary=vary),
      mesh=mesh,
      in_specs=(P(), P("data"), P("data")),
      out_specs=P(),
      check_vma=check_vma,
    )
  )
  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return f(jax.device_put(params, rep), *jax.device_put((x, y), dat))


def pmap_updates(txs, loss, params, x, y):
  """One update of every tx inside `jax.pmap` (params broadcast)."""

  def split(a):
    return a.reshape(NUM_DEVICES, -1, *a.shape[1:])

  out = jax.pmap(
    local_updates(txs, loss, vary=False), axis_name="data", in_axes=(None, 0, 0)
  )(params, split(x), split(y))
  for leaf in jax.tree.leaves(out):  # every device holds the same update
    leaf = np.asarray(leaf)
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  return jax.tree.map(lambda a: a[0], out)


@once
def mapped_problem():
  params, ((x, y),) = mlp_params(), batches(1)
  return params, x, y, PerShard(mlp_loss, params, x, y)


@once
def mapped_run(how: str) -> dict:
  params, x, y, _ = mapped_problem()
  if how == "single":
    single = {n: make() for n, (make, _, _) in TRANSFORMS.items()}

    @jax.jit
    def single_device_updates(p, x, y):
      def grad_fn(q):
        return jax.grad(mlp_loss)(q, x, y)

      return {
        n: tx.update(grad_fn(p), tx.init(p), p, grad_fn=grad_fn)[0]
        for n, tx in single.items()
      }

    return single_device_updates(params, x, y)
  txs = {
    k: TRANSFORMS[n][0](axis_name="data", sync_perturbation=sync)
    for k, (n, sync) in mapped_variants().items()
  }
  if how == "pmap":
    return pmap_updates(txs, mlp_loss, params, x, y)
  return shard_map_updates(
    txs, mlp_loss, params, x, y, check_vma=how == "shard_map check_vma"
  )


def check_mapped(how: str, variant: str) -> float:
  name, sync = mapped_variants()[variant]
  _, kind, hp = TRANSFORMS[name]
  reference = mapped_problem()[3]
  out = mapped_run(how)[variant]
  expected, _ = reference.update(kind, hp, sync)
  err = assert_close(flat(out), expected, f"{variant}: {how} vs per-shard reference")
  if sync:  # The synchronized perturbation is the single-device result.
    single = mapped_run("single")[name]
    err = max(err, assert_close(out, single, f"{variant}: vs single device"))
  else:  # m-sharpness really is another update than the synchronized one.
    synced, _ = reference.update(kind, hp, True)
    assert np.max(np.abs(synced - expected)) > 1e3 * ATOL, "local == synced"
  return err


# ----------------------------------------------------------------------------
# every_k under sharding: 6 steps of sam(every_k=3).
# ----------------------------------------------------------------------------

EVERY_K, RHO, STEPS = 3, 0.1, 6


def sam_every_k(**kw):
  return optax.chain(gx.sam(RHO, every_k=EVERY_K, **kw), optax.sgd(LR))


@once
def every_k_jit_runs() -> dict[str, dict]:
  txs = {
    "sam": sam_every_k(),
    "fdgr_central": optax.chain(
      gx.finite_difference_gr(0.1, 0.01, scheme="central", every_k=2), optax.sgd(LR)
    ),
  }
  params, data = mlp_params(), batches(STEPS)
  mesh = make_mesh()
  batch = NamedSharding(mesh, P("data"))
  return {
    "single": train_jit(
      txs, mlp_loss, params, data, single_device, SingleDeviceSharding(jax.devices()[0])
    ),
    "replicated": train_jit(
      txs, mlp_loss, params, data, lambda _: NamedSharding(mesh, P()), batch
    ),
    "fsdp": train_jit(
      txs, mlp_loss, params, data, lambda x: NamedSharding(mesh, fsdp_spec(x)), batch
    ),
  }


def check_every_k_jit(layout: str, name: str) -> float:
  ref_params, ref_updates, _ = every_k_jit_runs()["single"][name]
  new_params, updates, _ = every_k_jit_runs()[layout][name]
  err = assert_close(updates, ref_updates, f"{name} every_k: updates, {layout}")
  return max(err, assert_close(new_params, ref_params, f"{name} every_k: params"))


def train_shard_map(txs, loss, params, data, *, check_vma: bool):
  """`len(data)` steps of each tx inside shard_map; returns {name: updates}."""
  mesh = make_mesh()

  def step(ps, ss, x, y):
    def grad_fn(q):
      return jax.grad(loss)(q, x, y)

    new_ps, new_ss, us = {}, {}, {}
    for name, tx in txs.items():
      p = ps[name]
      pv = jax.lax.pcast(p, "data", to="varying") if check_vma else p
      us[name], new_ss[name] = tx.update(grad_fn(pv), ss[name], pv, grad_fn=grad_fn)
      new_ps[name] = optax.apply_updates(p, us[name])
    return new_ps, new_ss, us

  step = jax.jit(
    jax.shard_map(
      step,
      mesh=mesh,
      in_specs=(P(), P(), P("data"), P("data")),
      out_specs=P(),
      check_vma=check_vma,
    )
  )
  rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  ps = jax.device_put({name: params for name in txs}, rep)
  ss = jax.device_put({name: tx.init(params) for name, tx in txs.items()}, rep)
  updates = {name: [] for name in txs}
  for x, y in data:
    ps, ss, us = step(ps, ss, *jax.device_put((x, y), dat))
    for name in txs:
      updates[name].append(us[name])
  return updates


@once
def every_k_shard_map_runs(model: str) -> dict:
  if model == "mlp":
    loss, params, data = mlp_loss, mlp_params(), batches(STEPS)
  else:
    loss, params, data = cnn_loss, cnn_params(), batches(STEPS, CNN_IMAGE)
  txs = {
    "sync": sam_every_k(axis_name="data"),
    "local": sam_every_k(axis_name="data", sync_perturbation=False),
  }
  # The CNN goes through check_vma=True (params cast to varying).
  out = train_shard_map(txs, loss, params, data, check_vma=model == "cnn")
  single = train_jit(
    {"sam": sam_every_k()},
    loss,
    params,
    data,
    single_device,
    SingleDeviceSharding(jax.devices()[0]),
  )
  return dict(out, single=single["sam"][1], loss=loss, params=params, data=data)


def check_every_k_shard_map(model: str, mode: str) -> float:
  runs = every_k_shard_map_runs(model)
  if mode == "sync":  # Equals the single-device run (no axis_name).
    return assert_close(runs["sync"], runs["single"], f"{model}: every_k shard_map")
  # m-sharpness: replay by hand; refresh on steps 0 and 3, reuse g' - g.
  theta, d, err = flat(runs["params"]), None, 0.0
  for t, (x, y) in enumerate(runs["data"]):
    ref = PerShard(runs["loss"], runs["params"], x, y)
    if t % EVERY_K == 0:
      sam_out, g = ref.update("gnp", dict(rho=RHO, alpha=1.0), False, theta)
      d = sam_out - g
    else:
      g = np.mean([ref.grad(theta, i) for i in range(NUM_DEVICES)], axis=0)
    u = -LR * (g + d)
    err = max(
      err,
      assert_close(
        flat(runs["local"][t]),
        u,
        f"{model}: every_k m-sharpness, step {t}",
        atol=1e-5 if t else ATOL,
      ),
    )
    theta = theta + u
  return err


# ----------------------------------------------------------------------------
# shard_map with check_vma=True and replicated params: an error, not a result.
# ----------------------------------------------------------------------------


def check_vma_reduced(case: str) -> float:
  """Replicated params under shard_map(check_vma=True): JAX reduces the grad.

  `local_loss`: `jax.grad` of the local loss w.r.t. replicated params is the
  *sum* over the devices (the broadcast's transpose is a psum); the
  transform's `pmean` of an invariant value does nothing, so the update is
  8x the single-device one. `pmean_loss`, with `sync_perturbation=False`: the
  gradient is the global mean, no device has its own, and the transform
  silently takes the synchronized perturbation instead of m-sharpness.
  Either way the transform cannot do what `axis_name` promises, so it raises
  a ValueError that names `axis_name` at trace time (the gradient is
  invariant over the axis while `jax.lax.axis_index(axis_name)` varies).
  """
  sync = case == "local_loss"
  txs = {"sam": gx.sam(0.1, axis_name="data", sync_perturbation=sync)}
  params, ((x, y),) = mlp_params(), batches(1)

  def pmean_loss(p, x, y):
    return jax.lax.pmean(mlp_loss(p, x, y), "data")

  loss = mlp_loss if case == "local_loss" else pmean_loss
  try:
    out = shard_map_updates(txs, loss, params, x, y, check_vma=True, vary=False)
  except ValueError as e:
    if "axis_name" in str(e):  # the library's own error, naming the argument
      return 0.0
    raise
  expected, _ = PerShard(mlp_loss, params, x, y).update(
    "gnp", dict(rho=0.1, alpha=1.0), sync
  )
  got = flat(out["sam"])
  raise AssertionError(
    f"no ValueError, and the update is not the per-shard reference: "
    f"|update| / |reference| = {np.linalg.norm(got) / np.linalg.norm(expected):.3f}, "
    f"max abs difference {np.max(np.abs(got - expected)):.3g}"
  )


# ----------------------------------------------------------------------------
# Explicit sharding: FSDP params on an Explicit mesh, donated, every_k / inject.
# ----------------------------------------------------------------------------


def _inject(name: str):
  kw = dict(TRANSFORMS[name][2])
  if name == "sam":
    kw.pop("alpha")
  make = {
    "penalized_grad": gx.penalized_grad,
    "sam": gx.sam,
    "sam_adaptive": functools.partial(gx.sam, adaptive=True),
    "fdgr_forward": functools.partial(gx.finite_difference_gr, scheme="forward"),
    "fdgr_backward": functools.partial(gx.finite_difference_gr, scheme="backward"),
    "fdgr_central": functools.partial(gx.finite_difference_gr, scheme="central"),
    "gradient_regularization": gx.gradient_regularization,
  }[name]
  return optax.inject_hyperparams(make)(**kw)


def explicit_variants() -> dict[str, Callable[[], optax.GradientTransformation]]:
  out = {}
  for name, (factory, _, _) in TRANSFORMS.items():
    out[f"{name} every_k=3"] = functools.partial(factory, every_k=3)
    out[f"{name} inject"] = functools.partial(_inject, name)
  return out


def gathered_loss(p, x, y):
  """`mlp_loss` with FSDP params all-gathered first (explicit sharding)."""
  return mlp_loss(jax.tree.map(lambda w: jax.sharding.reshard(w, P()), p), x, y)


def _train_donated(make, loss, params, data, sharding_of, batch_sharding):
  tx = optax.chain(make(), optax.sgd(LR))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, s, x, y):
    def grad_fn(q):
      return jax.grad(loss)(q, x, y)

    u, s = tx.update(grad_fn(p), s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s

  # A copy: device_put to where an array already is returns it, and it is
  # donated below.
  p = jax.device_put(jax.tree.map(jnp.copy, params), shardings(params, sharding_of))
  s = tx.init(p)
  for x, y in data:
    p, s = step(p, s, *jax.device_put((x, y), batch_sharding))
  return p, s


@once
def explicit_runs() -> dict[str, tuple]:
  mesh = make_mesh(AxisType.Explicit)
  params, data = mlp_params(), batches(4)
  out = {}
  for name, make in explicit_variants().items():
    single = _train_donated(
      make,
      mlp_loss,
      params,
      data,
      single_device,
      SingleDeviceSharding(jax.devices()[0]),
    )
    with jax.set_mesh(mesh):
      sharded = _train_donated(
        make,
        gathered_loss,
        params,
        data,
        lambda x: NamedSharding(mesh, fsdp_spec(x)),
        NamedSharding(mesh, P("data")),
      )
    out[name] = (single, sharded)
  return out


def check_explicit(name: str) -> float:
  (ref_p, _), (p, s) = explicit_runs()[name]
  specs = {k: v.sharding.spec for k, v in p.items()}
  assert sum(any(a is not None for a in spec) for spec in specs.values()) == 4, specs
  # The every_k cache keeps each parameter's sharding.
  caches = [x for x in jax.tree.leaves(s) if x.ndim]
  assert caches and all(c.sharding.spec in set(specs.values()) for c in caches), caches
  return assert_close(p, ref_p, f"{name}: params, explicit FSDP vs single")


# ----------------------------------------------------------------------------
# Registry and command line.
# ----------------------------------------------------------------------------

GROUPS: dict[str, dict[str, Callable[[], float]]] = {
  "jit": {
    **{
      f"replicated {k}": v
      for k, v in each(TRANSFORMS, functools.partial(check_jit, "replicated")).items()
    },
    **{
      f"explicit-mesh replicated {k}": v
      for k, v in each(TRANSFORMS, functools.partial(check_jit, "explicit")).items()
    },
    **{
      f"fsdp {k}": v
      for k, v in each(TRANSFORMS, functools.partial(check_jit, "fsdp")).items()
    },
  },
  "mapped": {
    **{
      f"shard_map {k}": v
      for k, v in each(
        mapped_variants(), functools.partial(check_mapped, "shard_map")
      ).items()
    },
    **{
      f"shard_map check_vma {k}": v
      for k, v in each(
        mapped_variants(), functools.partial(check_mapped, "shard_map check_vma")
      ).items()
    },
    **{
      f"pmap {k}": v
      for k, v in each(
        mapped_variants(), functools.partial(check_mapped, "pmap")
      ).items()
    },
  },
  "every_k": {
    **{
      f"jit {layout} {name}": functools.partial(check_every_k_jit, layout, name)
      for layout in ("replicated", "fsdp")
      for name in ("sam", "fdgr_central")
    },
    **{
      f"shard_map {model} {mode}": functools.partial(
        check_every_k_shard_map, model, mode
      )
      for model in ("mlp", "cnn")
      for mode in ("sync", "local")
    },
  },
  "explicit": each(explicit_variants(), check_explicit),
  "reduced": {
    **{
      f"reduced gradient {case}": functools.partial(check_vma_reduced, case)
      for case in ("local_loss", "pmean_loss")
    },
  },
}


def run(groups: list[str]) -> list[dict]:
  if jax.device_count() != NUM_DEVICES:
    raise SystemExit(
      f"expected {NUM_DEVICES} devices, got {jax.device_count()}: run this file "
      "as a script (it sets XLA_FLAGS before JAX starts)"
    )
  results = []
  for group in groups:
    for name, check in GROUPS[group].items():
      try:
        err, ok, message = check(), True, ""
      except Exception as e:  # reported, not raised: one line per check
        err, ok = None, False
        message = "".join(traceback.format_exception_only(e)).strip()
        if not isinstance(e, AssertionError):
          message += "\n" + "".join(traceback.format_tb(e.__traceback__)[-4:])
      result = dict(group=group, name=name, ok=ok, message=message, max_abs_err=err)
      print(json.dumps(result), flush=True)
      results.append(result)
  return results


if __name__ == "__main__":
  unknown = [g for g in sys.argv[1:] if g not in GROUPS]
  if unknown or not sys.argv[1:]:
    raise SystemExit(f"usage: {sys.argv[0]} GROUP...; groups: {', '.join(GROUPS)}")
  run(sys.argv[1:])
