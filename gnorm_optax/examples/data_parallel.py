"""Data-parallel training with SAM on every visible device.

    python -m gnorm_optax.examples.data_parallel --method sam --epochs 10

The batch is split over a one-axis ``Mesh`` of all devices
(``NamedSharding(mesh, P("data"))``), the parameters and the optimizer state
are replicated (``P()``), and one ``jax.jit``-compiled step does the rest: XLA
inserts the all-reduce of the gradients, and the gradient that
``gnorm_optax.sam`` takes at the perturbed parameters (through ``grad_fn``) is
global as well. Nothing in the optimizer changes for several devices: no
``axis_name``, no ``pmean`` (those are for ``shard_map`` / ``pmap``, see the
README's "Several devices").

Try it on one CPU with 8 simulated devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python -m gnorm_optax.examples.data_parallel --epochs 3

On several GPUs, or a TPU host, the same command uses all local devices; on
several hosts, call ``jax.distributed.initialize()`` first (``--distributed``)
and run the command on every host.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm_optax as gx
from gnorm_optax.examples import data
from gnorm_optax.examples.models import make_model
from gnorm_optax.flax import nnx_grad_fn

METHODS = ("sam", "sgd", "gnp")


def make_optimizer(
  method: str, lr: float, rho: float, momentum: float = 0.9
) -> optax.GradientTransformationExtraArgs:
  """``chain(<gradient transform>, sgd)``: SAM, GNP (``alpha=0.8``) or plain SGD."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  first = {
    "sam": lambda: gx.sam(rho),
    "gnp": lambda: gx.penalized_grad(rho, alpha=0.8),
    "sgd": optax.identity,
  }[method]()
  return optax.chain(first, optax.sgd(lr, momentum=momentum))


def loss_fn(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy of ``model`` on the batch ``(x, y)``."""
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@nnx.jit
def train_step(
  model: nnx.Module, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
  """One step on a batch sharded over 'data'; the same code as on one device."""
  grad_fn = nnx_grad_fn(model, loss_fn, x, y)  # the gradient at other params
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads, grad_fn=grad_fn)
  return loss


@nnx.jit
def count_correct(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return (model(x).argmax(axis=-1) == y).sum()


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """Raises a ValueError unless ``batch_size`` splits evenly over the devices."""
  if batch_size < 1 or batch_size % num_devices:
    fit = max(num_devices, batch_size // num_devices * num_devices)
    raise ValueError(
      f"--batch-size must be a positive multiple of the number of devices "
      f"({num_devices}), so that every device gets the same share of the "
      f"batch; got {batch_size}. Use e.g. --batch-size {fit}."
    )


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", choices=METHODS, default="sam")
  parser.add_argument("--epochs", type=int, default=10)
  parser.add_argument(
    "--batch-size",
    type=int,
    default=128,
    help="global batch size; must be divisible by the number of devices",
  )
  parser.add_argument("--model", choices=("cnn", "mlp"), default="cnn")
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument("--rho", type=float, default=0.05)
  parser.add_argument("--label-noise", type=float, default=0.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (one process per host)",
  )
  args = parser.parse_args(argv)
  if args.epochs < 1:
    parser.error(f"--epochs must be at least 1, got {args.epochs}")
  if args.distributed:
    jax.distributed.initialize()

  devices = jax.devices()
  try:
    check_batch_size(args.batch_size, len(devices))
  except ValueError as e:
    parser.error(str(e))
  mesh = Mesh(np.array(devices), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  per_device = args.batch_size // len(devices)
  print(
    f"devices: {len(devices)} x {devices[0].platform} "
    f"({devices[0].device_kind}), {jax.process_count()} process(es); "
    f"mesh {dict(mesh.shape)}; batch {args.batch_size} = "
    f"{len(devices)} x {per_device} per device"
  )

  ds = data.load_digits(label_noise=args.label_noise, seed=args.seed)
  model = make_model(args.model, args.seed, ds.x_train.shape[1:], data.NUM_CLASSES)
  optimizer = nnx.Optimizer(
    model, make_optimizer(args.method, args.lr, args.rho), wrt=nnx.Param
  )
  # Replicate the parameters and the optimizer state on every device.
  state = jax.device_put(nnx.state((model, optimizer)), replicated)
  nnx.update((model, optimizer), state)

  def put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    # Each process contributes its addressable shards of the global array
    # (on one host: all of it); here every process holds the whole batch.
    return jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])

  rng = np.random.default_rng(args.seed)
  print(f"method {args.method}, model {args.model}, {args.epochs} epoch(s)")
  for epoch in range(1, args.epochs + 1):
    start = time.perf_counter()
    model.train()
    losses = [
      train_step(model, optimizer, put(xb, batch_sharding), put(yb, batch_sharding))
      for xb, yb in data.iterate_batches(ds.x_train, ds.y_train, args.batch_size, rng)
    ]
    loss = float(np.mean(jax.device_get(losses)))
    seconds = time.perf_counter() - start
    print(f"epoch {epoch:3d}  train loss {loss:.4f}  ({seconds:.1f} s)")

  model.eval()
  correct = count_correct(model, put(ds.x_test, replicated), put(ds.y_test, replicated))
  accuracy = int(correct) / len(ds.y_test)
  sharding = jax.tree.leaves(nnx.state(model, nnx.Param))[0].sharding
  print(
    f"parameters replicated on {len(sharding.device_set)} device(s): "
    f"{sharding.is_fully_replicated}"
  )
  print(f"test accuracy {accuracy:.4f}")
  return {"train_loss": loss, "test_accuracy": accuracy}


if __name__ == "__main__":
  main()
