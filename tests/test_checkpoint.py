"""Checkpoints: every transform's optimizer state saves and restores with
orbax-checkpoint, and a run stopped at step N and resumed (in this process
into fresh objects, or in a new process) continues bit for bit.

The cases: one of the conformance suite's cases per kind of optimizer state
(`checkpoint_resume.KINDS`: a second-gradient state with and without the
every_k cache, flooding's, optax's adamw moments, the library's Adan state,
and a state under `optax.inject_hyperparams`); each trains in front of `sgd`
with momentum (or alone, for a whole optimizer). The run stops at step 4:
with `every_k=3` the next step reuses the correction cached on step 3, so the
cache and the counters must come back exactly.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import checkpoint_resume as cr
import jax
import numpy as np
import pytest

import gnorm_optax as gx

STOP, END = 4, 8


def assert_bitwise_equal(got: dict, want: dict):
  assert got.keys() == want.keys()
  for key, w in want.items():
    g = got[key]
    assert g.dtype == w.dtype and g.shape == w.shape, key
    assert g.tobytes() == w.tobytes(), f"{key}: {g} != {w}"


def second_gradient_states(state):
  def is_sg(x):
    return isinstance(x, gx.SecondGradientState)

  return [x for x in jax.tree.leaves(state, is_leaf=is_sg) if is_sg(x)]


@pytest.mark.parametrize("case_id", cr.KINDS)
def test_abstract_init_matches_init(case_id, make_params):
  """`jax.eval_shape(tx.init, params)`, the restore target, has the structure,
  shapes and dtypes of `tx.init(params)` (also under inject_hyperparams,
  where every_k is traced in the abstract evaluation)."""
  _, tx = cr.build(case_id)
  params = make_params()

  def spec(t):
    return jax.tree.map(lambda x: (x.shape, x.dtype), t)

  abstract = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(abstract) == jax.tree.structure(tx.init(params))
  assert spec(abstract) == spec(tx.init(params))


@pytest.mark.parametrize("case_id", cr.KINDS)
def test_restored_state_continues_bitwise(case_id, tmp_path, make_params):
  params0 = make_params()
  tx, _ = cr.train_step(case_id)
  want_params, want_state = cr.train(case_id, params0, tx.init(params0), 0, END)

  params, state = cr.train(case_id, params0, tx.init(params0), 0, STOP)
  cr.save(tmp_path, STOP, params, state)
  saved = cr.flat(params, state)
  del params, state

  _, fresh_tx = cr.build(case_id)
  step, params, state = cr.restore(tmp_path, fresh_tx, params0)
  assert step == STOP
  assert jax.tree.structure(state) == jax.tree.structure(tx.init(params0))
  assert_bitwise_equal(cr.flat(params, state), saved)
  for sg in second_gradient_states(state):
    assert int(sg.count) == STOP
    # A cache exists with every_k=3 and under inject_hyperparams (every_k is
    # an array there); the one of step 3 came back, not zeros.
    if "every_k" in case_id or case_id.startswith("inject:"):
      assert any(np.any(np.asarray(c) != 0) for c in jax.tree.leaves(sg.correction))
    else:
      assert sg.correction is None

  got_params, got_state = cr.train(case_id, params, state, STOP, END)
  assert_bitwise_equal(cr.flat(got_params, got_state), cr.flat(want_params, want_state))
  # The state matters: resuming from a fresh tx.init state does not continue
  # the run (so the equality above is not trivially true).
  other, _ = cr.train(case_id, params, tx.init(params0), STOP, END)
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(want_params), strict=True)
  )


def test_resume_in_a_new_process_is_bitwise(tmp_path, make_params):
  """Every kind of state, saved here, restored and trained on in a new
  process (fresh objects, nothing cached), equals the unbroken run here."""
  params0 = make_params()
  want = {}
  for case_id in cr.KINDS:
    tx, _ = cr.train_step(case_id)
    params, state = cr.train(case_id, params0, tx.init(params0), 0, STOP)
    cr.save(tmp_path / "ckpt" / case_id, STOP, params, state)
    params, state = cr.train(case_id, params, state, STOP, END)
    want.update({f"{case_id}|{k}": v for k, v in cr.flat(params, state).items()})

  out = tmp_path / "resumed.npz"
  script = pathlib.Path(cr.__file__)
  proc = subprocess.run(
    [
      sys.executable,
      str(script),
      str(tmp_path / "ckpt"),
      str(out),
      str(END),
      *cr.KINDS,
    ],
    capture_output=True,
    text=True,
    timeout=300,
    cwd=script.parent,
    env={
      **os.environ,
      "PYTHONPATH": os.pathsep.join(
        [
          str(script.parent),
          str(script.parent.parent),
          os.environ.get("PYTHONPATH", ""),
        ]
      ),
    },
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(out) as resumed:
    got = {k: resumed[k] for k in resumed.files}
  assert_bitwise_equal(got, want)


@pytest.mark.parametrize("weak_types", [True, False])
def test_restored_injected_state_does_not_retrace(tmp_path, weak_types, make_params):
  """The README's recipe gives injected hyperparameters back their weak type,
  so the step compiled for the running state serves the restored one
  (without that line it traces again). The state is committed to the device
  from the start, as orbax's restored arrays are: jit keys its cache on that
  too."""
  case_id = "inject:finite_difference_gr-central-every_k=3"  # in cr.KINDS
  tx, step = cr.train_step(case_id)
  params0 = make_params()
  device = jax.devices()[0]
  params, state = cr.train(
    case_id,
    jax.device_put(params0, device),
    jax.device_put(tx.init(params0), device),
    0,
    STOP,
  )
  cr.save(tmp_path, STOP, params, state)
  before = step._cache_size()
  _, params, state = cr.restore(tmp_path, tx, params0, weak_types=weak_types)
  cr.train(case_id, params, state, STOP, STOP + 1)
  assert step._cache_size() == before + (0 if weak_types else 1)
