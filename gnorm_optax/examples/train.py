"""Trains a small digits classifier with a flat-minima optimizer.

Run ``python -m gnorm_optax.examples.train --method gnp --model cnn``; see
``--help`` for the options. From Python, ``run(TrainConfig(method="sam"))``
returns the per-epoch history as a JSON-serialisable dict.

The one thing that differs from a plain Flax NNX training loop is the
``grad_fn`` handed to ``optimizer.update``: SAM, GNP and gradient
regularization need the gradient of the same mini-batch loss at other
(perturbed) parameters. ``make_grad_fn`` builds it as a pure function of the
parameters, so the extra forward/backward passes never mutate the model.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import gnorm_optax as gx
from gnorm_optax.examples.data import iterate_batches, load_digits
from gnorm_optax.examples.models import MODELS, count_params, make_model

# Methods built as `chain(<gradient transform>, sgd with momentum)`.
SGD_METHODS = ("sgd", "sam", "gnp", "fdgr", "bdgr", "gr", "flooding")
# Methods that are complete Adam-type optimizers.
ADAPTIVE_METHODS = ("agr_adamw", "agr_adan")
METHODS = SGD_METHODS + ADAPTIVE_METHODS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; the defaults are the CLI defaults.

  Attributes:
    method: optimizer, one of ``METHODS``.
    model: architecture, a key of ``models.MODELS``.
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
    train_size: keep only the first ``train_size`` training samples (None:
      all of them); for quick smoke runs.
    seed: seed for the split, the label noise, the weights and the batches.
  """

  method: str = "sam"
  model: str = "cnn"
  epochs: int = 30
  batch_size: int = 64
  lr: float | None = None
  momentum: float = 0.9
  rho: float = 0.05
  alpha: float = 0.8
  gamma: float = 0.05
  epsilon: float = 0.01
  flood_level: float = 1.0
  label_noise: float = 0.2
  train_size: int | None = None
  seed: int = 0


def default_lr(method: str) -> float:
  """Peak learning rate used when none is given: 0.05 for SGD, 3e-3 for Adam."""
  return 3e-3 if method in ADAPTIVE_METHODS else 0.05


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


def make_grad_fn(
    model: nnx.Module, x: jax.Array, y: jax.Array
) -> Callable[[nnx.State], nnx.State]:
  """Returns ``params -> grad of loss_fn on (x, y) at params``, side-effect free.

  ``params`` is a pure ``nnx.State`` of arrays shaped like
  ``nnx.state(model, nnx.Param)``, which is what ``nnx.Optimizer.update``
  hands to the transformation; the gradient comes back in the same form. The
  forward pass runs on a fresh copy of the model built by ``nnx.merge``, so
  nothing (e.g. future batch statistics) leaks into ``model``.

  Args:
    model: the model; only its structure and non-parameter state are read.
    x: batch inputs.
    y: batch labels.

  Returns:
    The gradient function for the second-gradient protocol of gnorm_optax.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)
  rest = nnx.as_pure(rest)

  def loss_at(params: nnx.State) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, params, rest), x, y)

  return jax.grad(loss_at)


@nnx.jit
def train_step(
    model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
  """Takes one optimizer step on the batch ``(x, y)`` in place.

  Args:
    model: the model, updated in place.
    optimizer: its ``nnx.Optimizer`` (``wrt=nnx.Param``), updated in place.
    x: batch inputs.
    y: batch labels.

  Returns:
    The batch loss before the step.
  """
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=make_grad_fn(model, x, y), value=loss)
  return loss


@nnx.jit
def _count_correct(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return (model(x).argmax(axis=-1) == y).sum()


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
  """Returns the accuracy of ``model`` on ``(x, y)`` in evaluation mode."""
  model.eval()
  correct = int(_count_correct(model, x, y))
  model.train()
  return correct / len(y)


def run(config: TrainConfig, *, verbose: bool = False) -> dict[str, Any]:
  """Trains and evaluates one model as described by ``config``.

  Args:
    config: the run's settings.
    verbose: show a progress bar over epochs and print one line per epoch.

  Returns:
    A JSON-serialisable dict with the resolved ``config`` (``lr`` filled in),
    ``num_params``, per-epoch ``train_loss`` (mean over the epoch's batches,
    on the noisy labels) and ``test_accuracy``, the final
    ``final_test_accuracy`` and ``wall_time_s``.
  """
  start = time.perf_counter()
  if config.lr is None:
    config = dataclasses.replace(config, lr=default_lr(config.method))
  data = load_digits(label_noise=config.label_noise, seed=config.seed)
  x_train = data.x_train[: config.train_size]
  y_train = data.y_train[: config.train_size]
  steps = config.epochs * (len(x_train) // config.batch_size)

  model = make_model(config.model, seed=config.seed)
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
  epochs = tqdm(range(config.epochs), desc=config.method, disable=not verbose)
  for epoch in epochs:
    losses = [
        train_step(model, optimizer, xb, yb)
        for xb, yb in iterate_batches(x_train, y_train, config.batch_size, batch_rng)
    ]
    train_loss = float(np.mean(jax.device_get(losses)))
    test_accuracy = evaluate(model, data.x_test, data.y_test)
    history["train_loss"].append(train_loss)
    history["test_accuracy"].append(test_accuracy)
    if verbose:
      epochs.write(
          f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}  "
          f"test accuracy {test_accuracy:.3f}"
      )
  return {
      "config": dataclasses.asdict(config),
      "num_params": count_params(model),
      **history,
      "final_test_accuracy": history["test_accuracy"][-1],
      "wall_time_s": time.perf_counter() - start,
  }


def build_parser() -> argparse.ArgumentParser:
  """Returns the command-line parser; its defaults come from ``TrainConfig``."""
  parser = argparse.ArgumentParser(
      prog="python -m gnorm_optax.examples.train",
      description=__doc__.splitlines()[0],
  )
  default = TrainConfig()
  options = [
      ("--method", str, METHODS, "optimizer"),
      ("--model", str, tuple(MODELS), "architecture"),
      ("--epochs", int, None, "passes over the training set"),
      ("--batch-size", int, None, "mini-batch size"),
      ("--lr", float, None, "peak learning rate (default: 0.05, 3e-3 for agr_*)"),
      ("--momentum", float, None, "momentum of the SGD methods"),
      ("--rho", float, None, "perturbation radius of sam and gnp"),
      ("--alpha", float, None, "gnp's mix of clean and perturbed gradients"),
      ("--gamma", float, None, "penalty strength of gr, fdgr and bdgr"),
      ("--epsilon", float, None, "finite-difference step of fdgr and bdgr"),
      ("--flood-level", float, None, "flood level of flooding"),
      ("--label-noise", float, None, "fraction of wrong training labels"),
      ("--train-size", int, None, "use only this many training samples (default: all)"),
      ("--seed", int, None, "random seed"),
  ]
  for flag, type_, choices, help_ in options:
    value = getattr(default, flag[2:].replace("-", "_"))
    if value is not None:
      help_ += " (default: %(default)s)"
    parser.add_argument(flag, type=type_, choices=choices, default=value, help=help_)
  return parser


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
  """Parses command-line arguments (``sys.argv[1:]`` when None) to a config."""
  return TrainConfig(**vars(build_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point: trains, prints progress and the test accuracy.

  Args:
    argv: command-line arguments without the program name; None reads
      ``sys.argv[1:]``.

  Returns:
    The results dict of ``run``.
  """
  config = parse_args(argv)
  results = run(config, verbose=True)
  print(
      f"{config.method} / {config.model}: {results['num_params']} parameters, "
      f"{results['wall_time_s']:.1f} s"
  )
  print(f"test accuracy: {results['final_test_accuracy']:.3f}")
  return results


if __name__ == "__main__":
  main()
