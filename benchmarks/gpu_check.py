"""GPU check: the scaling benchmark's larger sizes, bf16, several devices, vmap.

One prepared script for a machine with a GPU (sized for at most 8 minutes on
one NVIDIA H200). It measures, with the harness of `scaling.py` (jitted
steps with params and state donated, interleaved rounds, compiled memory):

1. the scaling variants (plain SGD, gx.sam, optax.contrib.sam, GNP, F-GR,
   exact GR, double backprop, sam every_k=5, which on a GPU takes the plain
   `lax.cond` path) on the largest models: an MLP of 100M parameters, a
   Transformer LM of 85M, then smaller ones while time is left;
2. bfloat16 params: plain SGD and gx.sam in float32 and bfloat16, and gx.sam
   with `perturb_dtype=jnp.float32` on bfloat16 params (memory and step time);
3. the data-parallel step: `jax.jit` over a `Mesh` of all local devices, the
   batch sharded over 'data', params replicated (one GPU is a mesh of one);
4. every_k under `jax.vmap` (an ensemble of 4 MLPs; see `scaling.py`).

Each measurement is wrapped: a failure is recorded in the JSON and the rest
go on. Past the time budget (default 420 s) no new measurement starts; the
JSON (rewritten after each section) is complete either way.

Run:  PYTHONPATH=. python benchmarks/gpu_check.py --out DIR [--commit SHA]
      python benchmarks/gpu_check.py --record DIR/gpu_check.json
            (renders the JSON into RESULTS.md, header from the JSON)
      python benchmarks/gpu_check.py --small
            (CI: without a GPU prints "no GPU: skipped"; then runs a tiny plan
            on the CPU and renders it to a temporary results file)

Without a GPU and without --small or --record it prints "no GPU: skipped"
and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import pathlib
import platform
import subprocess
import sys
import tempfile
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import models_scaling  # noqa: E402
import results_md  # noqa: E402
import scaling  # noqa: E402

SECTION = "## GPU check"
PNG = HERE / "gpu_check.png"
JSON_NAME = "gpu_check.json"
BUDGET_S = 420.0

# The plan: (section kind, arguments), in order of importance.
GPU_PLAN = [
  ("scaling", ("mlp", "100M")),
  ("scaling", ("transformer", "85M")),
  ("bf16", ("mlp", "100M")),
  ("mesh", ("transformer", "25M")),
  ("ensemble", ("mlp", "10M", 4)),
  ("scaling", ("transformer", "25M")),
  ("scaling", ("resnet", "5M")),
  ("scaling", ("mlp", "10M")),
  ("scaling", ("resnet", "1.2M")),
  ("scaling", ("transformer", "3.3M")),
  ("scaling", ("mlp", "1M")),
]
# The same paths on the smallest sizes (--cpu-test: a check of this script).
TINY_PLAN = [
  ("scaling", ("mlp", "10k")),
  ("bf16", ("mlp", "10k")),
  ("mesh", ("mlp", "10k")),
  ("ensemble", ("mlp", "10k", 2)),
]
# --small (CI) without a GPU: the measurements only this script makes (the
# others are `scaling.py --small`'s), then the writer.
SMALL_PLAN = [("bf16", ("mlp", "10k")), ("mesh", ("mlp", "10k"))]


def has_gpu() -> bool:
  try:
    return bool(jax.devices("gpu"))
  except RuntimeError:
    return False


def git_commit() -> str:
  try:
    out = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"],
      cwd=HERE,
      capture_output=True,
      text=True,
      check=True,
    )
  except (OSError, subprocess.CalledProcessError):
    return "unknown (not a git checkout)"
  return out.stdout.strip()


def versions() -> str:
  parts = [f"python {platform.python_version()}"]
  for name in ("jax", "jaxlib", "optax", "flax", "numpy"):
    try:
      parts.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      parts.append(f"{name} not installed")
  return ", ".join(parts)


# ----------------------------------------------------------------------------
# Measurements (each returns a JSON-able dict)
# ----------------------------------------------------------------------------


def run_scaling(family, size, *, rounds, round_s, clock):
  problem = models_scaling.make(family, size)
  return scaling.measure_problem(
    problem, scaling.CORE, rounds=rounds, round_s=round_s, clock=clock
  )


def run_bf16(family, size, *, rounds, round_s, clock):
  """Plain SGD and gx.sam on float32 and bfloat16 params; sam with a float32
  perturbed point on bfloat16 params."""
  f32 = models_scaling.make(family, size)
  bf16 = models_scaling.make(family, size, dtype=jnp.bfloat16)
  clock.log(f"bf16: {f32.name} ({f32.num_params:,} params)")
  v = scaling.variants([scaling.PLAIN, scaling.SAM])
  sam32 = scaling.variants([scaling.SAM], perturb_dtype=jnp.float32)[scaling.SAM]
  cases = {
    "plain sgd, f32": scaling.problem_case(f32, v[scaling.PLAIN]),
    "plain sgd, bf16": scaling.problem_case(bf16, v[scaling.PLAIN]),
    "gx.sam, f32": scaling.problem_case(f32, v[scaling.SAM]),
    "gx.sam, bf16": scaling.problem_case(bf16, v[scaling.SAM]),
    "gx.sam, bf16, perturb_dtype=f32": scaling.problem_case(bf16, sam32),
  }
  res = scaling.measure_cases(
    cases, "plain sgd, f32", rounds=rounds, round_s=round_s, clock=clock
  )
  return {**scaling.describe_problem(f32), **res}


def run_mesh(family, size, *, rounds, round_s, clock):
  """The data-parallel step over a Mesh of all local devices."""
  devices = jax.devices()
  mesh = Mesh(np.array(devices), ("data",))
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  problem = models_scaling.make(family, size)
  clock.log(f"mesh of {len(devices)} device(s): {problem.name}")
  batch = jax.device_put(problem.batch, sharded)

  def case(variant):
    def make():
      tx = variant.make_tx()
      params = jax.device_put(jax.tree.map(np.asarray, problem.params), replicated)
      state = jax.device_put(tx.init(params), replicated)
      return scaling.make_step(problem.loss, tx, variant.kind), (params, state, batch)

    return make

  names = [scaling.PLAIN, scaling.SAM, scaling.EVERY]
  cases = {n: case(v) for n, v in scaling.variants(names).items()}
  res = scaling.measure_cases(
    cases, scaling.PLAIN, rounds=rounds, round_s=round_s, clock=clock
  )
  return {
    **scaling.describe_problem(problem),
    "devices": len(devices),
    "device_kind": devices[0].device_kind,
    **res,
  }


def run_ensemble(family, size, members, *, rounds, round_s, clock):
  return scaling.measure_ensemble(
    family, size, members, rounds=rounds, round_s=round_s, clock=clock
  )


RUNNERS = {
  "scaling": run_scaling,
  "bf16": run_bf16,
  "mesh": run_mesh,
  "ensemble": run_ensemble,
}


def measure(out_dir: pathlib.Path, plan, *, budget_s, rounds, round_s, commit, command):
  """Runs ``plan``; writes (and rewrites after each section) the JSON."""
  scaling.setup()
  clock = scaling.Clock(budget_s)
  d = jax.devices()[0]
  data = {
    "meta": {
      "command": command,
      "commit": commit,
      "device": f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s)",
      "device_kind": d.device_kind,
      "platform": d.platform,
      "device_count": jax.device_count(),
      "versions": versions(),
      "jax": jax.__version__,
      "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      "budget_s": budget_s,
      "rounds": rounds,
      "round_s": round_s,
      "variants": list(scaling.CORE),
      "stopped_early": False,
    },
    "sections": [],
  }
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / JSON_NAME

  def save():
    data["meta"]["elapsed_s"] = clock.elapsed()
    path.write_text(json.dumps(data, indent=1))

  clock.log(f"device {data['meta']['device']}; {data['meta']['versions']}")
  for kind, args in plan:
    entry = {"kind": kind, "args": list(args)}
    if clock.over():
      data["meta"]["stopped_early"] = True
      entry["error"] = "skipped: time budget"
      clock.log(f"{kind} {args}: skipped (time budget)")
    else:
      try:
        entry["result"] = RUNNERS[kind](
          *args, rounds=rounds, round_s=round_s, clock=clock
        )
      except Exception as e:  # noqa: BLE001 - record it, go on
        entry["error"] = scaling.error_text(e)
        clock.log(f"{kind} {args}: FAILED {entry['error']}")
        traceback.print_exc()
    data["sections"].append(entry)
    save()
  save()
  clock.log(f"wrote {path}")
  return path


# ----------------------------------------------------------------------------
# Rendering (--record)
# ----------------------------------------------------------------------------


def render(data: dict, png: pathlib.Path) -> str:
  """The section's body from the JSON."""
  meta = data["meta"]
  sections = data["sections"]
  names = meta.get("variants") or list(scaling.variants())
  by_kind = lambda k: [s for s in sections if s["kind"] == k and "result" in s]  # noqa: E731
  scaling_results = sorted(
    (s["result"] for s in by_kind("scaling")),
    key=lambda r: (r["family"], r["num_params"]),
  )
  out = [
    f"{meta.get('rounds', '?')} interleaved rounds of about "
    f"{meta.get('round_s', 0) * 1e3:.0f} ms of plain SGD steps after warm-up; "
    "the harness, variants, hyperparameters and tables of `scaling.py` (see "
    "its section), on the larger models. On a GPU `every_k` takes the plain "
    "`lax.cond` path (the XLA:CPU convolution rewrite is off).",
    "",
  ]
  if scaling_results:
    scaling.plot(scaling_results, png, title=f" ({meta.get('device_kind', '?')})")
    tables, missed = scaling.scaling_tables(scaling_results, names)
    out += [f"![step time and memory vs parameters]({png.name})", "", tables, ""]
    out += caveats(scaling_results)
    if missed:
      out += ["Missed targets: " + "; ".join(missed) + ".", ""]
  for s in by_kind("bf16"):
    out += [bf16_table(s["result"]), ""]
  for s in by_kind("mesh"):
    out += [mesh_table(s["result"]), ""]
  for s in by_kind("ensemble"):
    out += [scaling.ensemble_table(s["result"]), ""]
  failures = [
    f"{s['kind']} {' '.join(map(str, s['args']))}: {s['error']}"
    for s in sections
    if s.get("error")
  ]
  for s in sections:
    for n, e in (s.get("result") or {}).get("variants", {}).items():
      if e.get("error"):
        failures.append(f"{s['kind']} {s['result'].get('model')} {n}: {e['error']}")
  if meta.get("stopped_early"):
    out += [f"The run reached its time budget ({meta.get('budget_s')} s).", ""]
  if failures:
    out += ["Failed or skipped:", "", *[f"- {f}" for f in failures], ""]
  return "\n".join(out)


def caveats(results) -> list[str]:
  """Notes on what runs of an earlier version of this script measured."""
  notes = []
  plain = [r["variants"].get(scaling.PLAIN, {}) for r in results]
  if any(p.get("compile_s") and "compile_s_first" not in p for p in plain):
    notes.append(
      "Compile times: in this run plain SGD was compiled once, first, and its "
      "time includes work the later compiles reuse (on a GPU the autotuning "
      "of its matrix products), so ratios below 1 show that bias, not faster "
      "compiles; `scaling.py` now compiles the reference twice."
    )
  convs = [
    (r["variants"].get(scaling.PLAIN, {}).get("ops") or {}).get("conv")
    for r in results
    if r["family"] == "resnet"
  ]
  if 0 in convs:
    notes.append(
      "Gradient work: in this run the counter missed cuDNN's convolutions "
      "(custom calls on a GPU), so the conv nets' ratios count matrix "
      "products only; `scaling.hlo_counts` now counts those calls."
    )
  return [line for n in notes for line in (n, "")]


def bf16_table(res) -> str:
  v = res["variants"]
  lines = [
    f"**bfloat16 params** ({res['model']}, {res['num_params']:,} params; "
    "`perturb_dtype=jnp.float32` forms SAM's perturbed point in float32, the "
    "loss casts it back to bfloat16). Memory: argument + output + temp - alias "
    "in float32 parameter copies (one copy = "
    f"{res['param_bytes'] / 2**20:.3g} MiB).",
    "",
    "| variant | ms / step | ratio to plain f32 | ratio to plain bf16 | "
    "memory (f32 copies) |",
    "|---|---|---|---|---|",
  ]
  for name, e in v.items():
    if e.get("error"):
      lines.append(f"| {name} | {scaling.cell_missing(res, name)} | | | |")
      continue
    r32 = scaling.ratio_stats(v, name, "plain sgd, f32")
    r16 = scaling.ratio_stats(v, name, "plain sgd, bf16")
    peak = scaling.peak_bytes(e.get("mem"))
    lines.append(
      f"| {name} | {scaling.fmt(scaling.median_ms(res, name))} | "
      f"{scaling.fmt(r32 and r32[0])} | {scaling.fmt(r16 and r16[0])} | "
      f"{scaling.fmt(None if peak is None else peak / res['param_bytes'])} |"
    )
  return "\n".join(lines)


def mesh_table(res) -> str:
  v = res["variants"]
  lines = [
    f"**Data-parallel step** on a mesh of {res['devices']} device(s) "
    f"({res['device_kind']}): {res['model']} ({res['num_params']:,} params), "
    "batch sharded over 'data', params replicated.",
    "",
    "| variant | ms / step | ratio to plain (quartiles) | extra copies | "
    "all-reduces in the HLO |",
    "|---|---|---|---|---|",
  ]
  for name, e in v.items():
    if e.get("error"):
      lines.append(f"| {name} | {scaling.cell_missing(res, name)} | | | |")
      continue
    s = scaling.ratio_stats(v, name, scaling.PLAIN)
    ratio = "n/a" if s is None else f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"
    c = scaling.copies(res, name)
    ops = e.get("ops") or {}
    lines.append(
      f"| {name} | {scaling.fmt(scaling.median_ms(res, name))} | {ratio} | "
      f"{'n/a' if c is None else f'{c:+.2f}'} | {ops.get('all-reduce', '?')} |"
    )
  return "\n".join(lines)


def merge(runs: list[dict]) -> dict:
  """Several runs' JSON (the same device) as one: sections in run order, the
  meta of the first with the commands, dates and run times of all."""
  if len(runs) == 1:
    return runs[0]
  meta = dict(runs[0]["meta"])
  for key in ("command", "date", "commit"):
    values = [r["meta"].get(key) or "unknown" for r in runs]
    meta[key] = values[0] if len(set(values)) == 1 else "; ".join(values)
  meta["elapsed_s"] = sum(r["meta"].get("elapsed_s") or 0.0 for r in runs)
  meta["stopped_early"] = False  # the later runs measured what was skipped
  kinds = {r["meta"].get("device_kind") for r in runs}
  if len(kinds) > 1:
    raise SystemExit(f"--record: runs on different devices {sorted(kinds)}")
  # One entry per measurement: a later run's result replaces an earlier run's
  # (a skip or an older result); the first run's order is kept.
  last: dict[tuple, dict] = {}
  for s in (s for r in runs for s in r["sections"]):
    key = (s["kind"], tuple(s["args"]))
    if "result" in s or key not in last or "result" not in last[key]:
      last[key] = s
  sections = list(last.values())
  return {"meta": meta, "sections": sections}


def record(json_paths, results: pathlib.Path, png: pathlib.Path, shown):
  data = merge([json.loads(pathlib.Path(p).read_text()) for p in json_paths])
  meta = data["meta"]
  body = render(data, png)
  title = f"{SECTION}: {meta.get('device_kind', 'unknown device')}"
  print(body)
  return results_md.write_recorded(title, meta, body, results, rendered_by=shown)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument("--out", type=pathlib.Path, help=f"folder for {JSON_NAME}")
  parser.add_argument(
    "--record",
    type=pathlib.Path,
    nargs="+",
    metavar="JSON",
    help="render the JSON of one run (or of several runs on the same device, "
    "one section) into the results file; no measurement",
  )
  parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds")
  parser.add_argument(
    "--plan",
    default=None,
    help="measure these instead of the whole plan: comma-separated "
    "kind:arg:arg, e.g. scaling:mlp:10M,bf16:mlp:100M,ensemble:mlp:10M:4",
  )
  parser.add_argument("--commit", default=None, help="the commit measured")
  parser.add_argument("--png", type=pathlib.Path, default=None)
  parser.add_argument(
    "--cpu-test",
    action="store_true",
    help="run the tiny plan on whatever device there is (a check of this "
    "script, not a result)",
  )
  args = parser.parse_args(argv)
  argv = sys.argv[1:] if argv is None else list(argv)
  if args.record is not None:
    shown = "python benchmarks/gpu_check.py --record " + " ".join(
      str(p) for p in args.record
    )
    record(args.record, args.results or results_md.PATH, args.png or PNG, shown)
    return
  gpu = has_gpu()
  if not gpu:
    print("no GPU: skipped", flush=True)
    if not (args.small or args.cpu_test):
      return
  tiny = args.small or args.cpu_test or not gpu
  out = args.out or pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-"))
  # What reproduces the numbers: the flags that name files or the commit are
  # left out (the commit is recorded on its own).
  command = " ".join(["PYTHONPATH=. python benchmarks/gpu_check.py", *shown_args(argv)])
  plan = GPU_PLAN
  if tiny:
    plan = TINY_PLAN if args.cpu_test else SMALL_PLAN
  if args.plan:
    plan = [parse_plan_entry(e) for e in args.plan.split(",") if e]
  path = measure(
    out,
    plan,
    budget_s=args.budget,
    rounds=2 if tiny else 5,
    round_s=0.01 if tiny else 0.05,
    commit=args.commit or git_commit(),
    command=command,
  )
  if not tiny:
    print(f"render it with: python benchmarks/gpu_check.py --record {path}")
  if args.small:  # CI: the writer too, into a temporary results file
    results = results_md.results_path(args)
    png = pathlib.Path(tempfile.mkdtemp(prefix="gpu-check-small-")) / "gpu_check.png"
    record([path], results, png, f"python benchmarks/gpu_check.py --record {path}")


def parse_plan_entry(text: str):
  """``"scaling:mlp:10M"`` -> ``("scaling", ("mlp", "10M"))`` (digits: int)."""
  kind, *args = text.split(":")
  if kind not in RUNNERS:
    raise SystemExit(f"--plan: unknown kind {kind!r}; one of {sorted(RUNNERS)}")
  return kind, tuple(int(a) if a.isdigit() else a for a in args)


def shown_args(argv: list[str]) -> list[str]:
  """``argv`` without the flags that name files or the commit, and their values."""
  hidden = ("--out", "--commit", "--results", "--png", "--record")
  shown, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in hidden:
      skip = True
    elif not a.startswith(tuple(f"{h}=" for h in hidden)):
      shown.append(a)
  return shown


if __name__ == "__main__":
  main()
