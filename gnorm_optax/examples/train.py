"""Trains a small image classifier with SAM, GNP or another flat-minima optimizer.

::

  python -m gnorm_optax.examples.train                  # SAM, digits CNN, 20% noise
  python -m gnorm_optax.examples.train --method gnp --rho 0.1 --seed 1
  python -m gnorm_optax.examples.train --method sgd --model resnet --output sgd.json
  python -m gnorm_optax.examples.train --dataset mnist1d --model cnn1d --method adam \
    --lr 0.01 --schedule constant --batch-size 100 --epochs 150 --label-noise 0

One method and one seed per run: a progress bar per epoch, then the test
accuracy, final train loss, top Hessian eigenvalue (flatness) and wall time.
Fork this file to train your own model. The one thing that differs from a
plain Flax NNX loop is the ``grad_fn`` handed to ``optimizer.update``: SAM,
GNP and gradient regularization need the gradient of the same mini-batch loss
at other (perturbed) parameters, and ``gnorm_optax.flax.nnx_grad_fn`` builds
it without touching BatchNorm statistics or dropout RNG state.
"""

import argparse
import contextlib
import json
import math
import pathlib
import time
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

METHODS = tuple("sgd sam gnp fdgr bdgr gr flooding adam agr_adamw agr_adan".split())
MODELS = ("mlp", "cnn", "cnn1d", "resnet", "vit")  # the keys of models.MODELS
# Training samples per data set; mnist and the next ones need the `hub` extra.
TRAIN_SIZES = dict(digits=1348, mnist1d=4000, mnist=60_000, fashion_mnist=60_000)
TRAIN_SIZES["cifar10"] = 50_000


def default_lr(method: str) -> float:
  """The peak learning rate when none is given (0.02 is SGD's best on digits)."""
  return 0.01 if method == "adam" else 3e-3 if method.startswith("agr_") else 0.02


def _checked(convert: Callable[[str], Any], ok: Callable[[Any], bool], rule: str):
  """An argparse ``type=``: ``convert(text)``, refused unless ``ok`` of it."""

  def parse(text: str) -> Any:
    with contextlib.suppress(ValueError):
      if ok(value := convert(text)):
        return value
    raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")

  return parse


def build_parser() -> argparse.ArgumentParser:
  """Returns the command-line parser (``--help`` lists every flag)."""
  p = argparse.ArgumentParser(
    prog="python -m gnorm_optax.examples.train",
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  count = _checked(int, lambda v: v >= 1, "a positive integer")
  seed = _checked(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
  positive = _checked(float, lambda v: 0 < v < math.inf, "a finite number > 0")
  nonneg = _checked(float, lambda v: 0 <= v < math.inf, "a finite number >= 0")
  finite = _checked(float, math.isfinite, "a finite number")
  fraction = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
  add = p.add_argument
  add("--method", default="sam", choices=METHODS, help="the optimizer")
  add("--model", default="cnn", choices=MODELS, help="the architecture")
  add("--dataset", default="digits", choices=TRAIN_SIZES, help="others need [hub]")
  add("--seed", type=seed, default=0, help="split, noise, weights, batch order")
  add("--epochs", type=count, default=60, help="passes over the training set")
  add("--batch-size", type=count, default=64, help="samples per step")
  add("--lr", type=positive, default=argparse.SUPPRESS, help="peak; see default_lr")
  add("--schedule", default="cosine", choices=("cosine", "constant"), help="of the lr")
  add("--label-noise", type=fraction, default=0.2, help="fraction of wrong labels")
  add("--rho", type=nonneg, default=0.15, help="perturbation radius (sam, gnp)")
  add("--alpha", type=finite, default=0.8, help="gnp's mix of clean and perturbed")
  add("--output", help="write the results there as JSON")
  return p


def parse_args(
  argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
  """Parses the flags (``sys.argv[1:]`` when None), resolving ``--lr``.

  Exits with argparse's one-line error naming the flag (status 2) for a value
  out of range or a ``--batch-size`` above the number of training samples.
  ``parser`` may add flags to ``build_parser()``'s (as checkpointing.py does).
  """
  parser = build_parser() if parser is None else parser
  args = parser.parse_args(argv)
  if args.batch_size > (n := TRAIN_SIZES[args.dataset]):
    parser.error(
      f"argument --batch-size: must be at most {n}, the training "
      f"samples of {args.dataset}, got {args.batch_size}"
    )
  if "lr" not in args:
    args.lr = default_lr(args.method)
  return args


if __name__ == "__main__":
  parse_args()  # --help and bad flags answer before the heavy imports below.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.typing import ArrayLike  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gnorm_optax as gx  # noqa: E402
from gnorm_optax.examples import data  # noqa: E402
from gnorm_optax.examples import models  # noqa: E402
from gnorm_optax.flax import nnx_grad_fn  # noqa: E402


def make_optimizer(
  method: str, lr: float, steps: int, *, rho=0.15, alpha=0.8, schedule="cosine"
) -> optax.GradientTransformationExtraArgs:
  """The optimizer of ``method``, learning rate ``lr`` cosine-decayed or constant.

  Gradient transforms go in front of SGD with momentum. GR's ``gamma=0.05``
  (finite-difference step 0.01) and the flood level 1.0 suit 20% label
  noise, where even the true classes cost 0.94 nats.
  """
  gamma, epsilon, flood_level = 0.05, 0.01, 1.0
  lr = optax.cosine_decay_schedule(lr, steps) if schedule == "cosine" else lr
  sgd = optax.sgd(lr, momentum=0.9)
  fd = gx.finite_difference_gr
  optimizers = {
    "sgd": sgd,
    "sam": optax.chain(gx.sam(rho), sgd),
    "gnp": optax.chain(gx.penalized_grad(rho, alpha), sgd),
    "fdgr": optax.chain(fd(gamma, epsilon), sgd),
    "bdgr": optax.chain(fd(gamma, epsilon, scheme="backward"), sgd),
    "gr": optax.chain(gx.gradient_regularization(gamma), sgd),
    "flooding": optax.chain(gx.flooding(flood_level), sgd),
    "adam": optax.with_extra_args_support(optax.adam(lr)),
    "agr_adamw": gx.agr_adamw(lr),
    "agr_adan": gx.agr_adan(lr),
  }
  return optimizers[method]


def loss_fn(model: nnx.Module, x: ArrayLike, y: ArrayLike) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on the batch ``(x, y)``."""
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(
  model: nnx.Module, optimizer: nnx.Optimizer, x: ArrayLike, y: ArrayLike
) -> jax.Array:
  """One optimizer step on ``(x, y)``, in place; returns the loss before it.

  ``grad_fn`` is built first, so the perturbed pass starts from the same
  BatchNorm statistics and dropout RNG state as the clean pass. ``value`` is
  the loss that ``flooding`` compares with its level.
  """
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
  return loss


@nnx.jit
def _count_correct(model: nnx.Module, x: ArrayLike, y: ArrayLike) -> jax.Array:
  return (model(x).argmax(axis=-1) == y).sum()


def evaluate(model: nnx.Module, x: np.ndarray, y: np.ndarray) -> float:
  """Accuracy of ``model`` on ``(x, y)``, in chunks of 1000; leaves eval mode."""
  model.eval()
  chunks = range(0, len(y), 1000)
  return sum(
    int(_count_correct(model, x[i : i + 1000], y[i : i + 1000])) for i in chunks
  ) / len(y)


@nnx.jit(static_argnames="hessian_iters")
def flatness(
  model: nnx.Module, x: ArrayLike, y: ArrayLike, key: jax.Array, hessian_iters: int = 20
) -> tuple[jax.Array, Any]:
  """Gradient norm and top Hessian eigenvalue of the full-batch loss on (x, y).

  Call it in evaluation mode (``model.eval()``: BatchNorm running statistics,
  no dropout), where the loss is a deterministic function of the parameters.
  """
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grad_norm = optax.tree.norm(grad_fn(params))
  top = gx.hessian_top_eigenvalue(grad_fn, params, key=key, num_iters=hessian_iters)
  return grad_norm, top


def setup(args: argparse.Namespace) -> tuple[data.Dataset, nnx.Module, nnx.Optimizer]:
  """The run's data (noisy training labels), fresh model and its optimizer."""
  ds = data.load(args.dataset, label_noise=args.label_noise, seed=args.seed)
  model = models.make_model(args.model, args.seed, ds.x_train.shape[1:])
  steps = args.epochs * (len(ds.x_train) // args.batch_size)
  tx = make_optimizer(
    args.method, args.lr, steps, rho=args.rho, alpha=args.alpha, schedule=args.schedule
  )
  return ds, model, nnx.Optimizer(model, tx, wrt=nnx.Param)


def train_epoch(
  model: nnx.Module,
  optimizer: nnx.Optimizer,
  ds: data.Dataset,
  args: argparse.Namespace,
  rng: np.random.Generator,
  epoch: int,
) -> tuple[float, float]:
  """One epoch with a progress bar; returns the mean loss and test accuracy.

  The loss is on the noisy labels in training mode. Stops the run on a
  non-finite loss.
  """
  model.train()
  batches = data.iterate_batches(ds.x_train, ds.y_train, args.batch_size, rng)
  losses, steps = [], len(ds.x_train) // args.batch_size
  with tqdm(total=steps, unit="step", desc=f"epoch {epoch}/{args.epochs}") as bar:
    for x, y in batches:
      losses.append(float(train_step(model, optimizer, x, y)))  # waits for it
      bar.update()
      if not math.isfinite(losses[-1]):
        raise SystemExit(
          f"error: the training loss is {losses[-1]} at epoch {epoch}: the "
          f"run diverged; try a lower --lr (now {args.lr})"
        )
    accuracy = evaluate(model, ds.x_test, ds.y_test)
    bar.set_postfix(loss=f"{np.mean(losses):.3f}", test_acc=f"{accuracy:.3f}")
  return float(np.mean(losses)), accuracy


def report(
  args: argparse.Namespace,
  model: nnx.Module,
  ds: data.Dataset,
  history: dict[str, list[float]],
  start: float,
) -> dict[str, Any]:
  """Measures flatness on 512 training samples; prints and saves the results."""
  model.eval()
  probe = jax.device_get(
    flatness(model, ds.x_train[:512], ds.y_train[:512], jax.random.key(args.seed))
  )
  results: dict[str, Any] = {
    "args": {k: v for k, v in vars(args).items() if k != "output"},
    **history,
    "final_test_accuracy": history["test_accuracy"][-1],
    "final_train_loss": history["train_loss"][-1],
    "grad_norm": float(probe[0]),
    "hessian_top_eigenvalue": float(probe[1]),
    "wall_time_s": time.perf_counter() - start,
  }
  print(
    "test accuracy {final_test_accuracy:.3f} | final train loss "
    "{final_train_loss:.3f} | top Hessian eigenvalue "
    "{hessian_top_eigenvalue:.2f} | {wall_time_s:.1f} s".format(**results)
  )
  if args.output:
    pathlib.Path(args.output).write_text(json.dumps(results, indent=1))
  return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains one model as the flags (``sys.argv[1:]`` when None) say.

  Returns:
    ``{"args", "train_loss": [per epoch], "test_accuracy": [per epoch],
    "final_train_loss", "final_test_accuracy", "grad_norm",
    "hessian_top_eigenvalue", "wall_time_s"}``, as written to ``--output``.
  """
  args = parse_args(argv)
  start = time.perf_counter()
  ds, model, optimizer = setup(args)
  print(
    f"{args.method} on {args.dataset} ({args.label_noise:.0%} label noise), "
    f"{args.model} ({models.count_params(model):,} parameters), "
    f"{args.epochs} epochs of batch {args.batch_size}, peak lr {args.lr}, "
    f"seed {args.seed}"
  )
  rng = np.random.default_rng(args.seed)  # the batch order
  history: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
  for epoch in range(1, args.epochs + 1):
    loss, accuracy = train_epoch(model, optimizer, ds, args, rng, epoch)
    history["train_loss"].append(loss)
    history["test_accuracy"].append(accuracy)
  return report(args, model, ds, history, start)


if __name__ == "__main__":
  main()
