"""Data-parallel training with SAM over every device of one or several processes.

::

  python -m gnorm_optax.examples.data_parallel --method sam --epochs 10

  # Two processes of 2 CPU devices each on one machine, one shell per process:
  export XLA_FLAGS=--xla_force_host_platform_device_count=2
  python -m gnorm_optax.examples.data_parallel --coordinator-address \\
      127.0.0.1:1234 --num-processes 2 --process-id 0      # and --process-id 1

A one-axis ``Mesh`` spans all devices of all processes. Each process feeds its
own rows of every global batch (``jax.make_array_from_process_local_data``);
the parameters and the optimizer state are replicated (``P()``) or, with
``--fsdp``, split over 'data'. One ``jax.jit``-compiled step does the rest:
XLA inserts the all-reduce of the gradients, and the gradient that
``gnorm_optax.sam`` takes at the perturbed parameters (through ``grad_fn``) is
global as well. The optimizer code is the single-device code: no
``axis_name`` and no ``pmean`` (those are for ``shard_map``; see the README's
"Several devices"). Only process 0 prints and writes files.

Several hosts: run the command once per host with ``--coordinator-address``,
``--num-processes`` and ``--process-id`` (the arguments of
``jax.distributed.initialize``), or with ``--distributed`` alone on Cloud TPU,
SLURM or Open MPI, where JAX finds them. CPU processes exchange collectives
over gloo. If a process dies, JAX aborts the others ("another task died")
within ``--heartbeat-timeout`` seconds instead of letting them hang; a process
that fails with a Python error waits at most as long for the others at exit.
With ``--checkpoint-dir``, the same command, rerun, resumes after the last
saved epoch, also with another number of processes or devices.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import gnorm_optax as gx
from gnorm_optax.examples import checkpointing
from gnorm_optax.examples import data
from gnorm_optax.examples import distributed
from gnorm_optax.examples import train
from gnorm_optax.examples.models import make_model
from gnorm_optax.flax import nnx_grad_fn

METHODS = ("sam", "sgd", "gnp", "fdgr", "agr_adamw")
# Flags that do not change the numbers: a resumed run may set them differently
# (the parameters' layout and the processes included).
NOT_RECORDED = tuple(
  "epochs checkpoint_dir output fsdp coordinator_address num_processes "
  "process_id distributed init_timeout heartbeat_timeout".split()
)


def make_optimizer(
  method: str, lr: float, rho: float, every_k: int = 1, momentum: float = 0.9
) -> optax.GradientTransformationExtraArgs:
  """SAM, GNP (``alpha=0.8``) or forward F-GR (``gamma=0.1``, ``epsilon=0.01``)
  in front of SGD with momentum; plain SGD; or AGR-AdamW (``lr`` its own).

  ``every_k`` is the second-gradient transforms' (SAM, GNP, F-GR).
  """
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if method == "agr_adamw":
    return gx.agr_adamw(lr)
  first = {
    "sam": lambda: gx.sam(rho, every_k=every_k),
    "gnp": lambda: gx.penalized_grad(rho, alpha=0.8, every_k=every_k),
    "fdgr": lambda: gx.finite_difference_gr(0.1, 0.01, every_k=every_k),
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


def build_parser() -> argparse.ArgumentParser:
  """The command-line flags (``--help`` lists them)."""
  p = argparse.ArgumentParser(
    prog="python -m gnorm_optax.examples.data_parallel",
    description=__doc__.splitlines()[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  count = train._checked(int, lambda v: v >= 1, "a positive integer")
  seed = train._checked(int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
  positive = train._checked(float, lambda v: 0 < v < float("inf"), "a number > 0")
  nonneg = train._checked(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
  fraction = train._checked(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
  add = p.add_argument
  add("--method", choices=METHODS, default="sam", help="the optimizer")
  add("--model", choices=("cnn", "mlp"), default="cnn", help="the architecture")
  add("--epochs", type=count, default=10, help="passes over the training set")
  add("--batch-size", type=count, default=128, help="global; devices divide it")
  add("--lr", type=positive, default=argparse.SUPPRESS, help="0.05; agr_adamw 3e-3")
  add("--rho", type=nonneg, default=0.05, help="perturbation radius (sam, gnp)")
  add("--every-k", type=count, default=1, help="second gradient every k steps")
  add("--label-noise", type=fraction, default=0.0, help="fraction of wrong labels")
  add("--seed", type=seed, default=0, help="split, noise, weights, batch order")
  add("--fsdp", action="store_true", help="shard parameters and state over 'data'")
  add("--checkpoint-dir", type=pathlib.Path, help="save every epoch; resume there")
  add("--output", help="process 0 writes the results there as JSON")
  distributed.add_flags(p)
  return p


def parse_args(
  argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None
) -> argparse.Namespace:
  """Parses and checks the flags; a bad one exits with status 2, naming it."""
  parser = build_parser() if parser is None else parser
  args = parser.parse_args(argv)
  distributed.check_flags(parser, args)
  if "lr" not in args:
    args.lr = 3e-3 if args.method == "agr_adamw" else 0.05
  if args.checkpoint_dir is not None:
    args.checkpoint_dir = args.checkpoint_dir.absolute()  # orbax wants it so
    checkpointing.refuse_other_args(parser, args, NOT_RECORDED)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains as the flags say; returns (process 0 also writes) the results."""
  parser = build_parser()
  args = parse_args(argv, parser)
  try:
    distributed.initialize(args)
  except ValueError as e:  # --distributed where JAX detects no cluster
    parser.error(
      f"argument --distributed: {e} JAX finds it on Cloud TPU, SLURM and Open "
      "MPI; elsewhere give --coordinator-address, --num-processes, --process-id"
    )
  devices, lead = jax.devices(), jax.process_index() == 0
  log = print if lead else lambda *_: None
  try:
    distributed.check_batch_size(args.batch_size, len(devices))
  except ValueError as e:
    parser.error(str(e))
  mesh = Mesh(np.array(devices), ("data",))
  batch_sharding, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  log(
    f"devices: {len(devices)} x {devices[0].platform} ({devices[0].device_kind})"
    f" in {jax.process_count()} process(es); mesh {dict(mesh.shape)}; batch "
    f"{args.batch_size} = {len(devices)} x {args.batch_size // len(devices)} "
    "per device"
  )
  ds = data.load_digits(label_noise=args.label_noise, seed=args.seed)
  model = make_model(args.model, args.seed, ds.x_train.shape[1:], data.NUM_CLASSES)
  tx = make_optimizer(args.method, args.lr, args.rho, args.every_k)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Place the state on the global mesh: replicated, or split with --fsdp.
  state = nnx.state((model, optimizer))
  shardings = distributed.state_shardings(state, mesh, args.fsdp)
  nnx.update((model, optimizer), jax.tree.map(distributed.put_global, state, shardings))
  rng = np.random.default_rng(args.seed)  # the batch order, the same everywhere
  history: list[float] = []
  mngr = None
  if args.checkpoint_dir is not None:
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    mngr = ocp.CheckpointManager(args.checkpoint_dir, options=options)
    if mngr.latest_step() is not None:
      done, history = checkpointing.restore(mngr, model, optimizer, rng)
      log(f"resumed after epoch {done} from {args.checkpoint_dir}")
    elif lead:
      checkpointing.record_args(args, NOT_RECORDED)
  log(f"method {args.method}, model {args.model}, {args.epochs} epoch(s)")
  for epoch in range(len(history) + 1, args.epochs + 1):
    start = time.perf_counter()
    model.train()
    put = distributed.put_batch  # each process feeds its own rows
    losses = [
      train_step(model, optimizer, put(x, batch_sharding), put(y, batch_sharding))
      for x, y in data.iterate_batches(ds.x_train, ds.y_train, args.batch_size, rng)
    ]
    history.append(float(np.mean([distributed.local_value(v) for v in losses])))
    seconds = time.perf_counter() - start
    log(f"epoch {epoch:3d}  train loss {history[-1]:.4f}  ({seconds:.1f} s)")
    if mngr is not None:
      checkpointing.save(mngr, epoch, model, optimizer, rng, history)
  if mngr is not None:
    mngr.close()  # waits for the last save
  model.eval()
  test = (ds.x_test, ds.y_test)
  x_test, y_test = (distributed.put_global(v, replicated) for v in test)
  correct = distributed.local_value(count_correct(model, x_test, y_test))
  accuracy = int(correct) / len(ds.y_test)
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  replicated_params = all(p.sharding.is_fully_replicated for p in params)
  layout = "replicated" if replicated_params else "FSDP-sharded"
  log(f"parameters {layout} over {len(params[0].sharding.device_set)} device(s)")
  log(f"test accuracy {accuracy:.4f}")
  results = {
    "processes": jax.process_count(),
    "devices": len(devices),
    "parameters": layout,
    "train_loss": history,
    "test_accuracy": accuracy,
  }
  if args.output and lead:
    pathlib.Path(args.output).write_text(json.dumps(results, indent=1))
  return results


if __name__ == "__main__":
  main()
