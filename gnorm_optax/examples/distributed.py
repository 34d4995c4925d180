"""Several processes and one global mesh: the data-parallel example's plumbing.

``add_flags`` and ``check_flags`` give a script ``jax.distributed``'s
arguments as flags; ``initialize`` joins the other processes (gloo
collectives on CPU, a heartbeat so that a dead process stops the others);
``put_global``, ``put_batch`` and ``state_shardings`` place the replicated or
FSDP-sharded state and each process's rows of a batch on the global mesh.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from gnorm_optax.examples import train


def add_flags(p: argparse.ArgumentParser) -> None:
  """Adds ``jax.distributed.initialize``'s arguments to ``p`` as flags."""
  count = train._checked(int, lambda v: v >= 1, "a positive integer")
  index = train._checked(int, lambda v: v >= 0, "an integer >= 0")
  address = train._checked(
    str,
    lambda v: v.rpartition(":")[0] != "" and 0 < int(v.rpartition(":")[2]) < 2**16,
    "HOST:PORT, e.g. 10.0.0.1:1234",
  )
  g = p.add_argument_group(
    "several processes",
    "jax.distributed.initialize's arguments; none: one process",
  )
  g.add_argument("--coordinator-address", type=address, help="process 0's HOST:PORT")
  g.add_argument("--num-processes", type=count, help="the processes in the run")
  g.add_argument("--process-id", type=index, help="this one, < --num-processes")
  g.add_argument(
    "--distributed", action="store_true", help="let JAX find the ones not given"
  )
  g.add_argument(
    "--init-timeout", type=count, default=300, help="seconds to wait for the others"
  )
  g.add_argument(
    "--heartbeat-timeout",
    type=count,
    default=60,
    help="seconds until a silent process counts as dead (and the longest a "
    "failed one waits for the others at exit)",
  )


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """Exits with status 2, naming the flag, unless the process flags agree."""
  given = {
    "--coordinator-address": args.coordinator_address,
    "--num-processes": args.num_processes,
    "--process-id": args.process_id,
  }
  missing = [flag for flag, value in given.items() if value is None]
  present = [flag for flag, value in given.items() if value is not None]
  if not args.distributed and missing and present:
    parser.error(
      f"argument {missing[0]}: required with {' and '.join(present)}; give "
      "all three (or --distributed, where JAX finds them: Cloud TPU, SLURM, "
      "Open MPI)"
    )
  if None not in (args.num_processes, args.process_id) and not (
    args.process_id < args.num_processes
  ):
    parser.error(
      f"argument --process-id: must be < --num-processes {args.num_processes}, "
      f"got {args.process_id}; number the processes 0 to {args.num_processes - 1}"
    )


def initialize(args: argparse.Namespace) -> None:
  """Joins the other processes through ``jax.distributed`` if the flags say so.

  A process that stops sending heartbeats for ``--heartbeat-timeout`` seconds
  counts as dead: JAX then terminates every other process with an error
  instead of leaving them blocked in a collective. The same bound applies to
  the barrier where finishing processes wait for each other.
  """
  if args.num_processes is None and not args.distributed:
    return
  jax.distributed.initialize(
    coordinator_address=args.coordinator_address,
    num_processes=args.num_processes,
    process_id=args.process_id,
    initialization_timeout=args.init_timeout,
    heartbeat_timeout_seconds=args.heartbeat_timeout,
    shutdown_timeout_seconds=args.heartbeat_timeout,
  )
  # Collectives between CPU processes (GPUs and TPUs bring their own); set
  # before the first computation creates the devices.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def check_batch_size(batch_size: int, num_devices: int) -> None:
  """Raises a ValueError unless ``batch_size`` splits evenly over the devices."""
  if batch_size < 1 or batch_size % num_devices:
    fit = max(num_devices, batch_size // num_devices * num_devices)
    raise ValueError(
      f"--batch-size must be a positive multiple of the number of devices "
      f"({num_devices}), so that every device gets the same share of the "
      f"batch; got {batch_size}. Use e.g. --batch-size {fit}."
    )


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
  """``P()`` for every leaf; with ``fsdp``, leaves split over 'data' along
  their first axis that the number of devices divides (others replicated)."""

  def sharding(x: Any) -> NamedSharding:
    axes = [i for i, n in enumerate(x.shape) if fsdp and n % mesh.size == 0]
    return NamedSharding(mesh, P(*[None] * axes[0], "data") if axes else P())

  return jax.tree.map(sharding, tree)


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """The global array of ``sharding`` from ``x``, which every process holds
  (each process places only the shards of its own devices)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def put_batch(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global batch ``x`` sharded over 'data', each process feeding only the
  rows of its own devices (a real input pipeline would load only those)."""
  shards = sharding.addressable_devices_indices_map(x.shape).values()
  rows = sorted({(i[0].start, i[0].stop) for i in shards if i is not None})
  local = np.concatenate([x[start:stop] for start, stop in rows])
  return jax.make_array_from_process_local_data(sharding, local, x.shape)


def local_value(x: jax.Array) -> np.ndarray:
  """A replicated array's value, read from this process's first shard."""
  return np.asarray(x.addressable_data(0))
