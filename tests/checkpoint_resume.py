"""Checkpoint helpers for tests/test_checkpoint.py, and the resume script.

A case of the conformance list (`conftest.CASES`), or `inject:ID` for case ID
under `optax.inject_hyperparams`, trains a small problem (chained in front of
`sgd` with momentum, or alone for a whole optimizer) with a batch that
depends on the step. `save` writes `{"params", "opt_state"}` with
orbax-checkpoint's `CheckpointManager`; `restore` reads it back into the
abstract target `jax.eval_shape(tx.init, params)` of a freshly built
transform, so NamedTuple states and `None` caches come back with their
structure.

Run as a script, it resumes in a new process:

    python tests/checkpoint_resume.py CKPT_ROOT OUT.npz STOP CASE_ID...

restores each case from `CKPT_ROOT/CASE_ID` (latest step), trains up to step
STOP and writes the final params and state leaves to OUT.npz. (As a script,
it imports the shared cases and problem from conftest.py directly; the tests
get them from conftest's fixtures.)
"""

from __future__ import annotations

import functools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from conftest import CASES_BY_ID
from conftest import in_front_of
from conftest import loss_fn
from conftest import make_params

# One case per kind of optimizer state (the other cases hold the same state
# types with other values). With the sgd-with-momentum base, each also holds
# an optax TraceState.
KINDS = (
  # SecondGradientState without a cache (every second-gradient transform
  # with every_k=1: the same fields; the central scheme's two gradients).
  "finite_difference_gr-central",
  # SecondGradientState with the every_k cache.
  "sam-every_k=3",
  # FloodingState's count.
  "flooding",
  # AGR's EmptyState in front of optax's adamw moments (ScaleByAdamState).
  "agr_adamw",
  # The library's own Adan state and proximal step count (agr_adan: AGR in
  # front of what gx.adan holds).
  "agr_adan",
  # inject_hyperparams: the hyperparameters in the state, every_k an array
  # (traced under jax.eval_shape), so the cache is always kept.
  "inject:finite_difference_gr-central-every_k=3",
)


def build(case_id: str):
  """`(case, tx)`: a fresh transformation for `case_id`."""
  inject = case_id.startswith("inject:")
  case = CASES_BY_ID[case_id.removeprefix("inject:")]
  make = optax.inject_hyperparams(case.make) if inject else case.make
  return case, in_front_of(case, make(**case.hparams), optax.sgd(0.05, momentum=0.9))


def batch_loss(params, x):
  """The conformance loss around a step-dependent centre `x` (the batch)."""
  return loss_fn(jax.tree.map(lambda p: p - x.astype(p.dtype), params))


def batch(t: int) -> jax.Array:
  return jnp.asarray(0.3 * np.sin(0.7 * t + 0.2), jnp.float32)


@functools.cache
def train_step(case_id: str):
  """Jitted `(params, state, x) -> (params, state)` of a fresh `build(case_id)`."""
  case, tx = build(case_id)

  def step(params, state, x):
    value, grads = jax.value_and_grad(batch_loss)(params, x)
    kwargs = {}
    if case.needs == "grad_fn":
      kwargs["grad_fn"] = lambda p: jax.grad(batch_loss)(p, x)
    elif case.needs == "value":
      kwargs["value"] = value
    updates, state = tx.update(grads, state, params, **kwargs)
    return optax.apply_updates(params, updates), state

  return tx, jax.jit(step)


def train(case_id: str, params, state, start: int, stop: int):
  _, step = train_step(case_id)
  for t in range(start, stop):
    params, state = step(params, state, batch(t))
  return params, state


def save(directory, step: int, params, state) -> None:
  """Saves `{"params", "opt_state"}` at `step` (the README's recipe)."""
  with ocp.CheckpointManager(pathlib.Path(directory).absolute()) as mngr:
    mngr.save(step, args=ocp.args.StandardSave({"params": params, "opt_state": state}))
    mngr.wait_until_finished()


def restore(directory, tx, params_like, weak_types: bool = True):
  """`(step, params, state)` of the latest checkpoint, restored into the
  abstract target built from a fresh `tx` (the README's recipe)."""
  abstract = {
    "params": jax.eval_shape(lambda: params_like),
    "opt_state": jax.eval_shape(tx.init, params_like),
  }
  with ocp.CheckpointManager(pathlib.Path(directory).absolute()) as mngr:
    step = mngr.latest_step()
    restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
  # orbax restores every array strongly typed; inject_hyperparams keeps
  # Python-number hyperparameters weakly typed. Give them back their weak type,
  # or the jitted step traces once more for the restored state.
  if weak_types:
    restored = jax.tree.map(
      lambda t, x: (
        jax.device_put(jnp.asarray(x.item()), x.sharding) if t.weak_type else x
      ),
      abstract,
      restored,
    )
  return step, restored["params"], restored["opt_state"]


def flat(params, state) -> dict[str, np.ndarray]:
  """Named numpy leaves of params and state, for bitwise comparison."""
  out = {}
  for prefix, tree in (("params", params), ("state", state)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      out[prefix + jax.tree_util.keystr(path)] = np.asarray(leaf)
  return out


def main(argv: list[str]) -> None:
  root, out, stop, *ids = argv
  arrays = {}
  for case_id in ids:
    tx, _ = train_step(case_id)
    start, params, state = restore(pathlib.Path(root) / case_id, tx, make_params())
    params, state = train(case_id, params, state, start, int(stop))
    arrays.update({f"{case_id}|{k}": v for k, v in flat(params, state).items()})
  np.savez(out, **arrays)


if __name__ == "__main__":
  main(sys.argv[1:])
