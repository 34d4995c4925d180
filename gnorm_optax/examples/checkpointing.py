"""train.py with an orbax checkpoint every epoch, resumed exactly when rerun.

::

  python -m gnorm_optax.examples.checkpointing --checkpoint-dir /tmp/ckpt --epochs 60
  # stopped or preempted? The same command resumes from the latest epoch.

Takes train.py's flags plus ``--checkpoint-dir``. After every epoch it saves
the model (parameters, BatchNorm statistics, RNG state), the optimizer state,
the batch-order generator and the history so far; rerun, it restores the
latest checkpoint and ends with the same numbers as an uninterrupted run. The
flags are recorded in ``args.json`` there, and a rerun with other ones is
refused (it would splice two runs), naming the flags that differ.
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
import orbax.checkpoint as ocp
from flax import nnx

from gnorm_optax.examples import train

ARGS_FILE = "args.json"
_NOT_RECORDED = ("checkpoint_dir", "output")  # they do not change the run


def parse_args(argv: Sequence[str] | None = None) -> Any:
  """train.py's flags and ``--checkpoint-dir``; refuses a run that differs.

  Exits with argparse's error (status 2) naming every flag whose value
  differs from the one recorded in ``--checkpoint-dir``.
  """
  parser = train.build_parser()
  parser.prog = "python -m gnorm_optax.examples.checkpointing"
  parser.add_argument(
    "--checkpoint-dir",
    required=True,
    type=pathlib.Path,
    help="save there every epoch; resume from there",
  )
  args = train.parse_args(argv, parser)
  args.checkpoint_dir = args.checkpoint_dir.absolute()  # orbax wants it absolute
  refuse_other_args(parser, args)
  return args


def refuse_other_args(
  parser: argparse.ArgumentParser, args: Any, ignore: Sequence[str] = _NOT_RECORDED
) -> None:
  """Exits with ``parser``'s error (status 2) naming every flag whose value
  differs from the one recorded in ``args.checkpoint_dir`` (flags in
  ``ignore`` may change); returns if nothing is recorded there yet."""
  record = args.checkpoint_dir / ARGS_FILE
  if not record.exists():
    return
  old, new = json.loads(record.read_text()), _recorded(args, ignore)
  diffs = [
    f"--{k.replace('_', '-')} {old.get(k)} (now {new.get(k)})"
    for k in sorted({*old, *new})
    if old.get(k) != new.get(k)
  ]
  if diffs:
    parser.error(
      f"argument --checkpoint-dir: {args.checkpoint_dir} holds a run with "
      f"other arguments: {', '.join(diffs)}; use a new --checkpoint-dir or "
      "delete the old one"
    )


def record_args(args: Any, ignore: Sequence[str] = _NOT_RECORDED) -> None:
  """Writes the flags that define the run to ``args.checkpoint_dir``."""
  (args.checkpoint_dir / ARGS_FILE).write_text(json.dumps(_recorded(args, ignore)))


def _recorded(args: Any, ignore: Sequence[str]) -> dict[str, Any]:
  return {k: v for k, v in vars(args).items() if k not in ignore}


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _arrays(model: nnx.Module, optimizer: nnx.Optimizer) -> Any:
  """Model and optimizer state as arrays, PRNG keys as their key data (orbax
  stores no key arrays)."""
  state = nnx.as_pure({"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def save(mngr, epoch, model, optimizer, rng, history) -> None:
  """Saves everything the run needs to continue after ``epoch``."""
  meta = {"rng": rng.bit_generator.state, "history": history}
  mngr.save(
    epoch,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(_arrays(model, optimizer)),
      meta=ocp.args.JsonSave(meta),
    ),
  )


def restore(mngr, model, optimizer, rng) -> tuple[int, Any]:
  """Restores the latest checkpoint in place, laid out as the current state
  (on any devices and processes); returns its epoch and the saved history."""
  epoch = mngr.latest_step()
  like = nnx.as_pure({"model": nnx.state(model), "optimizer": nnx.state(optimizer)})
  restored = mngr.restore(
    epoch,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_arrays(model, optimizer)),
      meta=ocp.args.JsonRestore(),
    ),
  )
  state = jax.tree.map(
    lambda v, x: (
      jax.random.wrap_key_data(v, impl=jax.random.key_impl(x)) if _is_key(x) else v
    ),
    restored["state"],
    like,
  )
  nnx.update(model, state["model"])
  nnx.update(optimizer, state["optimizer"])
  rng.bit_generator.state = restored["meta"]["rng"]
  return epoch, restored["meta"]["history"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Trains (or resumes) one run as the flags say; returns train.py's results."""
  args = parse_args(argv)
  start = time.perf_counter()
  ds, model, optimizer = train.setup(args)
  rng = np.random.default_rng(args.seed)  # the batch order
  history: dict[str, list[float]] = {"train_loss": [], "test_accuracy": []}
  options = ocp.CheckpointManagerOptions(max_to_keep=2)
  with ocp.CheckpointManager(args.checkpoint_dir, options=options) as mngr:
    done = 0
    if mngr.latest_step() is None:
      record_args(args)
    else:
      done, history = restore(mngr, model, optimizer, rng)
      print(f"resumed after epoch {done} from {args.checkpoint_dir}")
    for epoch in range(done + 1, args.epochs + 1):
      loss, accuracy = train.train_epoch(model, optimizer, ds, args, rng, epoch)
      history["train_loss"].append(loss)
      history["test_accuracy"].append(accuracy)
      save(mngr, epoch, model, optimizer, rng, history)
  args.checkpoint_dir = str(args.checkpoint_dir)  # JSON for --output
  return train.report(args, model, ds, history, start)


if __name__ == "__main__":
  main()
