"""Several devices: jit + NamedSharding, FSDP, shard_map / pmap, every_k.

The checks need 8 devices, and JAX fixes the device count when it starts, so
each test runs `tests/sharding_checks.py` (or the data-parallel example) in a
subprocess with 8 simulated CPU devices; see that file for what each group
checks and against which reference. One subprocess per test keeps the groups
apart under pytest-xdist.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from gnorm_optax.examples import distributed

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent
CHECKS = TESTS / "sharding_checks.py"
NUM_DEVICES = 8
TIMEOUT_S = 300


def _env() -> dict[str, str]:
  env = dict(os.environ)
  flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  return env


def _run(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, *args],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
    check=False,
  )


_RESULTS: dict[str, dict[str, dict]] = {}


def group_results(group: str) -> dict[str, dict]:
  """`{check name: result}` of one group of `sharding_checks.py` (run once)."""
  if group not in _RESULTS:
    proc = _run(str(CHECKS), group)
    results = [
      json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")
    ]
    if proc.returncode != 0 or not results:
      pytest.fail(
        f"sharding_checks.py {group} exited with {proc.returncode}:\n"
        f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
      )
    _RESULTS[group] = {r["name"]: r for r in results}
  return _RESULTS[group]


def assert_all_passed(group: str) -> None:
  results = group_results(group)
  failed = [f"{name}: {r['message']}" for name, r in results.items() if not r["ok"]]
  summary = f"{len(failed)}/{len(results)} checks failed:\n"
  assert not failed, summary + "\n".join(failed)


def test_jit_with_sharded_batch_matches_single_device():
  """jit + NamedSharding(P('data')): replicated (Auto and Explicit meshes) and
  FSDP params, every second-gradient transform, two steps, rtol 1e-5."""
  assert_all_passed("jit")
  assert len(group_results("jit")) == 3 * 7


def test_shard_map_and_pmap_match_per_shard_reference():
  """axis_name='data', sync_perturbation True and False (m-sharpness), under
  shard_map (check_vma False / True) and pmap, vs a per-shard reference."""
  assert_all_passed("mapped")
  names = group_results("mapped")
  assert {
    "shard_map sam local",
    "pmap sam local",
    "shard_map check_vma sam local",
    "shard_map gradient_regularization sync",
  } <= set(names)


def test_every_k_under_sharding():
  """sam(every_k=3), 6 steps: jit + mesh (replicated, FSDP) and shard_map
  (synchronized, m-sharpness; MLP and CNN) match the single-device run or a
  per-shard replay."""
  assert_all_passed("every_k")


def test_explicit_mesh_fsdp_every_k_and_inject_with_donation():
  """Explicit axes, FSDP params, params and state donated: every transform
  with every_k=3 and under inject_hyperparams equals the unsharded run."""
  assert_all_passed("explicit")
  assert len(group_results("explicit")) == 2 * 7


@pytest.mark.parametrize("case", ["local_loss", "pmean_loss"])
def test_gradient_already_reduced_by_shard_map_is_rejected(case):
  result = group_results("reduced")[f"reduced gradient {case}"]
  assert result["ok"], result["message"]


def test_data_parallel_example_on_8_devices():
  proc = _run(
    "-m",
    "gnorm_optax.examples.data_parallel",
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--model",
    "mlp",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "devices: 8 x cpu" in out and "batch 64 = 8 x 8 per device" in out, out
  assert "epoch   1  train loss" in out, out
  assert "in 1 process(es)" in out, out
  assert "parameters replicated over 8 device(s)" in out, out
  accuracy = float(out.split("test accuracy")[1].split()[0])
  assert 0.2 < accuracy <= 1.0, out  # 1 epoch: well above chance (0.1)


def test_data_parallel_example_rejects_indivisible_batch_size():
  proc = _run("-m", "gnorm_optax.examples.data_parallel", "--batch-size", "60")
  assert proc.returncode == 2
  assert (
    "--batch-size must be a positive multiple of the number of devices (8)"
    in proc.stderr
  ), proc.stderr
  assert "got 60. Use e.g. --batch-size 56" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
  "batch_size,devices,ok",
  [
    (64, 8, True),
    (8, 8, True),
    (60, 8, False),
    (4, 8, False),
    (0, 1, False),
    (7, 1, True),
  ],
)
def test_check_batch_size(batch_size, devices, ok):
  if ok:
    distributed.check_batch_size(batch_size, devices)
  else:
    with pytest.raises(ValueError, match="multiple of the number of devices"):
      distributed.check_batch_size(batch_size, devices)
