"""Several processes on JAX's distributed runtime, run for real on one machine.

Each test starts real processes: the coordinator on 127.0.0.1 at a free port,
2 simulated CPU devices per process, collectives over gloo. Two processes of
2 devices must give what one process of 4 gives (the same global mesh, batch
and seed), to float32 rounding:

- `tests/multiprocess_run.py` runs the data-parallel example for sam,
  penalized_grad (FSDP), finite_difference_gr (every_k=3) and agr_adamw (FSDP)
  in one set of processes; the saved states are compared leaf by leaf.
- The example's command line runs with --checkpoint-dir: process 1 is killed
  after a checkpoint; process 0 must abort with JAX's error within the
  heartbeat timeout; the run resumes in one process of 4 devices, then again
  in two, and ends where an unbroken run ends.

One test per such scenario (a module-scoped fixture would run once per
pytest-xdist worker). Every process has a timeout and is killed (SIGKILL: JAX
takes SIGTERM as a preemption notice) when its test ends, whatever happened.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import jax
import multiprocess_run
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gnorm_optax.examples import data_parallel

ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN = ROOT / "tests" / "multiprocess_run.py"
EXAMPLE = ["-m", "gnorm_optax.examples.data_parallel"]
TIMEOUT_S = 240  # for any one set of processes, start-up included
HEARTBEAT_S = 10  # --heartbeat-timeout of the run that loses a process
SHORT = ["--model", "mlp", "--batch-size", "128", "--method", "sam"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
  flag = f"--xla_force_host_platform_device_count={devices}"
  env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"  # the output so far, even if it is killed
  return env


class Job:
  """One run: ``processes`` processes of ``devices`` CPU devices each."""

  def __init__(self, logs: pathlib.Path, args: list[str], processes: int, devices: int):
    port = _free_port()
    self.logs = [logs.with_suffix(f".{i}.log") for i in range(processes)]
    self.procs: list[subprocess.Popen] = []
    try:
      for i, log in enumerate(self.logs):
        flags = ["--coordinator-address", f"127.0.0.1:{port}"]
        flags += ["--num-processes", str(processes), "--process-id", str(i)]
        with open(log, "w") as f:
          self.procs.append(
            subprocess.Popen(
              [sys.executable, *args, *(flags if processes > 1 else [])],
              cwd=ROOT,
              env=_env(devices),
              stdout=f,
              stderr=subprocess.STDOUT,
            )
          )
    except BaseException:
      self.kill()  # the ones already started
      raise

  def log(self, i: int) -> str:
    return self.logs[i].read_text()

  def wait(self, timeout: float = TIMEOUT_S) -> list[int]:
    """The exit codes; fails the test, showing the logs, past ``timeout``."""
    deadline = time.monotonic() + timeout
    try:
      return [p.wait(max(0.0, deadline - time.monotonic())) for p in self.procs]
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"no exit within {timeout} s:\n{self.tails()}")

  def check(self) -> None:
    """Waits; fails unless every process exits with 0."""
    if any(self.wait()):
      pytest.fail(f"a process failed:\n{self.tails()}")

  def kill(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()

  def tails(self) -> str:
    return "\n".join(
      f"--- process {i}\n{self.log(i)[-3000:]}" for i in range(len(self.logs))
    )


@pytest.fixture
def start(tmp_path) -> Iterator:
  """``start(name, args, processes, devices)`` launches a Job; when the test
  ends, every process still running is killed."""
  jobs: list[Job] = []

  def launch(name: str, args: list[str], processes: int, devices: int) -> Job:
    jobs.append(Job(tmp_path / name, args, processes, devices))
    return jobs[-1]

  try:
    yield launch
  finally:
    for job in jobs:
      job.kill()


def _state(checkpoint_dir: pathlib.Path) -> tuple[int, list[np.ndarray]]:
  """The last step saved there and its arrays (parameters, optimizer state)."""
  with ocp.CheckpointManager(checkpoint_dir) as mngr:
    step = mngr.latest_step()
  assert step is not None, f"no checkpoint in {checkpoint_dir}"
  path = checkpoint_dir / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return step, jax.tree.leaves(checkpointer.restore(path, restore_args=restore_args))


def _assert_same_state(a: pathlib.Path, b: pathlib.Path) -> None:
  (step_a, leaves_a), (step_b, leaves_b) = _state(a), _state(b)
  assert step_a == step_b and len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b, strict=True):
    # float32 rounding (gloo sums in another order), relative to the leaf's
    # scale: Adam's normalization magnifies it where gradients are tiny (up to
    # 2e-5 of the scale after 10 steps of agr_adamw; sam's are bitwise equal).
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4 * np.abs(y).max())


def _results(path: pathlib.Path) -> dict:
  return json.loads(path.read_text())


def test_two_processes_train_as_one(start, tmp_path):
  """`multiprocess_run.py` as 2 processes x 2 devices and as 1 x 4, at once:
  for sam, penalized_grad (FSDP), finite_difference_gr (every_k=3) and
  agr_adamw (FSDP), the same parameters and optimizer state after 10 steps,
  the same train loss and test accuracy; the results say how many processes
  took part."""
  out = {n: tmp_path / f"out_{n}" for n in (1, 2)}
  jobs = [start(f"run_{n}", [str(RUN), str(out[n])], n, 4 // n) for n in (1, 2)]
  for job in jobs:
    job.check()
  assert "test accuracy" in jobs[1].log(0) and "test accuracy" not in jobs[1].log(1)
  for run in multiprocess_run.RUNS:
    _assert_same_state(out[1] / run, out[2] / run)
    one, two = (_results(out[n] / f"{run}.json") for n in (1, 2))
    assert (one["processes"], two["processes"]) == (1, 2), run
    assert one["devices"] == two["devices"] == 4, run
    layout = "FSDP-sharded" if "fsdp" in run else "replicated"
    assert one["parameters"] == two["parameters"] == layout, run
    np.testing.assert_allclose(one["train_loss"], two["train_loss"], rtol=1e-5)
    assert one["test_accuracy"] == two["test_accuracy"], run


def test_a_dead_process_stops_the_other_and_the_run_resumes_elsewhere(start, tmp_path):
  """Process 1 of 2 is killed once epoch 1 is saved: process 0 aborts with
  JAX's error within the heartbeat timeout. The same command resumes in 1
  process of 4 devices for an epoch, then in 2 processes for one more, and
  ends with the loss history, test accuracy and state of an unbroken run."""
  ckpt, reference = tmp_path / "ckpt", tmp_path / "reference"
  run = [*EXAMPLE, *SHORT, "--checkpoint-dir", str(ckpt)]
  heartbeat = ["--heartbeat-timeout", str(HEARTBEAT_S)]
  first = start("first", [*run, "--epochs", "100", *heartbeat], 2, 2)
  deadline = time.monotonic() + TIMEOUT_S
  while not (ckpt / "1").is_dir():  # orbax renames it into place when complete
    if time.monotonic() > deadline or any(p.poll() is not None for p in first.procs):
      pytest.fail(f"no checkpoint of epoch 1 in {ckpt}:\n{first.tails()}")
    time.sleep(0.05)
  first.procs[1].kill()
  killed_at = time.monotonic()
  code = first.wait(HEARTBEAT_S + 60)[0]
  seconds = time.monotonic() - killed_at
  survivor = first.log(0)
  assert code != 0, survivor[-3000:]
  assert "another task died" in survivor, survivor[-3000:]
  assert "stopped sending heartbeats" in survivor, survivor[-3000:]
  assert seconds < HEARTBEAT_S + 30, seconds
  saved, _ = _state(ckpt)
  assert saved >= 1

  # 1 process of 4 devices for an epoch, then 2 processes of 2 for one more;
  # meanwhile, the unbroken run in 1 process.
  out = {name: tmp_path / f"{name}.json" for name in ("second", "third", "unbroken")}
  epochs = [str(saved + 1), str(saved + 2)]
  unbroken = start(
    "unbroken",
    [*EXAMPLE, *SHORT, "--epochs", epochs[1], "--checkpoint-dir", str(reference)]
    + ["--output", str(out["unbroken"])],
    1,
    4,
  )
  second = start(
    "second", [*run, "--epochs", epochs[0], "--output", str(out["second"])], 1, 4
  )
  second.check()
  assert f"resumed after epoch {saved} from" in second.log(0)
  third = start(
    "third", [*run, "--epochs", epochs[1], "--output", str(out["third"])], 2, 2
  )
  third.check()
  unbroken.check()
  assert f"resumed after epoch {saved + 1} from" in third.log(0)
  assert "in 2 process(es)" in third.log(0)
  assert "train loss" not in third.log(1)  # only process 0 prints
  assert _results(out["second"])["processes"] == 1
  results, expected = _results(out["third"]), _results(out["unbroken"])
  assert results["processes"] == 2
  assert len(results["train_loss"]) == len(expected["train_loss"]) == saved + 2
  np.testing.assert_allclose(results["train_loss"], expected["train_loss"], rtol=1e-5)
  assert results["test_accuracy"] == expected["test_accuracy"]
  _assert_same_state(ckpt, reference)


# ----------------------------------------------------------------------------
# The flags.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "argv, message",
  [
    (
      ["--num-processes", "2", "--process-id", "0"],
      "argument --coordinator-address: required with --num-processes and "
      "--process-id; give all three (or --distributed",
    ),
    (
      ["--coordinator-address", "127.0.0.1:1234"],
      "argument --num-processes: required with --coordinator-address;",
    ),
    (
      ["--coordinator-address", "localhost", "--num-processes", "2"],
      "argument --coordinator-address: must be HOST:PORT, e.g. 10.0.0.1:1234, "
      "got localhost",
    ),
    (
      ["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "2"],
      "argument --process-id: must be < --num-processes 2, got 2; number the "
      "processes 0 to 1",
    ),
    (["--num-processes", "0"], "argument --num-processes: must be a positive integer"),
    (["--heartbeat-timeout", "0"], "argument --heartbeat-timeout: must be a positive"),
    (["--every-k", "0"], "argument --every-k: must be a positive integer, got 0"),
  ],
)
def test_bad_process_flags_are_refused_naming_the_flag(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    data_parallel.parse_args(argv)
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err


def test_distributed_alone_leaves_the_rest_to_jax():
  args = data_parallel.parse_args(["--distributed", "--num-processes", "4"])
  assert (args.coordinator_address, args.process_id) == (None, None)
  # Outside a cluster that JAX recognizes, it finds nothing: exit 2 (JAX
  # raises before connecting or changing any setting of the process). In a
  # fresh process, as a user runs it: JAX refuses to initialize once another
  # test in this one has started a backend.
  env = {
    k: v
    for k, v in os.environ.items()
    if k
    not in (
      "SLURM_JOB_ID",
      "OMPI_MCA_orte_hnp_uri",
      "KUBERNETES_SERVICE_HOST",
      "JAX_COORDINATOR_ADDRESS",
    )
  }
  proc = subprocess.run(
    [sys.executable, "-m", "gnorm_optax.examples.data_parallel", "--distributed"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 2, proc.stderr
  assert "argument --distributed: coordinator_address should be defined." in proc.stderr
  assert "elsewhere give --coordinator-address, --num-processes, --process-id" in (
    proc.stderr
  )
