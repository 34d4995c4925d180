"""Trains small image classifiers with flat-minima optimizers and compares them.

``python -m gnorm_optax.examples.train`` with no arguments trains the digits
CNN on 20% noisy labels with SGD, SAM and GNP, for seeds 0, 1 and 2 (per seed
the same data, weights, batches and learning-rate schedule for every method),
and prints a table of test accuracy, final train loss, gradient norm and top
Hessian eigenvalue, mean ± std over the seeds. ``--method all`` or a list
such as ``--method sgd,gr,flooding`` compares other methods, ``--seed 0``
runs one seed. The results (JSON) and the learning curves (PNG) go to
``--out-dir`` (default ``runs/``). See ``--help`` for every option.

Out-of-range arguments (``--batch-size 0``, ``--lr nan``, ``--label-noise 1``,
a ``--batch-size`` above the number of training samples, ...) are refused
before any work with argparse's one-line error and exit status 2.
``--probe-size 0`` skips the final gradient norm and Hessian eigenvalue.

A run whose training loss or parameters stop being finite stops at the end
of that epoch and prints ``<method> seed <s>: diverged at epoch N (loss=nan)``;
its results are still written (``"diverged": true`` and the epoch, JSON
``null`` for the non-finite numbers) and the summary table marks its method
as diverged. The other methods and seeds run on, and the exit status stays 0.

With ``--checkpoint-dir``, each run also records its arguments (all but the
output paths, ``--probe-size`` and ``--hessian-iters``, which only change the
final measurements) in ``run_args.json`` next to its checkpoints. Resuming
it with other arguments would splice two different runs, so it is refused
with an error naming the flags that differ; use a new ``--checkpoint-dir``
or delete the old one.

From Python, ``run(TrainConfig(method="sam"))`` trains one model and returns
its history and diagnostics as a JSON-serialisable dict.

The one thing that differs from a plain Flax NNX training loop is the
``grad_fn`` handed to ``optimizer.update``: SAM, GNP and gradient
regularization need the gradient of the same mini-batch loss at other
(perturbed) parameters. ``gnorm_optax.flax.nnx_grad_fn`` builds it as a pure
function of the parameters before the clean pass, so the extra passes never
change BatchNorm statistics or dropout RNG state.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from tqdm import tqdm

import gnorm_optax as gx
from gnorm_optax.examples import data
from gnorm_optax.examples.models import MODELS, count_params, make_model
from gnorm_optax.flax import nnx_grad_fn

# Methods built as `chain(<gradient transform>, sgd with momentum)`.
SGD_METHODS = ("sgd", "sam", "gnp", "fdgr", "bdgr", "gr", "flooding")
# Methods that are complete Adam-type optimizers.
ADAPTIVE_METHODS = ("agr_adamw", "agr_adan")
METHODS = SGD_METHODS + ADAPTIVE_METHODS
# What the command compares when no --method is given.
DEFAULT_METHODS = ("sgd", "sam", "gnp")
# Per-run numbers that the summary table averages over seeds.
SUMMARY_METRICS = (
    "final_test_accuracy",
    "final_train_loss",
    "grad_norm",
    "hessian_top_eigenvalue",
)
_EVAL_CHUNK = 1000  # test samples per forward pass in `evaluate`
# Training samples of each data set (digits: 1797 minus the 25% test split),
# so that the command line can check --batch-size before loading anything.
TRAIN_SET_SIZES = {"digits": 1348, "mnist": 60_000, "fashion_mnist": 60_000,
                   "cifar10": 50_000}  # fmt: skip
# The file in a run's checkpoint directory that records its arguments, and the
# TrainConfig fields left out of it (they do not change the training).
RUN_ARGS_FILE = "run_args.json"
_NOT_RUN_ARGS = ("data_dir", "checkpoint_dir", "probe_size", "hessian_iters")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything one training run depends on.

  Attributes:
    method: optimizer, one of ``METHODS``.
    model: architecture, a key of ``models.MODELS``.
    dataset: one of ``data.DATASETS``.
    epochs: passes over the training set.
    batch_size: mini-batch size.
    lr: peak learning rate of the cosine schedule; None picks
      ``default_lr(method)``.
    momentum: heavy-ball momentum of the SGD methods.
    rho: perturbation radius of ``sam`` and ``gnp``.
    alpha: GNP's mix between the clean and the perturbed gradient.
    gamma: gradient-norm penalty strength of ``gr``, ``fdgr`` and ``bdgr``.
    epsilon: finite-difference step of ``fdgr`` and ``bdgr``.
    flood_level: training loss level that ``flooding`` floats around. The
      default suits 20% label noise, where even the true classes cost about
      0.94 nats of cross-entropy on the noisy labels.
    label_noise: fraction of training labels replaced by a wrong class.
    train_size: keep at most this many training samples (None: all).
    test_size: keep at most this many test samples (None: all).
    probe_size: number of training samples (the first ones, with their noisy
      labels) on which the final gradient norm and Hessian eigenvalue are
      measured; 0 skips both (the results then hold None).
    hessian_iters: the most Lanczos steps for the top Hessian eigenvalue; 0
      skips it (the result then holds None).
    seed: seed for the split, the label noise, the weights and the batches.
    data_dir: where downloaded data sets are cached (None: the data module's
      default); digits needs none.
    checkpoint_dir: if set, the run saves its model, optimizer state (with
      the every_k cache and counters), batch-order RNG and history there
      after every epoch with orbax-checkpoint, in a sub-directory named after
      the data set, model, method and seed, and resumes from the latest
      checkpoint when one is present; the resumed run continues exactly as an
      uninterrupted one. The run's arguments are recorded there too
      (``RUN_ARGS_FILE``), and resuming with other ones raises a ValueError.
  """

  method: str = "sam"
  model: str = "cnn"
  dataset: str = "digits"
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
  probe_size: int = 512
  hessian_iters: int = 20
  seed: int = 0
  data_dir: str | None = None
  checkpoint_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
  """A comparison: every method, every seed, all other settings shared.

  Attributes:
    methods: the methods to compare, each in ``METHODS``.
    seeds: the seeds to average over.
    config: the shared settings; its ``method`` and ``seed`` are replaced.
    out_dir: directory for the JSON results and the PNG learning curves.
  """

  methods: tuple[str, ...] = DEFAULT_METHODS
  seeds: tuple[int, ...] = (0, 1, 2)
  config: TrainConfig = TrainConfig()
  out_dir: str = "runs"

  def configs(self) -> list[TrainConfig]:
    """Returns one config per (method, seed), methods in the outer loop."""
    return [
        dataclasses.replace(self.config, method=method, seed=seed)
        for method in self.methods
        for seed in self.seeds
    ]

  def stem(self) -> str:
    """File name stem of the outputs, e.g. ``digits_cnn_sgd-sam-gnp``."""
    return f"{self.config.dataset}_{self.config.model}_{'-'.join(self.methods)}"


# ----------------------------------------------------------------------------
# Optimizers, loss and the train step.
# ----------------------------------------------------------------------------


def default_lr(method: str) -> float:
  """Peak learning rate used when none is given: 0.02 for SGD, 3e-3 for Adam.

  0.02 is where plain SGD does best on noisy digits (of 0.01, 0.02, 0.05 and
  0.1): larger rates let it memorise more of the wrong labels.

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
    momentum: float = TrainConfig.momentum,
    rho: float = TrainConfig.rho,
    alpha: float = TrainConfig.alpha,
    gamma: float = TrainConfig.gamma,
    epsilon: float = TrainConfig.epsilon,
    flood_level: float = TrainConfig.flood_level,
) -> optax.GradientTransformationExtraArgs:
  """Builds the optimizer of ``method`` with a cosine-decayed learning rate.

  Args:
    method: one of ``METHODS``.
    lr: peak learning rate.
    steps: total number of optimizer steps (length of the cosine decay).
    momentum: heavy-ball momentum of the SGD methods.
    rho: perturbation radius of ``sam`` and ``gnp``.
    alpha: GNP's mix between the clean and the perturbed gradient.
    gamma: gradient-norm penalty strength of ``gr``, ``fdgr`` and ``bdgr``.
    epsilon: finite-difference step of ``fdgr`` and ``bdgr``.
    flood_level: flood level of ``flooding``.

  Returns:
    A transformation whose ``update`` accepts the extra keyword arguments
    ``grad_fn`` and ``value`` (ignored by the methods that do not need them).
    Equal arguments give the same (immutable) object, so runs that differ
    only in their seed reuse the compiled train step.
  """
  schedule = optax.cosine_decay_schedule(lr, decay_steps=steps)
  if method == "agr_adamw":
    return gx.agr_adamw(schedule)
  if method == "agr_adan":
    return gx.agr_adan(schedule)
  gradient_transforms: dict[str, Callable[[], optax.GradientTransformation]] = {
      "sgd": optax.identity,
      "sam": lambda: gx.sam(rho),
      "gnp": lambda: gx.penalized_grad(rho, alpha),
      "fdgr": lambda: gx.finite_difference_gr(gamma, epsilon, scheme="forward"),
      "bdgr": lambda: gx.finite_difference_gr(gamma, epsilon, scheme="backward"),
      "gr": lambda: gx.gradient_regularization(gamma),
      "flooding": lambda: gx.flooding(flood_level),
  }
  if method not in gradient_transforms:
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
  return optax.chain(
      gradient_transforms[method](), optax.sgd(schedule, momentum=momentum)
  )


def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on the batch ``(x, y)``."""
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(
    model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
  """Takes one optimizer step on the batch ``(x, y)`` in place.

  ``grad_fn`` is built before the clean pass: it snapshots the BatchNorm
  statistics and dropout RNG state that the clean pass starts from, so the
  perturbed pass sees the same dropout masks and only the clean pass's state
  updates are kept.

  Args:
    model: the model (in training mode), updated in place.
    optimizer: its ``nnx.Optimizer`` (``wrt=nnx.Param``), updated in place.
    x: batch inputs.
    y: batch labels.

  Returns:
    The batch loss before the step.
  """
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
  return loss


# ----------------------------------------------------------------------------
# Evaluation and flatness diagnostics (model in evaluation mode).
# ----------------------------------------------------------------------------


@nnx.jit
def _count_correct(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return (model(x).argmax(axis=-1) == y).sum()


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
  """Returns the accuracy of ``model`` on ``(x, y)``; leaves it in eval mode.

  Args:
    model: the classifier.
    x: inputs.
    y: integer labels.

  Returns:
    The fraction of correctly classified samples.
  """
  model.eval()
  correct = sum(
      int(_count_correct(model, x[i : i + _EVAL_CHUNK], y[i : i + _EVAL_CHUNK]))
      for i in range(0, len(y), _EVAL_CHUNK)
  )
  return correct / len(y)


@functools.partial(nnx.jit, static_argnames="num_iters")
def _flatness(
    model: nnx.Module, x: jax.Array, y: jax.Array, key: jax.Array, num_iters: int
) -> tuple[jax.Array, jax.Array]:
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = jax.tree.leaves(grad_fn(params))
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in grads))
  if num_iters == 0:
    return grad_norm, jnp.full((), jnp.nan)
  top = gx.hessian_top_eigenvalue(grad_fn, params, key=key, num_iters=num_iters)
  return grad_norm, top


def flatness(
    model: nnx.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    key: jax.Array,
    hessian_iters: int = TrainConfig.hessian_iters,
) -> dict[str, float | None]:
  """Measures the full-batch gradient norm and top Hessian eigenvalue.

  Both are taken of the loss on ``(x, y)`` at the current parameters, with
  the model in evaluation mode (BatchNorm running statistics, no dropout), so
  the loss is a deterministic function of the parameters; the gradient comes
  from ``nnx_grad_fn`` and the eigenvalue from ``gx.hessian_top_eigenvalue``.

  Args:
    model: the classifier; left in evaluation mode.
    x: inputs of the probe set.
    y: labels of the probe set.
    key: start vector of the Lanczos iteration.
    hessian_iters: the most Lanczos steps; 0 skips the eigenvalue.

  Returns:
    ``{"grad_norm": float, "hessian_top_eigenvalue": float or None}``; both
    None for an empty probe set.
  """
  model.eval()
  if len(y) == 0:
    return {"grad_norm": None, "hessian_top_eigenvalue": None}
  grad_norm, top = _flatness(model, x, y, key, hessian_iters)
  return {
      "grad_norm": float(grad_norm),
      "hessian_top_eigenvalue": float(top) if hessian_iters else None,
  }


# ----------------------------------------------------------------------------
# One run.
# ----------------------------------------------------------------------------


def _run_dir(config: TrainConfig) -> pathlib.Path:
  """The checkpoint directory of one run (one per data set/model/method/seed)."""
  name = f"{config.dataset}_{config.model}_{config.method}_seed{config.seed}"
  return pathlib.Path(config.checkpoint_dir).absolute() / name


def _checkpoint_manager(config: TrainConfig):
  """The orbax CheckpointManager of one run."""
  options = ocp.CheckpointManagerOptions(max_to_keep=1)
  return ocp.CheckpointManager(_run_dir(config), options=options)


def run_args(config: TrainConfig) -> dict[str, Any]:
  """The settings that define a run's training (``lr`` resolved), as JSON."""
  if config.lr is None:
    config = dataclasses.replace(config, lr=default_lr(config.method))
  args = dataclasses.asdict(config)
  return {k: v for k, v in args.items() if k not in _NOT_RUN_ARGS}


def resume_conflict(config: TrainConfig) -> str | None:
  """Why ``config`` may not resume its checkpoint directory, or None if it may.

  Args:
    config: the run; its ``checkpoint_dir`` may hold an earlier run's
      ``RUN_ARGS_FILE``.

  Returns:
    None without a checkpoint directory, without a record or with the same
    ``run_args``; otherwise a one-line message naming the flags that differ
    with their recorded and new values.
  """
  if config.checkpoint_dir is None:
    return None
  path = _run_dir(config) / RUN_ARGS_FILE
  if not path.exists():
    return None
  old, new = json.loads(path.read_text()), run_args(config)
  diffs = [
      f"--{key.replace('_', '-')} {old.get(key)} (now {new.get(key)})"
      for key in dict.fromkeys([*old, *new])
      if old.get(key) != new.get(key)
  ]
  if not diffs:
    return None
  return (
      f"{path.parent} holds a run with other arguments: {', '.join(diffs)}; "
      "use a new --checkpoint-dir (or delete the old one) instead of splicing "
      "two runs"
  )


def _pure_state(model: nnx.Module, optimizer: nnx.Optimizer) -> dict[str, Any]:
  """Model and optimizer state as plain arrays."""
  return nnx.as_pure({"model": nnx.state(model), "optimizer": nnx.state(optimizer)})


def _params_finite(model: nnx.Module) -> bool:
  """Whether every parameter of ``model`` is finite."""
  params = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Param)))
  return all(bool(jnp.isfinite(p).all()) for p in params)


def _is_key(x: Any) -> bool:
  return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _saveable(state: dict[str, Any]) -> dict[str, Any]:
  """`state` with PRNG keys replaced by their key data (what orbax stores)."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def save_checkpoint(
    mngr, epoch: int, model: nnx.Module, optimizer: nnx.Optimizer,
    batch_rng: np.random.Generator, history: dict[str, list[float]],
) -> None:
  """Saves everything the run needs to continue after ``epoch``.

  Args:
    mngr: the run's ``orbax.checkpoint.CheckpointManager``.
    epoch: the epoch just finished (the checkpoint's step).
    model: the model (parameters, BatchNorm statistics, RNG state).
    optimizer: its ``nnx.Optimizer`` (the optax state, every_k cache included).
    batch_rng: the generator of the batch order.
    history: the per-epoch train loss and test accuracy so far.
  """
  meta = {"rng": batch_rng.bit_generator.state, "history": history}
  mngr.save(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardSave(_saveable(_pure_state(model, optimizer))),
      meta=ocp.args.JsonSave(meta),
  ))  # fmt: skip
  mngr.wait_until_finished()


def restore_checkpoint(
    mngr, model: nnx.Module, optimizer: nnx.Optimizer,
    batch_rng: np.random.Generator,
) -> tuple[int, dict[str, list[float]]]:
  """Restores the latest checkpoint into ``model``, ``optimizer``, ``batch_rng``.

  Args:
    mngr: the run's ``orbax.checkpoint.CheckpointManager``.
    model: a freshly built model of the run, updated in place.
    optimizer: its freshly built optimizer, updated in place.
    batch_rng: the batch-order generator, set to the saved state.

  Returns:
    The last finished epoch and the history up to it.
  """
  epoch = mngr.latest_step()
  like = _pure_state(model, optimizer)
  restored = mngr.restore(epoch, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_saveable(like)), meta=ocp.args.JsonRestore(),
  ))  # fmt: skip
  values = jax.tree.map(
      lambda v, x: jax.random.wrap_key_data(v, impl=jax.random.key_impl(x))
      if _is_key(x) else v,
      restored["state"], like,
  )  # fmt: skip
  nnx.update(model, values["model"])
  nnx.update(optimizer, values["optimizer"])
  batch_rng.bit_generator.state = restored["meta"]["rng"]
  return epoch, restored["meta"]["history"]


def run(
    config: TrainConfig,
    *,
    on_epoch: Callable[[int, float, float], None] | None = None,
) -> dict[str, Any]:
  """Trains and evaluates one model as described by ``config``.

  Args:
    config: the run's settings.
    on_epoch: called after every epoch as ``on_epoch(epoch, train_loss,
      test_accuracy)`` (epochs count from 1), e.g. to drive a progress bar.

  Returns:
    A JSON-serialisable dict with the resolved ``config`` (``lr`` filled in),
    ``num_params``, per-epoch ``train_loss`` (mean over the epoch's batches,
    on the noisy labels, in training mode) and ``test_accuracy``, the
    ``final_train_loss``, ``final_test_accuracy``, the final ``grad_norm``
    and ``hessian_top_eigenvalue`` on the probe set (see ``flatness``),
    ``diverged`` and ``diverged_epoch`` and ``wall_time_s``. A run diverges
    when its epoch's train loss or its parameters are not finite: it stops
    after that epoch (saving no checkpoint of it), ``diverged_epoch`` is the
    epoch (else None) and the probe is skipped (None).

  Raises:
    ValueError: for an out-of-range setting, or if ``checkpoint_dir`` holds
      a run with other ``run_args`` (see ``resume_conflict``).
  """
  start = time.perf_counter()
  if config.epochs < 1:
    raise ValueError(f"epochs must be at least 1, got {config.epochs}")
  if config.hessian_iters < 0:
    raise ValueError(
        "hessian_iters must be >= 0 (0 skips the eigenvalue), "
        f"got {config.hessian_iters}"
    )
  if config.probe_size < 0:
    raise ValueError(f"probe_size must be >= 0 (0 skips), got {config.probe_size}")
  if config.lr is None:
    config = dataclasses.replace(config, lr=default_lr(config.method))
  ds = data.load_dataset(
      config.dataset,
      label_noise=config.label_noise,
      seed=config.seed,
      data_dir=config.data_dir,
      max_train=config.train_size,
      max_test=config.test_size,
  )
  if not 1 <= config.batch_size <= len(ds.x_train):
    raise ValueError(
        f"batch_size must be in [1, {len(ds.x_train)}] (the training samples), "
        f"got {config.batch_size}"
    )
  steps = config.epochs * (len(ds.x_train) // config.batch_size)
  model = make_model(
      config.model, config.seed, ds.x_train.shape[1:], data.NUM_CLASSES
  )
  tx = make_optimizer(
      config.method,
      config.lr,
      steps,
      momentum=config.momentum,
      rho=config.rho,
      alpha=config.alpha,
      gamma=config.gamma,
      epsilon=config.epsilon,
      flood_level=config.flood_level,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  batch_rng = np.random.default_rng(config.seed)

  history: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
  mngr = None if config.checkpoint_dir is None else _checkpoint_manager(config)
  done = 0
  if mngr is not None and mngr.latest_step() is not None:
    if conflict := resume_conflict(config):
      raise ValueError(conflict)
    done, history = restore_checkpoint(mngr, model, optimizer, batch_rng)
  diverged_epoch = None
  for epoch in range(done + 1, config.epochs + 1):
    model.train()
    losses = [
        train_step(model, optimizer, xb, yb)
        for xb, yb in data.iterate_batches(
            ds.x_train, ds.y_train, config.batch_size, batch_rng
        )
    ]
    history["train_loss"].append(float(np.mean(jax.device_get(losses))))
    history["test_accuracy"].append(evaluate(model, ds.x_test, ds.y_test))
    if not (np.isfinite(history["train_loss"][-1]) and _params_finite(model)):
      diverged_epoch = epoch
    elif mngr is not None:
      save_checkpoint(mngr, epoch, model, optimizer, batch_rng, history)
      if epoch == done + 1:  # this process's first save: record the run
        (_run_dir(config) / RUN_ARGS_FILE).write_text(json.dumps(run_args(config)))
    if on_epoch is not None:
      on_epoch(epoch, history["train_loss"][-1], history["test_accuracy"][-1])
    if diverged_epoch is not None:
      break

  probe = slice(0, 0 if diverged_epoch is not None else config.probe_size)
  diagnostics = flatness(
      model,
      ds.x_train[probe],
      ds.y_train[probe],
      key=jax.random.key(config.seed),
      hessian_iters=config.hessian_iters,
  )
  return {
      "config": dataclasses.asdict(config),
      "num_params": count_params(model),
      **history,
      "final_train_loss": history["train_loss"][-1],
      "final_test_accuracy": history["test_accuracy"][-1],
      **diagnostics,
      "diverged": diverged_epoch is not None,
      "diverged_epoch": diverged_epoch,
      "wall_time_s": time.perf_counter() - start,
  }


# ----------------------------------------------------------------------------
# Several runs: summary table, JSON and learning curves.
# ----------------------------------------------------------------------------


def run_experiment(
    experiment: Experiment, *, progress: bool = True
) -> list[dict[str, Any]]:
  """Runs every (method, seed) of ``experiment``, one after the other.

  Args:
    experiment: what to compare.
    progress: show a tqdm progress bar over all epochs of all runs.

  Returns:
    The ``run`` results, in the order of ``experiment.configs()``.
  """
  configs = experiment.configs()
  bar = tqdm(
      total=len(configs) * experiment.config.epochs, unit="epoch", disable=not progress
  )
  results = []
  with bar:
    for config in configs:
      bar.set_description(f"{config.method} seed {config.seed}")

      def on_epoch(epoch: int, loss: float, accuracy: float) -> None:
        del epoch
        bar.set_postfix(loss=f"{loss:.3f}", test_acc=f"{accuracy:.3f}")
        bar.update()

      results.append(run(config, on_epoch=on_epoch))
      if results[-1]["diverged"]:
        tqdm.write(
            f"{config.method} seed {config.seed}: diverged at epoch "
            f"{results[-1]['diverged_epoch']} "
            f"(loss={results[-1]['final_train_loss']:.4g})"
        )
        bar.update(config.epochs - len(results[-1]["train_loss"]))
  return results


def mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
  """Mean and sample standard deviation (0 for one value); None if any value
  is None or not finite.

  Args:
    values: one number per seed.

  Returns:
    ``{"mean": ..., "std": ...}``.
  """
  if not values or any(v is None or not np.isfinite(v) for v in values):
    return {"mean": None, "std": None}
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std}


def summarize(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Groups runs by method and averages ``SUMMARY_METRICS`` over the seeds.

  Args:
    results: ``run`` results.

  Returns:
    One row per method, in order of first appearance:
    ``{"method", "seeds", "diverged_seeds", "wall_time_s", <metric>: {"mean",
    "std"}, ...}``, ``wall_time_s`` being the mean time of one run.
  """
  methods = list(dict.fromkeys(r["config"]["method"] for r in results))
  rows = []
  for method in methods:
    runs = [r for r in results if r["config"]["method"] == method]
    rows.append({
        "method": method,
        "seeds": [r["config"]["seed"] for r in runs],
        "diverged_seeds": [r["config"]["seed"] for r in runs if r.get("diverged")],
        **{m: mean_std([r[m] for r in runs]) for m in SUMMARY_METRICS},
        "wall_time_s": float(np.mean([r["wall_time_s"] for r in runs])),
    })
  return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
  """Formats ``summarize`` rows as an aligned text table (mean ± std).

  Args:
    rows: the output of ``summarize``.

  Returns:
    The table, one line per method under a header line.
  """
  columns = [
      ("test acc", "final_test_accuracy", ".3f"),
      ("train loss", "final_train_loss", ".3f"),
      ("grad norm", "grad_norm", ".3f"),
      ("top eig", "hessian_top_eigenvalue", ".2f"),
  ]

  def cell(stat: dict[str, float | None], fmt: str, seeds: int) -> str:
    if stat["mean"] is None:
      return "-"
    text = format(stat["mean"], fmt)
    return text if seeds == 1 else f"{text} ± {format(stat['std'], fmt)}"

  header = ["method", *(title for title, _, _ in columns), "s/run"]

  def name(row: dict[str, Any]) -> str:
    diverged, seeds = row.get("diverged_seeds"), row["seeds"]
    if not diverged:
      return row["method"]
    which = "" if len(seeds) == 1 else f" seed {','.join(map(str, diverged))}"
    return f"{row['method']} (diverged{which})"

  body = [
      [
          name(row),
          *(cell(row[key], fmt, len(row["seeds"])) for _, key, fmt in columns),
          f"{row['wall_time_s']:.1f}",
      ]
      for row in rows
  ]
  lines = [header, *body]
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  return "\n".join(
      "  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)).rstrip()
      for line in lines
  )


def plot_curves(results: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
  """Saves train loss and test accuracy against epoch, one line per method.

  With several seeds a line is the mean over the seeds and the band around it
  spans ± one standard deviation.

  Args:
    results: ``run`` results.
    path: the PNG file to write.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  for row in summarize(results):
    runs = [r for r in results if r["config"]["method"] == row["method"]]
    for ax, key in zip(axes, ("train_loss", "test_accuracy"), strict=True):
      # Diverged runs stop early: pad them, and draw no non-finite point.
      length = max(len(r[key]) for r in runs)
      curves = np.array([r[key] + [np.nan] * (length - len(r[key])) for r in runs])
      curves[~np.isfinite(curves)] = np.nan
      epochs = np.arange(1, curves.shape[1] + 1)
      mean, std = curves.mean(axis=0), curves.std(axis=0)
      (line,) = ax.plot(epochs, mean, label=row["method"])
      if len(runs) > 1:
        ax.fill_between(
            epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2
        )
  titles = ("train loss (noisy labels)", "test accuracy")
  for ax, title in zip(axes, titles, strict=True):
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[1].legend()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _finite_or_none(obj: Any) -> Any:
  """``obj`` with NaN and infinite floats replaced by None (JSON's null)."""
  if isinstance(obj, float):
    return obj if np.isfinite(obj) else None
  if isinstance(obj, dict):
    return {k: _finite_or_none(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite_or_none(v) for v in obj]
  return obj


def save_results(
    experiment: Experiment, results: Sequence[dict[str, Any]]
) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes ``<stem>.json`` (settings, summary, every run) and ``<stem>.png``.

  Args:
    experiment: the comparison that was run; names the files.
    results: its ``run`` results.

  Returns:
    The paths of the JSON file and of the PNG learning curves.
  """
  out_dir = pathlib.Path(experiment.out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path = out_dir / f"{experiment.stem()}.json"
  png_path = out_dir / f"{experiment.stem()}.png"
  record = {
      "experiment": dataclasses.asdict(experiment),
      "summary": summarize(results),
      "runs": list(results),
  }
  json_path.write_text(json.dumps(_finite_or_none(record), indent=1, allow_nan=False))
  plot_curves(results, png_path)
  return json_path, png_path


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def parse_methods(text: str) -> tuple[str, ...]:
  """Parses ``--method``: ``all``, one method, or a comma-separated list.

  Args:
    text: the argument, e.g. ``"sgd,sam,gnp"``.

  Returns:
    The methods, in the given order, without duplicates.

  Raises:
    argparse.ArgumentTypeError: for an unknown name, listing the valid ones.
  """
  if text.strip() == "all":
    return METHODS
  methods = tuple(dict.fromkeys(m.strip() for m in text.split(",")))
  for method in methods:
    if method not in METHODS:
      valid = ", ".join(f"'{m}'" for m in (*METHODS, "all"))
      raise argparse.ArgumentTypeError(
          f"invalid choice: '{method}' (choose from {valid}, or a comma-separated "
          "list of methods)"
      )
  return methods


def parse_seeds(text: str) -> tuple[int, ...]:
  """Parses ``--seed``/``--seeds``: one integer or a comma-separated list.

  Args:
    text: the argument, e.g. ``"0,1,2"``.

  Returns:
    The seeds, in the given order, without duplicates.

  Raises:
    argparse.ArgumentTypeError: if an item is not an integer in [0, 2**63)
      (what numpy's and JAX's generators accept).
  """
  try:
    seeds = tuple(dict.fromkeys(int(s) for s in text.split(",")))
  except ValueError:
    seeds = ()
  if not seeds or not all(0 <= s < 2**63 for s in seeds):
    raise argparse.ArgumentTypeError(
        f"invalid seeds: '{text}' (expected integers in [0, 2**63) separated by "
        "commas, e.g. 0,1,2)"
    )
  return seeds


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str):
  """An argparse ``type=``: ``convert(text)``, refused unless ``ok`` of it."""

  def parse(text: str) -> Any:
    try:
      value = convert(text)
    except ValueError:
      value = None
    if value is None or not ok(value):
      raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value

  return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
finite_float = _checked(float, np.isfinite, "a finite number")
positive_float = _checked(
    float, lambda v: np.isfinite(v) and v > 0, "a finite number > 0"
)
nonnegative_float = _checked(
    float, lambda v: np.isfinite(v) and v >= 0, "a finite number >= 0"
)
unit_fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser() -> argparse.ArgumentParser:
  """Returns the command-line parser; its defaults are ``Experiment()``'s."""
  parser = argparse.ArgumentParser(
      prog="python -m gnorm_optax.examples.train",
      description=__doc__.split("\n\n")[0],
      epilog="A run whose loss or parameters stop being finite stops there, is "
      "marked diverged in the table and the JSON (null for non-finite numbers), "
      "and the other runs go on; the exit status stays 0. --checkpoint-dir "
      "refuses to resume a run that was started with other arguments.",
  )
  default = Experiment()
  parser.add_argument(
      "--method", "--methods", dest="methods", type=parse_methods,
      default=default.methods, metavar="METHOD[,METHOD...]",
      help=f"'all', or one or a comma-separated list of {', '.join(METHODS)} "
      f"(default: {','.join(default.methods)})",
  )  # fmt: skip
  parser.add_argument(
      "--seed", "--seeds", dest="seeds", type=parse_seeds, default=default.seeds,
      metavar="SEED[,SEED...]",
      help="one seed or a comma-separated list; several give mean ± std "
      f"(default: {','.join(map(str, default.seeds))})",
  )  # fmt: skip
  parser.add_argument(
      "--out-dir", default=default.out_dir,
      help="where the JSON results and PNG curves go (default: %(default)s)",
  )  # fmt: skip
  options = [
      ("--model", str, tuple(MODELS), "architecture"),
      ("--dataset", str, data.DATASETS, "data set"),
      ("--epochs", positive_int, None, "passes over the training set"),
      ("--batch-size", positive_int, None,
       "mini-batch size, at most the number of training samples"),
      ("--lr", positive_float, None,
       "peak learning rate (default: 0.02, 3e-3 for agr_*)"),
      ("--momentum", unit_fraction, None, "momentum of the SGD methods"),
      ("--rho", nonnegative_float, None, "perturbation radius of sam and gnp"),
      ("--alpha", finite_float, None, "gnp's mix of clean and perturbed gradients"),
      ("--gamma", nonnegative_float, None, "penalty strength of gr, fdgr and bdgr"),
      ("--epsilon", positive_float, None, "finite-difference step of fdgr and bdgr"),
      ("--flood-level", nonnegative_float, None, "flood level of flooding"),
      ("--label-noise", unit_fraction, None,
       "fraction of wrong training labels, in [0, 1)"),
      ("--train-size", positive_int, None, "use at most this many training samples"),
      ("--test-size", positive_int, None, "use at most this many test samples"),
      ("--probe-size", nonnegative_int, None,
       "training samples for grad norm and top eig (0: skip both)"),
      ("--hessian-iters", nonnegative_int, None,
       "most Lanczos steps for the top eig (0: skip)"),
      ("--data-dir", str, None, "cache directory of downloaded data sets"),
      ("--checkpoint-dir", str, None,
       "save a checkpoint after every epoch there, and resume from it"),
  ]
  for flag, type_, choices, help_ in options:
    value = getattr(default.config, flag[2:].replace("-", "_"))
    if value is not None:
      help_ += " (default: %(default)s)"
    parser.add_argument(flag, type=type_, choices=choices, default=value, help=help_)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> Experiment:
  """Parses command-line arguments (``sys.argv[1:]`` when None).

  Args:
    argv: the arguments without the program name.

  Exits with argparse's error (status 2) for an argument out of range, a
  ``--batch-size`` above the number of training samples, or a
  ``--checkpoint-dir`` that holds a run with other arguments.

  Returns:
    The ``Experiment`` they describe.
  """
  parser = build_parser()
  args = vars(parser.parse_args(argv))
  methods, seeds, out_dir = args.pop("methods"), args.pop("seeds"), args.pop("out_dir")
  experiment = Experiment(methods, seeds, TrainConfig(**args), out_dir)
  config = experiment.config
  n_train, where = TRAIN_SET_SIZES[config.dataset], f"in {config.dataset}"
  if config.train_size is not None and config.train_size < n_train:
    n_train, where = config.train_size, f"with --train-size {config.train_size}"
  if config.batch_size > n_train:
    parser.error(
        "argument --batch-size: must be at most the number of training samples "
        f"({n_train} {where}), got {config.batch_size}"
    )
  for run_config in experiment.configs():
    if conflict := resume_conflict(run_config):
      parser.error(f"argument --checkpoint-dir: {conflict}")
  return experiment


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point: trains every run, prints and saves the summary.

  Args:
    argv: command-line arguments without the program name; None reads
      ``sys.argv[1:]``.

  Returns:
    ``{"summary": summarize(runs), "runs": [...], "files": [json, png]}``.
  """
  experiment = parse_args(argv)
  config = experiment.config
  lr = config.lr
  if lr is None:
    lr = f"{default_lr('sgd')} (agr_*: {default_lr('agr_adamw')})"
  print(
      f"{config.dataset}, {config.label_noise:.0%} label noise, {config.model}, "
      f"{config.epochs} epochs of batch {config.batch_size}, peak lr {lr}, "
      f"methods {', '.join(experiment.methods)}, "
      f"seeds {', '.join(map(str, experiment.seeds))}"
  )
  results = run_experiment(experiment)
  summary = summarize(results)
  print(format_table(summary))
  files = save_results(experiment, results)
  print("wrote " + " and ".join(str(f) for f in files))
  return {"summary": summary, "runs": results, "files": [str(f) for f in files]}


if __name__ == "__main__":
  main()
