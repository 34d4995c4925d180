"""The benchmarks' training harness: one (method, seed) run, and statistics over seeds.

Used by ``generalization.py`` and ``agr.py``. It builds the optimizer of a
method name, trains one of the example models (``gnorm_optax.examples.models``)
on a registered data set with an ``nnx.jit`` train step, evaluates it, and
measures the final full-batch gradient norm and top Hessian eigenvalue
(``gx.hessian_top_eigenvalue``) on a fixed probe subset of the training set;
with ``RunConfig(spectrum=True)`` also the top five eigenvalues, the
eigenvalue density by stochastic Lanczos quadrature and a 1-D loss slice along
a filter-normalized random direction.
Around it: running many configurations (with an optional JSON cache of
finished runs), mean ± std over seeds, and paired by-seed comparisons.

Only the public API is used: ``gnorm_optax`` (as ``gx``),
``gnorm_optax.flax.nnx_grad_fn``, and the examples' ``data`` and ``models``.

A data set is an entry of ``DATASETS``: a loader ``(label_noise, seed) ->
Dataset``, its number of classes and any model arguments it needs; the
model's input shape is read from the data. ``RunConfig(dataset=...)`` selects
one: ``digits`` or ``mnist1d``.

An MLP trains one epoch per call, as a ``lax.scan`` over its steps (the same
batches and values as a step per call, several times faster for small
models). Convolutional models take one ``nnx.jit`` call per step: XLA:CPU
compiles convolutions inside a loop body off its fast path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gnorm_optax as gx
from gnorm_optax.examples import data
from gnorm_optax.examples import models
from gnorm_optax.flax import nnx_grad_fn
from gnorm_optax.flax import nnx_value_fn


class DataSpec(NamedTuple):
  """A registered data set.

  Attributes:
    load: ``load(label_noise, seed) -> data.Dataset``; the seed fixes the
      split and the label noise.
    num_classes: number of classes (the model's output logits).
    model_kwargs: extra constructor arguments by model name (none so far:
      the MLP is already the MNIST-1D paper's 100 wide on 1-D signals).
  """

  load: Callable[[float, int], data.Dataset]
  num_classes: int
  model_kwargs: dict[str, dict[str, Any]] = {}


DATASETS: dict[str, DataSpec] = {
  "digits": DataSpec(
    lambda noise, seed: data.load_digits(label_noise=noise, seed=seed),
    data.NUM_CLASSES,
  ),
  # The MLP on these signals is the paper's 40-100-100-10.
  "mnist1d": DataSpec(
    lambda noise, seed: data.load_mnist1d(label_noise=noise, seed=seed),
    data.NUM_CLASSES,
  ),
}

# Methods built as `chain(<gradient transform>, sgd with momentum)`.
SGD_METHODS = ("sgd", "sam", "gnp", "gsam", "sam_ae", "fdgr", "bdgr", "gr", "flooding")
# Complete Adam-type optimizers (AGR and the plain ones it goes in front of).
ADAPTIVE_METHODS = ("adam", "adamw", "agr_adamw", "adan", "agr_adan")
METHODS = SGD_METHODS + ADAPTIVE_METHODS
# SAM with the extra gradient on one step in k, reusing `reuse` in between:
# "sam_k5_correction", "sam_k10_looksam" (in front of SGD, as "sam").
SAM_EVERY_K = re.compile(r"sam_k(\d+)_(correction|looksam)")
_EVAL_CHUNK = 1000  # test samples per forward pass in `evaluate`
_SCAN_MODELS = ("mlp",)  # trained an epoch per call (no convolution)
TOP_K = 5  # eigenvalues of the spectrum diagnostics


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one training run depends on.

  The defaults are the README's main setting: the digits CNN on 20% noisy
  labels, 60 epochs of SGD with momentum 0.9, batch 64, a learning rate
  cosine-decayed from 0.02 (3e-3 for the Adam-type methods).

  Attributes:
    method: optimizer, one of ``METHODS``.
    seed: fixes the split, the label noise, the weights and the batch order.
    dataset: a key of ``DATASETS``.
    model: a key of ``models.MODELS``.
    epochs: passes over the training set.
    batch_size: mini-batch size (the last incomplete batch is dropped).
    lr: peak learning rate; None: ``default_lr(method)``.
    momentum: heavy-ball momentum of the SGD methods.
    rho: perturbation radius of ``sam`` and ``gnp``.
    alpha: GNP's mix between the clean and the perturbed gradient.
    gamma: penalty strength of ``gr``, ``fdgr`` and ``bdgr``.
    epsilon: finite-difference step of ``fdgr`` and ``bdgr``.
    flood_level: flood level of ``flooding``.
    label_noise: fraction of training labels replaced by a wrong class.
    train_size: keep the first this many training samples (None: all).
    test_size: keep the first this many test samples (None: all).
    val_fraction: if > 0, the last this fraction of the training set is held
      out and takes the test set's place (noisy labels, as a practitioner's
      validation set has): the hyperparameter search runs there, never on
      the test set.
    schedule: ``"cosine"`` (decayed to 0 over the run) or ``"constant"``.
    probe_size: the first this many training samples (noisy labels) are the
      probe set of the final gradient norm and Hessian eigenvalue; 0 skips.
    hessian_iters: the most Lanczos steps for the eigenvalue; 0 skips it.
    spectrum: also measure the top ``TOP_K`` eigenvalues, the SLQ density
      and a 1-D filter-normalized loss slice on the probe set.
  """

  method: str = "sgd"
  seed: int = 0
  dataset: str = "digits"
  model: str = "cnn"
  epochs: int = 60
  batch_size: int = 64
  lr: float | None = None
  momentum: float = 0.9
  rho: float = 0.15
  alpha: float = 0.8
  gamma: float = 0.05
  epsilon: float = 0.01
  flood_level: float = 1.0
  label_noise: float = 0.2
  train_size: int | None = None
  test_size: int | None = None
  val_fraction: float = 0.0
  schedule: str = "cosine"
  probe_size: int = 512
  hessian_iters: int = 20
  spectrum: bool = False


def default_lr(method: str) -> float:
  """Peak learning rate when none is given: 0.02 for SGD methods, 3e-3 for Adam.

  Args:
    method: one of ``METHODS``.

  Returns:
    The peak learning rate.
  """
  return 3e-3 if method in ADAPTIVE_METHODS else 0.02


@functools.cache
def make_optimizer(
  method: str,
  lr: float,
  steps: int,
  *,
  momentum: float = RunConfig.momentum,
  rho: float = RunConfig.rho,
  alpha: float = RunConfig.alpha,
  gamma: float = RunConfig.gamma,
  epsilon: float = RunConfig.epsilon,
  flood_level: float = RunConfig.flood_level,
  schedule: str = RunConfig.schedule,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optimizer of ``method`` with a cosine-decayed learning rate.

  Args:
    method: one of ``METHODS``, or ``sam_k<k>_<reuse>`` (``gx.sam`` with
      ``every_k=k`` and ``reuse`` ``correction`` or ``looksam``).
    lr: peak learning rate.
    steps: total optimizer steps (the length of the cosine decay).
    momentum: heavy-ball momentum of the SGD methods.
    rho: perturbation radius of ``sam`` and ``gnp``.
    alpha: GNP's mix between the clean and the perturbed gradient.
    gamma: penalty strength of ``gr``, ``fdgr`` and ``bdgr``.
    epsilon: finite-difference step of ``fdgr`` and ``bdgr``.
    flood_level: flood level of ``flooding``.
    schedule: ``"cosine"`` or ``"constant"`` learning rate.

  Returns:
    A transformation whose ``update`` takes ``grad_fn`` and ``value`` keyword
    arguments (ignored where unused). Equal arguments give the same object,
    so runs that differ only in their seed reuse the compiled train step.

  Raises:
    ValueError: for an unknown method.
  """
  if schedule not in ("cosine", "constant"):
    raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
  lr_schedule = (
    optax.cosine_decay_schedule(lr, decay_steps=steps)
    if schedule == "cosine"
    else optax.constant_schedule(lr)
  )
  adaptive = {
    "adam": lambda: optax.adam(lr_schedule),
    "adamw": lambda: optax.adamw(lr_schedule),
    "agr_adamw": lambda: gx.agr_adamw(lr_schedule),
    # The paper's Adan, which gx.agr_adan puts AGR in front of.
    "adan": lambda: gx.adan(lr_schedule),
    "agr_adan": lambda: gx.agr_adan(lr_schedule),
  }
  if method in adaptive:
    return optax.with_extra_args_support(adaptive[method]())
  gradient = {
    "sgd": optax.identity,
    "sam": lambda: gx.sam(rho),
    "gnp": lambda: gx.penalized_grad(rho, alpha),
    "gsam": lambda: gx.gsam(rho),
    # AE-SAM's policy, at a constant threshold (the extra gradient when
    # ||g||^2 is above its running mean).
    "sam_ae": lambda: gx.sam(rho, ae_threshold=0.0),
    "fdgr": lambda: gx.finite_difference_gr(gamma, epsilon, scheme="forward"),
    "bdgr": lambda: gx.finite_difference_gr(gamma, epsilon, scheme="backward"),
    "gr": lambda: gx.gradient_regularization(gamma),
    "flooding": lambda: gx.flooding(flood_level),
  }
  if every_k := SAM_EVERY_K.fullmatch(method):
    gradient[method] = lambda: gx.sam(rho, every_k=int(every_k[1]), reuse=every_k[2])
  if method not in gradient:
    raise ValueError(
      f"unknown method {method!r}; choose from {METHODS} or sam_k<k>_<reuse>"
    )
  return optax.chain(gradient[method](), optax.sgd(lr_schedule, momentum=momentum))


def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on the batch ``(x, y)``."""
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(
  model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
  """Takes one optimizer step on ``(x, y)`` in place; returns the batch loss.

  ``grad_fn`` (the gradient of the same batch loss at other parameters, for
  SAM, GNP and GR) is built before the clean pass, so the extra passes never
  change the model's state.
  """
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
  return loss


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def scan_epoch(graphdef, state, x, y, order):
  """One epoch as a ``lax.scan`` of ``train_step``'s body over ``order``'s rows.

  ``state`` is ``nnx.split((model, optimizer))``'s; each row of ``order``
  indexes one batch of ``(x, y)``. Returns the new state and the losses.
  """

  def step(state, idx):
    model, optimizer = nnx.merge(graphdef, state)
    xb, yb = x[idx], y[idx]
    grad_fn = nnx_grad_fn(model, loss_fn, xb, yb)
    loss, grads = nnx.value_and_grad(loss_fn)(model, xb, yb)
    optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
    return nnx.state((model, optimizer)), loss

  return jax.lax.scan(step, state, order)


@nnx.jit
def _count_correct(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return (model(x).argmax(axis=-1) == y).sum()


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
  """Accuracy of ``model`` on ``(x, y)``, in evaluation mode (left there)."""
  model.eval()
  correct = sum(
    int(_count_correct(model, x[i : i + _EVAL_CHUNK], y[i : i + _EVAL_CHUNK]))
    for i in range(0, len(y), _EVAL_CHUNK)
  )
  return correct / len(y)


@functools.partial(nnx.jit, static_argnames="num_iters")
def _flatness(model, x, y, key, num_iters):
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.leaves(grad_fn(params))
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
  if num_iters == 0:
    return grad_norm, jnp.full((), jnp.nan)
  top = gx.hessian_top_eigenvalue(grad_fn, params, key=key, num_iters=num_iters)
  return grad_norm, top


# The spectrum diagnostics: Lanczos steps for the top eigenvalues, SLQ probes
# and steps, and the loss slice's grid.
SPECTRUM = dict(top_iters=40, slq_probes=3, slq_iters=24, slice_points=21, span=1.0)


@nnx.jit
def _spectrum(model, x, y, key):
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  value_fn = nnx_value_fn(model, loss_fn, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  k_top, k_slq, k_slice = jax.random.split(key, 3)
  top = gx.hessian_top_eigenvalues(
    grad_fn, params, key=k_top, k=TOP_K, num_iters=SPECTRUM["top_iters"]
  )
  slq = gx.hessian_spectral_density(
    grad_fn,
    params,
    key=k_slq,
    num_probes=SPECTRUM["slq_probes"],
    num_iters=SPECTRUM["slq_iters"],
  )
  landscape = gx.loss_landscape(
    value_fn,
    params,
    key=k_slice,
    num_points=SPECTRUM["slice_points"],
    span=SPECTRUM["span"],
  )
  n = sum(p.size for p in jax.tree.leaves(params))
  return (
    top,
    slq.nodes,
    slq.weights,
    n * slq.moment(1),
    landscape.coords,
    landscape.values,
  )


def spectrum(
  model: nnx.Module, x: np.ndarray, y: np.ndarray, *, key: jax.Array
) -> dict[str, Any]:
  """Top eigenvalues, SLQ density and a 1-D loss slice of the loss on ``(x, y)``.

  In evaluation mode (left there). The slice is along one filter-normalized
  random direction ``d`` (Li et al., 2018): ``L(theta + a d)`` for ``a`` in
  ``[-1, 1]``; ``slice_rise`` is the mean of ``L(theta + a d) - L(theta)`` at
  ``a = -0.5`` and ``0.5`` (a step of half of every filter's norm).

  Args:
    model: the classifier.
    x: probe inputs.
    y: probe labels.
    key: seeds the Lanczos start, the SLQ probes and the direction.

  Returns:
    ``{"hessian_top_eigenvalues" (TOP_K, descending), "slq_nodes",
    "slq_weights" (probes x steps), "slq_trace" (n times the first moment),
    "slice_coords", "slice_values", "slice_rise"}`` as lists and floats.
  """
  model.eval()
  out = jax.device_get(_spectrum(model, x, y, key))
  top, nodes, weights, trace, coords, values = out
  centre, half = len(coords) // 2, len(coords) // 4
  rise = 0.5 * (values[centre - half] + values[centre + half]) - values[centre]
  return {
    "hessian_top_eigenvalues": [float(v) for v in top],
    "slq_nodes": np.asarray(nodes).tolist(),
    "slq_weights": np.asarray(weights).tolist(),
    "slq_trace": float(trace),
    "slice_coords": np.asarray(coords).tolist(),
    "slice_values": np.asarray(values).tolist(),
    "slice_rise": float(rise),
  }


def flatness(
  model: nnx.Module,
  x: np.ndarray,
  y: np.ndarray,
  *,
  key: jax.Array,
  hessian_iters: int,
) -> dict[str, float | None]:
  """Full-batch gradient norm and top Hessian eigenvalue of the loss on ``(x, y)``.

  The model is in evaluation mode, so the loss is a deterministic function of
  the parameters.

  Args:
    model: the classifier; left in evaluation mode.
    x: probe inputs.
    y: probe labels.
    key: start vector of the Lanczos iteration.
    hessian_iters: the most Lanczos steps; 0 skips the eigenvalue.

  Returns:
    ``{"grad_norm", "hessian_top_eigenvalue"}``; None where skipped.
  """
  model.eval()
  if len(y) == 0:
    return {"grad_norm": None, "hessian_top_eigenvalue": None}
  grad_norm, top = _flatness(model, x, y, key, hessian_iters)
  return {
    "grad_norm": float(grad_norm),
    "hessian_top_eigenvalue": float(top) if hessian_iters else None,
  }


def load(config: RunConfig) -> data.Dataset:
  """The data set of ``config``, cut to ``train_size`` / ``test_size``.

  With ``val_fraction > 0`` the last ``round(val_fraction * n)`` of the
  ``n`` training samples are the returned test set (with their noisy
  labels), and the real test set is not returned.
  """
  if config.dataset not in DATASETS:
    raise ValueError(
      f"unknown dataset {config.dataset!r}; choose from {sorted(DATASETS)}"
    )
  ds = DATASETS[config.dataset].load(config.label_noise, config.seed)
  x, y = ds.x_train[: config.train_size], ds.y_train[: config.train_size]
  if config.val_fraction > 0:
    n_val = round(config.val_fraction * len(y))
    if not 0 < n_val < len(y):
      raise ValueError(
        f"val_fraction must leave both parts non-empty, got {config.val_fraction}"
      )
    return data.Dataset(
      x[:-n_val],
      y[:-n_val],
      x[-n_val:][: config.test_size],
      y[-n_val:][: config.test_size],
    )
  return data.Dataset(
    x, y, ds.x_test[: config.test_size], ds.y_test[: config.test_size]
  )


def _params_finite(model: nnx.Module) -> bool:
  params = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))
  return all(bool(jnp.isfinite(p).all()) for p in params)


def train(
  config: RunConfig,
  *,
  on_epoch: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
  """Trains and evaluates one model as ``config`` says.

  Args:
    config: the run's settings.
    on_epoch: called as ``on_epoch(epoch, train_loss, test_accuracy)`` after
      every epoch (epochs count from 1).

  Returns:
    A JSON-serialisable dict: the resolved ``config`` (``lr`` filled in),
    ``num_params``, ``num_train`` / ``num_test`` samples,
    ``steps_per_epoch``, per-step ``step_loss``, per-epoch
    ``train_loss`` (mean over the epoch's batches, noisy labels, training
    mode) and ``test_accuracy``, ``final_train_loss``,
    ``final_test_accuracy``, ``best_test_accuracy``, the final ``grad_norm``
    and ``hessian_top_eigenvalue`` on the probe set, ``diverged`` /
    ``diverged_epoch`` (a run whose epoch loss or parameters are not finite
    stops after that epoch and skips the probe) and ``wall_time_s``.
  """
  start = time.perf_counter()
  if config.lr is None:
    config = dataclasses.replace(config, lr=default_lr(config.method))
  ds = load(config)
  if not 1 <= config.batch_size <= len(ds.x_train):
    raise ValueError(
      f"batch_size must be in [1, {len(ds.x_train)}], got {config.batch_size}"
    )
  per_epoch = len(ds.x_train) // config.batch_size
  spec = DATASETS[config.dataset]
  model = models.make_model(
    config.model,
    config.seed,
    ds.x_train.shape[1:],
    spec.num_classes,
    **spec.model_kwargs.get(config.model, {}),
  )
  tx = make_optimizer(
    config.method,
    config.lr,
    config.epochs * per_epoch,
    momentum=config.momentum,
    rho=config.rho,
    alpha=config.alpha,
    gamma=config.gamma,
    epsilon=config.epsilon,
    flood_level=config.flood_level,
    schedule=config.schedule,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  scan = config.model in _SCAN_MODELS
  if scan:
    x_dev, y_dev = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  batch_rng = np.random.default_rng(config.seed)
  step_loss, train_loss, test_accuracy = [], [], []
  diverged_epoch = None
  for epoch in range(1, config.epochs + 1):
    model.train()
    if scan:  # The batches of `data.iterate_batches`, as indices.
      order = batch_rng.permutation(len(ds.x_train))
      order = order[: per_epoch * config.batch_size].reshape(per_epoch, -1)
      graphdef, state = nnx.split((model, optimizer))
      state, losses = scan_epoch(graphdef, state, x_dev, y_dev, order)
      nnx.update((model, optimizer), state)
    else:
      losses = [
        train_step(model, optimizer, xb, yb)
        for xb, yb in data.iterate_batches(
          ds.x_train, ds.y_train, config.batch_size, batch_rng
        )
      ]
    losses = [float(v) for v in np.asarray(jax.device_get(losses)).ravel()]
    step_loss += losses
    train_loss.append(float(np.mean(losses)))
    test_accuracy.append(evaluate(model, ds.x_test, ds.y_test))
    if on_epoch is not None:
      on_epoch(epoch, train_loss[-1], test_accuracy[-1])
    if not (np.isfinite(train_loss[-1]) and _params_finite(model)):
      diverged_epoch = epoch
      break
  probe = slice(0, 0 if diverged_epoch else config.probe_size)
  diagnostics = flatness(
    model,
    ds.x_train[probe],
    ds.y_train[probe],
    key=jax.random.key(config.seed),
    hessian_iters=config.hessian_iters,
  )
  if config.spectrum and not diverged_epoch and config.probe_size:
    diagnostics |= spectrum(
      model, ds.x_train[probe], ds.y_train[probe], key=jax.random.key(config.seed)
    )
  return finite_or_none(
    {
      "config": dataclasses.asdict(config),
      "num_params": models.count_params(model),
      "num_train": len(ds.x_train),
      "num_test": len(ds.x_test),
      "steps_per_epoch": per_epoch,
      "step_loss": step_loss,
      "train_loss": train_loss,
      "test_accuracy": test_accuracy,
      "final_train_loss": train_loss[-1],
      "final_test_accuracy": test_accuracy[-1],
      "best_test_accuracy": max(test_accuracy),
      **diagnostics,
      "diverged": diverged_epoch is not None,
      "diverged_epoch": diverged_epoch,
      "wall_time_s": time.perf_counter() - start,
    }
  )


def finite_or_none(obj: Any) -> Any:
  """``obj`` with NaN and infinite floats replaced by None (JSON's null)."""
  if isinstance(obj, float):
    return obj if np.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_or_none(v) for v in obj]
  return obj


def run_all(
  runs: Sequence[tuple[str, RunConfig]],
  *,
  cache: pathlib.Path | None = None,
  log: Callable[[str], None] | None = print,
) -> list[dict[str, Any]]:
  """Trains every ``(label, config)`` in order; each result gets its ``label``.

  Args:
    runs: what to train; the label names the variant in tables and plots
      (e.g. ``"GNP alpha=0.5"``), so two variants of one method can differ.
    cache: a JSON file of finished runs, keyed by their config; runs found
      there are not trained again, and each new one is added at once (an
      interrupted sweep resumes where it stopped).
    log: called with one line per finished run (None: silent).

  Returns:
    The results of ``train``, in the order of ``runs``.
  """
  done = json.loads(cache.read_text()) if cache and cache.exists() else {}
  results = []
  for i, (label, config) in enumerate(runs, 1):
    key = json.dumps(dataclasses.asdict(config), sort_keys=True)
    if key not in done:
      done[key] = train(config)
      if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(done))
    r = {**done[key], "label": label}
    results.append(r)
    if log is not None:
      eig = r["hessian_top_eigenvalue"]
      log(
        f"[{i}/{len(runs)}] {label} seed {config.seed}"
        f"{f', noise {config.label_noise:.0%}' if config.label_noise else ''}: "
        f"test acc {r['final_test_accuracy']:.3f}, train loss "
        f"{_num(r['final_train_loss'], '.3f')}, top eig {_num(eig, '.2f')}"
        f"{', DIVERGED' if r['diverged'] else ''}, {r['wall_time_s']:.1f} s"
      )
  return results


def _num(value: float | None, spec: str) -> str:
  return "-" if value is None else format(value, spec)


# ----------------------------------------------------------------------------
# Statistics over seeds.
# ----------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> dict[str, float | None]:
  """Mean and sample standard deviation (0 for one value).

  Args:
    values: one number per seed.

  Returns:
    ``{"mean", "std"}``, both None if there is no value or one is None or
    not finite.
  """
  values = list(values)
  if not values or any(v is None or not np.isfinite(v) for v in values):
    return {"mean": None, "std": None}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std}


def format_mean_std(stat: dict[str, float | None], spec: str, n: int) -> str:
  """``mean ± std`` (just the mean for one seed; ``-`` if None)."""
  if stat["mean"] is None:
    return "-"
  text = format(stat["mean"], spec)
  return text if n == 1 else f"{text} ± {format(stat['std'], spec.lstrip('+'))}"


def by_seed(results: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
  """``{seed: result}`` of one variant's runs."""
  return {r["config"]["seed"]: r for r in results}


def paired(
  a: Iterable[dict[str, Any]],
  b: Iterable[dict[str, Any]],
  key: str = "final_test_accuracy",
  scale: float = 100.0,
) -> dict[str, Any]:
  """Per-seed difference ``a - b`` of ``key`` on the seeds both have.

  A seed fixes the split, the label noise, the initial weights and the batch
  order, the same for every method, so the paired difference removes the
  seed-to-seed spread the two share.

  Args:
    a: one variant's runs.
    b: the reference variant's runs.
    key: the result to compare.
    scale: factor on the differences (100: accuracy in points).

  Returns:
    ``{"seeds", "diffs", "mean", "std", "wins", "ties", "losses"}``; a win is
    ``a`` above ``b`` on a seed.
  """
  ra, rb = by_seed(a), by_seed(b)
  seeds = [s for s in ra if s in rb]
  diffs = [
    None
    if ra[s][key] is None or rb[s][key] is None
    else scale * (ra[s][key] - rb[s][key])
    for s in seeds
  ]
  d = np.array([x for x in diffs if x is not None])
  return {
    "seeds": seeds,
    "diffs": diffs,
    **mean_std(diffs),
    "wins": int((d > 1e-9).sum()),
    "ties": int((np.abs(d) <= 1e-9).sum()),
    "losses": int((d < -1e-9).sum()),
  }


def group(results: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """``{label: runs}``, labels in order of first appearance."""
  out: dict[str, list[dict[str, Any]]] = {}
  for r in results:
    out.setdefault(r["label"], []).append(r)
  return out


# Two-sided 5% critical values of Student's t, by degrees of freedom.
_T_CRIT = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31}


def paired_test(p: dict[str, Any]) -> dict[str, Any]:
  """Paired t-test of a ``paired`` result: is the mean difference beyond noise?

  ``t = mean / (std / sqrt(n))`` over the ``n`` seeds; the difference is
  called one when ``|t|`` exceeds the two-sided 5% critical value of
  Student's t with ``n - 1`` degrees of freedom (2.78 for 5 seeds), i.e. when
  the mean exceeds about 1.2 paired standard deviations at 5 seeds.

  Args:
    p: the output of ``paired``.

  Returns:
    ``p`` with ``"n"``, ``"t"`` (None when undefined) and ``"verdict"``:
    ``"higher"``, ``"lower"``, ``"no difference"`` or ``"n/a"`` (fewer than
    two seeds).
  """
  diffs = [d for d in p["diffs"] if d is not None]
  n = len(diffs)
  if n < 2 or p["mean"] is None:
    return {**p, "n": n, "t": None, "verdict": "n/a"}
  std = float(np.std(diffs, ddof=1))
  if std == 0:
    t = 0.0 if p["mean"] == 0 else float(np.sign(p["mean"]) * np.inf)
  else:
    t = p["mean"] / (std / np.sqrt(n))
  crit = _T_CRIT.get(n - 1, 1.96 + 2.5 / (n - 1))
  verdict = "no difference" if abs(t) <= crit else ("higher" if t > 0 else "lower")
  return {**p, "n": n, "t": t if np.isfinite(t) else None, "verdict": verdict}
