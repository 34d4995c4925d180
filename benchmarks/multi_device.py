"""SAM on several devices: step time relative to plain SGD, and collectives.

A data-parallel train step (`jax.jit` on a one-axis `Mesh`, the batch
sharded over 'data', parameters replicated) is timed for plain SGD and for
`chain(sam, sgd)`, on 1 device and on 8 devices.
JAX fixes the device count when it starts, so each configuration runs in its
own subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=N` on CPU).
Within a subprocess the two steps are interleaved round by round; the table
gives the median of the rounds after warm-up, and the SAM / plain ratio.

On 8 devices it also counts the collective operations in the compiled
(optimized) HLO of both steps, and the number of elements they reduce: SAM
should add exactly one more all-reduce of the gradient (the one of the
gradient at the perturbed point) and nothing else; the perturbation itself is
computed from the already-reduced gradient.

On a CPU the 8 devices are simulated and share the same cores, so the times
show the overhead of the partitioned program, not a speed-up; run it on a
machine with 8 accelerators for real scaling (the worker uses all visible
devices up to the count asked for).

Run:  python benchmarks/multi_device.py           (updates benchmarks/RESULTS.md)
      python benchmarks/multi_device.py --small   (CI: a few steps, temp file)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_md  # noqa: E402

SECTION = "## Several devices: step time and collectives"
COLLECTIVES = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "collective-permute",
  "all-to-all",
)
ROOT = pathlib.Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------
# Worker: one device count, fixed when JAX starts.
# ----------------------------------------------------------------------------


def count_collectives(hlo: str) -> dict[str, dict[str, int]]:
  """`{op: {"ops": n, "elements": total elements of their results}}`."""
  out: dict[str, dict[str, int]] = {}
  pattern = re.compile(r"=\s+(.+?)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
  for line in hlo.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shapes = re.findall(r"\b[a-z]+\d*\[([\d,]*)\]", match.group(1))
    elements = sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)
    entry = out.setdefault(match.group(2), {"ops": 0, "elements": 0})
    entry["ops"] += 1
    entry["elements"] += elements
  return out


def worker(
  num_devices: int, model_name: str, batch_size: int, rounds: int, steps: int
) -> dict:
  import jax
  import numpy as np
  import optax
  from flax import nnx
  from jax.sharding import Mesh
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import gnorm_optax as gx
  from gnorm_optax.examples.models import make_model

  devices = jax.devices()[:num_devices]
  if len(devices) != num_devices:
    raise SystemExit(f"asked for {num_devices} devices, found {len(devices)}")
  mesh = Mesh(np.array(devices), ("data",))
  replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

  graphdef, params = nnx.split(make_model(model_name), nnx.Param)
  params = jax.device_put(nnx.as_pure(params), replicated)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.normal(size=(batch_size, 8, 8, 1)).astype(np.float32), batch)
  y = jax.device_put(rng.integers(0, 10, batch_size).astype(np.int32), batch)

  def loss_fn(p, x, y):
    logits = nnx.merge(graphdef, p)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def build(tx):
    def step(p, s, x, y):
      def grad_fn(q):
        return jax.grad(loss_fn)(q, x, y)

      loss, g = jax.value_and_grad(loss_fn)(p, x, y)
      u, s = tx.update(g, s, p, grad_fn=grad_fn)
      return optax.apply_updates(p, u), s, loss

    state = jax.device_put(tx.init(params), replicated)
    compiled = jax.jit(step).lower(params, state, x, y).compile()
    return compiled, [params, state]

  sgd = lambda: optax.sgd(0.05, momentum=0.9)  # noqa: E731
  variants = {"plain": sgd(), "sam": optax.chain(gx.sam(0.05), sgd())}
  built = {name: build(tx) for name, tx in variants.items()}
  collectives = {
    name: count_collectives(compiled.as_text()) for name, (compiled, _) in built.items()
  }
  for compiled, carry in built.values():  # warm-up
    for _ in range(3):
      carry[0], carry[1], _ = compiled(carry[0], carry[1], x, y)
    jax.block_until_ready(carry[0])
  times: dict[str, list[float]] = {name: [] for name in built}
  for _ in range(rounds):
    for name, (compiled, carry) in built.items():
      start = time.perf_counter()
      for _ in range(steps):
        carry[0], carry[1], _ = compiled(carry[0], carry[1], x, y)
      jax.block_until_ready(carry[0])
      times[name].append((time.perf_counter() - start) / steps)
  return {
    "devices": num_devices,
    "platform": devices[0].platform,
    "device_kind": devices[0].device_kind,
    "jax": jax.__version__,
    "model": model_name,
    "num_params": int(num_params),
    "batch_size": batch_size,
    "ms": {name: float(np.median(t)) * 1e3 for name, t in times.items()},
    # Per-round ratios (the rounds are interleaved): their spread shows the
    # noise of the machine.
    "ratio_quartiles": [
      float(q)
      for q in np.percentile(
        np.array(times["sam"]) / np.array(times["plain"]), [25, 50, 75]
      )
    ],
    "collectives": collectives,
  }


# ----------------------------------------------------------------------------
# Driver: one subprocess per device count; the RESULTS.md section.
# ----------------------------------------------------------------------------


def probe() -> tuple[str, int]:
  """JAX's default backend and device count, seen from a throwaway process."""
  code = "import jax; print(jax.default_backend(), jax.device_count())"
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  )
  backend, count = proc.stdout.split()
  return backend, int(count)


def run_worker(
  num_devices: int, simulate: bool, model: str, batch_size: int, rounds: int, steps: int
) -> dict:
  env = dict(os.environ)
  if simulate:  # CPU: the device count is fixed when JAX starts.
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
  cmd = [
    sys.executable,
    __file__,
    "--worker",
    str(num_devices),
    "--model",
    model,
    "--batch-size",
    str(batch_size),
    "--rounds",
    str(rounds),
    "--steps",
    str(steps),
  ]
  proc = subprocess.run(
    cmd, env=env, capture_output=True, text=True, check=False, cwd=ROOT
  )
  if proc.returncode != 0:
    raise SystemExit(f"worker with {num_devices} device(s) failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], rounds: int, steps: int) -> str:
  """The section's text after its header line."""
  first = results[0]
  lines = [
    "A data-parallel step (`jax.jit` on a one-axis mesh, batch sharded over "
    "'data', parameters replicated), global "
    f"batch {first['batch_size']} of 8x8x1 digits-sized inputs. Median of "
    f"{rounds} interleaved rounds of {steps} steps after warm-up; SAM / plain "
    "is the median of the per-round ratios. Each device count runs in its "
    "own process. On a CPU the 8 devices are simulated on the "
    "same cores: the 8-device times show the partitioning overhead, not a "
    "speed-up, and the ratio is what carries over.",
    "",
    "| model (params) | devices | plain SGD ms / step | SAM ms / step "
    "| SAM / plain | quartiles of the ratio |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    plain, sam = r["ms"]["plain"], r["ms"]["sam"]
    low, ratio, high = r["ratio_quartiles"]
    lines.append(
      f"| {r['model']} ({r['num_params']}) | {r['devices']} | {plain:.2f} | "
      f"{sam:.2f} | {ratio:.2f} | {low:.2f} - {high:.2f} |"
    )
  lines += [
    "",
    "Collectives in the compiled (optimized) HLO on 8 devices: ops, and the "
    "elements of their results. XLA combines the gradient's leaves into one "
    "tuple all-reduce, and the scalar loss rides along in one of them. SAM "
    "adds exactly one all-reduce of one gradient's size, for the gradient at "
    "the perturbed point. It adds nothing else: the norm and the "
    "perturbation are computed from the gradient after it is reduced, and "
    "they are the same on every device.",
    "",
    "| model | step | collective ops | elements | gradient size | "
    "gradients all-reduced |",
    "|---|---|---|---|---|---|",
  ]
  for r in results:
    if r["devices"] == 1:
      continue
    for name in ("plain", "sam"):
      ops = r["collectives"][name]
      kinds = ", ".join(f"{v['ops']} {k}" for k, v in sorted(ops.items())) or "none"
      elements = sum(v["elements"] for v in ops.values())
      # The scalar loss rides along in one of the all-reduces.
      grads = (elements - 1) / r["num_params"]
      lines.append(
        f"| {r['model']} | {'SAM' if name == 'sam' else 'plain SGD'} | {kinds} | "
        f"{elements} | {r['num_params']} | {grads:g} |"
      )
  return "\n".join(lines) + "\n"


def check(results: list[dict]) -> list[str]:
  """The claims of the section, as problems found (empty: all hold)."""
  problems = []
  for r in results:
    if r["devices"] == 1:
      continue
    plain, sam = r["collectives"]["plain"], r["collectives"]["sam"]
    if set(sam) != set(plain) or set(plain) - {"all-reduce"}:
      problems.append(f"{r['model']}: collectives other than all-reduce: {sam}")
      continue
    extra_ops = sam["all-reduce"]["ops"] - plain["all-reduce"]["ops"]
    extra = sam["all-reduce"]["elements"] - plain["all-reduce"]["elements"]
    if extra != r["num_params"] or extra_ops > 1:
      problems.append(
        f"{r['model']}: SAM adds {extra_ops} all-reduce op(s) of {extra} "
        f"elements, expected at most 1 of {r['num_params']} (one gradient)"
      )
  return problems


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--model", default="mlp", help=argparse.SUPPRESS)
  parser.add_argument("--batch-size", type=int, default=256, help=argparse.SUPPRESS)
  parser.add_argument("--rounds", type=int, default=15, help=argparse.SUPPRESS)
  parser.add_argument("--steps", type=int, default=20, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print(
      json.dumps(
        worker(args.worker, args.model, args.batch_size, args.rounds, args.steps)
      )
    )
    return
  record = results_md.start(args, argv)
  rounds, steps = (2, 3) if args.small else (args.rounds, args.steps)
  models = ("mlp",) if args.small else ("mlp", "cnn")
  backend, available = probe()
  simulate = backend == "cpu"
  counts = (1, 8) if simulate else tuple(sorted({1, min(8, available)}))
  results = [
    run_worker(n, simulate, model, args.batch_size, rounds, steps)
    for model in models
    for n in counts
  ]
  text = table(results, rounds, steps)
  print(text)
  problems = check(results)
  if problems:
    raise SystemExit("unexpected collectives:\n" + "\n".join(problems))
  first = results[0]
  device = (
    f"{first['platform']} ({first['device_kind']}), "
    f"{' and '.join(map(str, counts))} device(s) in separate processes"
    + (" (simulated on the host CPU)" if simulate else "")
  )
  results_md.write(record, SECTION, text, device_text=device)


if __name__ == "__main__":
  main()
