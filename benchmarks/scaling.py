"""Step cost, memory and compile time of every transform, at several model sizes.

The one home of the step-cost and memory measurement. For each model of
`models_scaling.py` (an MLP from 10k to 10M parameters at batch 8, so that
the parameters dominate memory; a ResNet-style conv net on 32x32x3; a small
decoder-only Transformer language model; synthetic data) it compiles one
train step per variant, each `jax.jit(step, donate_argnums=(0, 1))` (params
and optimizer state donated), and measures:

* step time: the variants' jitted steps run round by round, the order
  alternating, after warm-up; a variant's ratio to another is the median of
  the per-round ratios (quartiles alongside);
* memory: the compiled step's `memory_analysis()`, argument + output + temp
  - alias bytes, in parameter copies, relative to plain SGD's step;
* compile time of the train step (trace, lower and compile), relative to
  plain SGD's;
* the dots and convolutions in the compiled HLO, relative to plain SGD's:
  the gradient work each step does.

Baselines: double backprop (the gradient of `L + gamma/2 ||grad L||^2` by
`jax.grad` of a function that calls `jax.grad`), which exact GR and F-GR
compute more cheaply, and `optax.contrib.sam` (opaque mode), which does
gx.sam's work. A last table measures `every_k` under `jax.vmap` (an ensemble
of MLPs), where the step count decides between a `lax.cond`'s branches.

Run:  python benchmarks/scaling.py            (writes RESULTS.md and scaling.png)
      python benchmarks/scaling.py --small    (CI: seconds; temp files)
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import gnorm_optax as gx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import models_scaling  # noqa: E402
import results_md  # noqa: E402

SECTION = "## Step cost and memory"
PNG = pathlib.Path(__file__).with_name("scaling.png")
LR, RHO, ALPHA, GAMMA, EPSILON, EVERY_K = 0.05, 0.05, 0.8, 0.1, 0.01, 5
# Below this plain step time (ms) the every_k target is not judged: the
# fixed cost of a step's dispatch and elementwise work dominates.
EVERY_K_MIN_MS = 3.0

PLAIN = "plain sgd"
SAM = "gx.sam"
SAM_ZERO = "gx.sam (on_nonfinite='zero')"
SAM_PROP = "gx.sam (on_nonfinite='propagate')"
CONTRIB = "optax.contrib.sam"
GNP = "penalized_grad"
FGR = "finite_difference_gr (forward)"
EXACT = "gradient_regularization (exact)"
DOUBLE = "double backprop"
EVERY = f"gx.sam every_k={EVERY_K}"
ENSEMBLE_PLAIN = "plain sgd (vmap)"
SECOND_GRADIENT = (SAM, SAM_ZERO, SAM_PROP, CONTRIB, GNP, FGR, EXACT, DOUBLE, EVERY)
# The transforms every plan measures (the GPU check: these only).
CORE = (PLAIN, SAM, SAM_ZERO, SAM_PROP, CONTRIB, GNP, FGR, EXACT, DOUBLE, EVERY)
AGR = ("optax.adamw", "agr_adamw", "gx.adan", "agr_adan")
SHORT = {
  PLAIN: "plain",
  SAM: "sam",
  SAM_ZERO: "sam zero",
  SAM_PROP: "sam propagate",
  CONTRIB: "contrib sam",
  GNP: "GNP",
  FGR: "F-GR",
  EXACT: "exact GR",
  DOUBLE: "double backprop",
  EVERY: f"sam k={EVERY_K}",
  "optax.adamw": "adamw",
  "agr_adamw": "AGR-adamw",
  "gx.adan": "adan",
  "agr_adan": "AGR-adan",
}

# The targets: (label, kind, variant, reference, target).
# kind "time": step-time ratio variant / reference; "copies": extra memory of
# the variant over plain SGD in parameter copies; "copies over": the
# variant's memory minus the reference's, in parameter copies.
CHECKS = [
  ("sam / contrib sam", "time", SAM, CONTRIB, 1.02),
  ("sam - contrib sam (copies)", "copies over", SAM, CONTRIB, 0.1),
  ("sam zero / contrib sam", "time", SAM_ZERO, CONTRIB, 1.02),
  ("sam zero - contrib sam (copies)", "copies over", SAM_ZERO, CONTRIB, 0.1),
  ("sam propagate / contrib sam", "time", SAM_PROP, CONTRIB, 1.02),
  ("sam propagate - contrib sam (copies)", "copies over", SAM_PROP, CONTRIB, 0.1),
  ("sam / plain", "time", SAM, PLAIN, 2.05),
  ("GNP / plain", "time", GNP, PLAIN, 2.05),
  ("GNP (copies)", "copies", GNP, PLAIN, 1.1),
  ("GNP - contrib sam (copies)", "copies over", GNP, CONTRIB, 1.1),
  ("F-GR / plain", "time", FGR, PLAIN, 2.05),
  ("F-GR (copies)", "copies", FGR, PLAIN, 1.1),
  ("F-GR - contrib sam (copies)", "copies over", FGR, CONTRIB, 1.1),
  ("F-GR / double backprop", "time", FGR, DOUBLE, 0.5),
  (f"k={EVERY_K} / plain", "time", EVERY, PLAIN, 1 + 1 / EVERY_K + 0.05),
  (f"k={EVERY_K} (copies)", "copies", EVERY, PLAIN, 1.2),
  (f"k={EVERY_K} - sam (copies)", "copies over", EVERY, SAM, 1.2),
  ("AGR-adamw / adamw", "time", "agr_adamw", "optax.adamw", 1.02),
  ("AGR-adan / adan", "time", "agr_adan", "gx.adan", 1.02),
]

# Full CPU mode: family -> sizes (keys of models_scaling.SIZES).
FULL = {
  "mlp": ("10k", "100k", "1M", "10M"),
  "resnet": ("20k", "80k", "300k"),
  "transformer": ("140k", "870k", "3.3M"),
}
SMALL = {"mlp": ("10k",), "resnet": ("20k",), "transformer": ("140k",)}
# In small mode the conv net and the transformer run these variants only.
SMALL_SUBSET = (PLAIN, EVERY)


class Variant(NamedTuple):
  """How a variant's step gets its update.

  Attributes:
    make_tx: builds the optax transformation (called inside the measurement,
      so that a factory that fails is recorded as that variant's failure).
    kind: ``"grad_fn"`` (``tx.update(g, s, p, grad_fn=...)``), ``"indexed"``
      (optax.contrib.sam's ``grad_fn(params, i)``) or ``"double"`` (the
      double-backprop gradient, then ``tx.update(g, s, p)``).
  """

  make_tx: Callable[[], optax.GradientTransformation]
  kind: str = "grad_fn"


def variants(names=None, *, perturb_dtype=None) -> dict[str, Variant]:
  """name -> Variant, in the order of the tables (``names``: a subset)."""
  sgd = lambda: optax.sgd(LR)  # noqa: E731
  kw = {} if perturb_dtype is None else {"perturb_dtype": perturb_dtype}
  out = {
    PLAIN: Variant(sgd),
    SAM: Variant(lambda: optax.chain(gx.sam(RHO, **kw), sgd())),
    SAM_ZERO: Variant(
      lambda: optax.chain(gx.sam(RHO, on_nonfinite="zero", **kw), sgd())
    ),
    SAM_PROP: Variant(
      lambda: optax.chain(gx.sam(RHO, on_nonfinite="propagate", **kw), sgd())
    ),
    CONTRIB: Variant(
      lambda: optax.contrib.sam(
        sgd(),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        sync_period=2,
        opaque_mode=True,
      ),
      "indexed",
    ),
    GNP: Variant(lambda: optax.chain(gx.penalized_grad(RHO, ALPHA), sgd())),
    FGR: Variant(lambda: optax.chain(gx.finite_difference_gr(GAMMA, EPSILON), sgd())),
    EXACT: Variant(lambda: optax.chain(gx.gradient_regularization(GAMMA), sgd())),
    DOUBLE: Variant(sgd, "double"),
    EVERY: Variant(lambda: optax.chain(gx.sam(RHO, every_k=EVERY_K, **kw), sgd())),
    "optax.adamw": Variant(lambda: optax.adamw(1e-3)),
    "agr_adamw": Variant(lambda: gx.agr_adamw(1e-3)),
    "gx.adan": Variant(lambda: gx.adan(1e-3)),
    "agr_adan": Variant(lambda: gx.agr_adan(1e-3)),
  }
  return out if names is None else {n: out[n] for n in names}


def make_step(loss: Callable, tx: optax.GradientTransformation, kind: str) -> Callable:
  """``step(params, opt_state, batch) -> (params, opt_state, loss)``."""

  def step(p, s, batch):
    if kind == "double":

      def objective(q):
        value, g = jax.value_and_grad(loss)(q, batch)
        sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(g))
        return value + 0.5 * GAMMA * sq, value

      (_, value), g = jax.value_and_grad(objective, has_aux=True)(p)
      u, s = tx.update(g, s, p)
    else:
      value, g = jax.value_and_grad(loss)(p, batch)
      grad = lambda q: jax.grad(loss)(q, batch)  # noqa: E731
      grad_fn = (lambda q, i: grad(q)) if kind == "indexed" else grad  # noqa: E731
      u, s = tx.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s, value

  return step


# ----------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------


def nbytes(tree) -> int:
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def hlo_counts(text: str) -> dict[str, int]:
  """Dots, convolutions, conditionals and all-reduces in a compiled HLO text.

  On a GPU XLA hands convolutions and many matrix products to cuDNN / cuBLAS
  as custom calls: those are counted as convolutions and dots too.
  """
  count = lambda op: len(re.findall(rf"[ )]{op}\(", text))  # noqa: E731
  calls = lambda pattern: len(  # noqa: E731
    re.findall(rf'custom_call_target="{pattern}', text)
  )
  return {
    "dot": count("dot") + calls(r"__cublas\$(?:lt\$matmul|gemm)"),
    "conv": count("convolution") + calls(r"__cudnn\$conv"),
    "conditional": count("conditional"),
    "all-reduce": count("all-reduce") + count("all-reduce-start"),
  }


def memory(compiled) -> dict[str, int] | None:
  """argument / output / temp / alias bytes of a compiled step (None: n/a)."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends raise instead of None
    return None
  if ma is None:
    return None
  out = {}
  for f in ("argument", "output", "temp", "alias"):
    v = getattr(ma, f"{f}_size_in_bytes", None)
    out[f] = None if v is None else int(v)
  return out


def peak_bytes(mem) -> int | None:
  """argument + output + temp - alias: the step's footprint (donation counted)."""
  if not mem or any(mem.get(f) is None for f in ("argument", "output", "temp")):
    return None
  return mem["argument"] + mem["output"] + mem["temp"] - (mem.get("alias") or 0)


def compile_step(step, args):
  """Compiles ``step`` with params and state donated; (executable, seconds)."""
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
  return compiled, time.perf_counter() - t0


class Clock:
  """Progress lines with the time since the start, and a deadline.

  Past ``budget_s`` no new measurement starts; one that has started may
  finish, up to ``grace_s`` more (then its rounds stop too).
  """

  def __init__(self, budget_s: float | None = None, grace_s: float = 60.0):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.grace_s = grace_s

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def over(self, grace: bool = False) -> bool:
    if self.budget_s is None:
      return False
    return self.elapsed() > self.budget_s + (self.grace_s if grace else 0.0)

  def log(self, msg: str) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp} +{self.elapsed():6.1f}s] {msg}", flush=True)


def error_text(e: BaseException) -> str:
  lines = traceback.format_exception_only(type(e), e)
  return " ".join(line.strip() for line in lines)[:400]


def build(name, step, args, clock, counts=True):
  """Compiles and warms up one variant; a dict with its facts and its carry."""
  entry: dict[str, Any] = {"error": None}
  try:
    compiled, seconds = compile_step(step, args)
    entry["compile_s"] = seconds
    entry["mem"] = memory(compiled)
    if counts:
      try:
        entry["ops"] = hlo_counts(compiled.as_text())
      except Exception:  # noqa: BLE001
        entry["ops"] = None
    p, s, batch = args
    for _ in range(2):  # warm-up (the first call also allocates)
      p, s, value = compiled(p, s, batch)
    jax.block_until_ready((p, s))
    if not np.all(np.isfinite(np.asarray(value))):
      entry["note"] = "non-finite loss in warm-up"
    entry["carry"] = [compiled, p, s, batch]
    clock.log(f"  {name}: compiled in {seconds:.1f}s")
  except Exception as e:  # noqa: BLE001 - one failure must not stop the rest
    entry["error"] = error_text(e)
    clock.log(f"  {name}: FAILED {entry['error']}")
    traceback.print_exc()
  return entry


def steps_per_round(entry, round_s: float, max_steps: int = 1000) -> tuple[int, float]:
  """Steps of the reference variant that take about ``round_s`` seconds."""
  compiled, p, s, batch = entry["carry"]
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    p, s, _ = compiled(p, s, batch)
    jax.block_until_ready(p)
    times.append(time.perf_counter() - t0)
  entry["carry"][1:3] = [p, s]
  t = float(np.median(times))
  return int(min(max_steps, max(1, round(round_s / max(t, 1e-6))))), t


def time_interleaved(built: dict[str, dict], rounds: int, steps: int, clock) -> None:
  """Adds ``times_ms`` (one per round) to each built entry that has a carry."""
  names = [n for n, e in built.items() if e.get("carry") is not None]
  for n in names:
    built[n]["times_ms"] = []
  for r in range(rounds):
    if clock.over(grace=True):
      clock.log(f"  time budget reached after {r} rounds")
      break
    for n in names if r % 2 == 0 else reversed(names):
      entry = built[n]
      compiled, p, s, batch = entry["carry"]
      t0 = time.perf_counter()
      for _ in range(steps):
        p, s, _ = compiled(p, s, batch)
      jax.block_until_ready(p)
      entry["times_ms"].append((time.perf_counter() - t0) / steps * 1e3)
      entry["carry"][1:3] = [p, s]


def finish(built: dict[str, dict]) -> dict[str, dict]:
  """The JSON-able facts of each entry (drops the executables and buffers)."""
  return {n: {k: v for k, v in e.items() if k != "carry"} for n, e in built.items()}


def measure_cases(cases: dict[str, Callable], ref: str, *, rounds, round_s, clock):
  """Builds every case (``name -> () -> (step, args)``), then times them.

  Returns ``{"rounds", "steps", "variants": {name: facts}}``; a case that
  fails (or is skipped past the time budget) has an ``error`` and no times.
  """
  built: dict[str, dict] = {}
  for name, make in cases.items():
    if clock.over(grace=True):
      built[name] = {"error": "skipped: time budget"}
      continue
    try:
      step, args = make()
    except Exception as e:  # noqa: BLE001 - one failure must not stop the rest
      built[name] = {"error": error_text(e)}
      clock.log(f"  {name}: FAILED {built[name]['error']}")
      continue
    built[name] = build(name, step, args, clock)
  out: dict[str, Any] = {"rounds": rounds}
  if built.get(ref, {}).get("carry") is not None:
    # The reference compiled first, and paid for what later compiles reuse
    # (e.g. GEMM autotuning on a GPU): compile it again for its time.
    try:
      step, args = cases[ref]()
      seconds = compile_step(step, args)[1]
      built[ref]["compile_s_first"] = built[ref]["compile_s"]
      built[ref]["compile_s"] = seconds
    except Exception as e:  # noqa: BLE001
      clock.log(f"  {ref}: second compile FAILED {error_text(e)}")
    steps, t = steps_per_round(built[ref], round_s)
    out["steps"] = steps
    clock.log(f"  {ref}: {t * 1e3:.2f} ms a step; {rounds} rounds of {steps} steps")
    time_interleaved(built, rounds, steps, clock)
  out["variants"] = finish(built)
  return out


def problem_case(problem, variant):
  """A case of ``measure_cases``: ``variant``'s step on ``problem``."""

  def make():
    tx = variant.make_tx()
    params = jax.tree.map(jnp.copy, problem.params)
    step = make_step(problem.loss, tx, variant.kind)
    return step, (params, tx.init(params), problem.batch)

  return make


def describe_problem(problem) -> dict:
  return {
    "model": problem.name,
    "family": problem.family,
    "describe": problem.describe,
    "num_params": int(problem.num_params),
    "param_bytes": int(nbytes(problem.params)),
  }


def measure_problem(problem, names=None, *, rounds, round_s, clock, perturb_dtype=None):
  """Every variant of ``names`` on one model: times, memory, compile, ops."""
  clock.log(f"{problem.name} ({problem.num_params:,} params; {problem.describe})")
  cases = {
    name: problem_case(problem, v)
    for name, v in variants(names, perturb_dtype=perturb_dtype).items()
  }
  res = measure_cases(cases, PLAIN, rounds=rounds, round_s=round_s, clock=clock)
  return {**describe_problem(problem), **res}


def ensemble_state_axes(state):
  """vmap axes of an optimizer state with every ``count`` leaf shared (None).

  ``gx.ensemble_axes`` where the library has it (it leaves the counts of the
  second-gradient states unbatched), else the same rule by name.
  """
  if hasattr(gx, "ensemble_axes"):
    return gx.ensemble_axes(state)

  def axis(path, leaf):
    del leaf
    last = path[-1] if path else None
    return None if getattr(last, "name", None) == "count" else 0

  return jax.tree_util.tree_map_with_path(axis, state)


def measure_ensemble(
  family: str,
  size: str,
  members: int,
  *,
  rounds: int,
  round_s: float,
  clock: Clock,
) -> dict:
  """``jax.vmap`` over an ensemble: plain, sam, and sam every_k two ways.

  "state batched": the whole optimizer state (its step count too) carries
  the ensemble axis, so the count is batched and `lax.cond` on it becomes a
  `select` that runs both branches. "count unbatched": the states are mapped
  with ``gx.ensemble_axes`` (the counts shared, ``None``), so the predicate
  is not batched and the `cond` stays a `cond`.
  """
  problems = [models_scaling.make(family, size, seed=i) for i in range(members)]
  first = problems[0]
  params = jax.tree.map(lambda *a: jnp.stack(a), *(p.params for p in problems))
  batch = jax.tree.map(lambda a: jnp.stack([a] * members), first.batch)
  clock.log(f"ensemble of {members} x {first.name} ({first.num_params:,} params each)")

  def case(vname, shared_count):
    def make():
      variant = variants([vname])[vname]
      tx = variant.make_tx()
      one = make_step(first.loss, tx, variant.kind)
      if shared_count:
        axes = ensemble_state_axes(jax.eval_shape(tx.init, first.params))
        state = jax.vmap(tx.init, out_axes=axes)(params)
      else:
        axes = 0
        state = jax.vmap(tx.init)(params)
      step = jax.vmap(one, in_axes=(0, axes, 0), out_axes=(0, axes, 0))
      return step, (jax.tree.map(jnp.copy, params), state, batch)

    return make

  cases = {
    ENSEMBLE_PLAIN: case(PLAIN, False),
    "sam (vmap)": case(SAM, False),
    f"sam every_k={EVERY_K}, state batched (vmap)": case(EVERY, False),
    f"sam every_k={EVERY_K}, count unbatched (vmap)": case(EVERY, True),
  }
  res = measure_cases(
    cases, ENSEMBLE_PLAIN, rounds=rounds, round_s=round_s, clock=clock
  )
  return {
    "model": f"{members} x {first.name}",
    "num_params": int(first.num_params),
    "param_bytes": int(nbytes(first.params)) * members,
    **res,
  }


# ----------------------------------------------------------------------------
# Tables and plot (shared with gpu_check.py, which renders its JSON with them)
# ----------------------------------------------------------------------------


def ratio_stats(variants_, name, ref):
  """(median, q1, q3) of the per-round time ratios name / ref, or None."""
  a = variants_.get(name, {}).get("times_ms") or []
  b = variants_.get(ref, {}).get("times_ms") or []
  n = min(len(a), len(b))
  if n == 0:
    return None
  r = np.asarray(a[:n]) / np.asarray(b[:n])
  q1, med, q3 = np.percentile(r, [25, 50, 75])
  return float(med), float(q1), float(q3)


def copies(result, name, ref=PLAIN):
  """Memory of ``name`` minus ``ref``'s, in parameter copies (None: n/a)."""
  v = result["variants"]
  a = peak_bytes(v.get(name, {}).get("mem"))
  b = peak_bytes(v.get(ref, {}).get("mem"))
  if a is None or b is None:
    return None
  return (a - b) / result["param_bytes"]


def median_ms(result, name):
  t = result["variants"].get(name, {}).get("times_ms")
  return float(np.median(t)) if t else None


def cell_missing(result, name):
  e = result["variants"].get(name)
  if e is None:
    return "-"
  if e.get("error"):
    return "skipped" if e["error"].startswith("skipped") else "failed"
  return "n/a"


def check_value(result, kind, name, ref):
  """(value, quartiles or None) of one check on one model, or None."""
  if kind == "time":
    s = ratio_stats(result["variants"], name, ref)
    return None if s is None else (s[0], s[1:])
  c = copies(result, name, PLAIN if kind == "copies" else ref)
  return None if c is None else (c, None)


def checks_table(results, names) -> tuple[list[str], list[str]]:
  """The targets table (rows: models) and the list of missed targets; only
  the checks whose variants are among ``names``."""
  checks = [c for c in CHECKS if c[2] in names and c[3] in names]
  head = "| model (params) | " + " | ".join(
    f"{label} (<= {target:g})" for label, *_, target in checks
  )
  lines = [head + " |", "|---" * (len(checks) + 1) + "|"]
  missed = []
  for res in results:
    cells = []
    for label, kind, name, ref, target in checks:
      v = check_value(res, kind, name, ref)
      if v is None:
        cells.append(cell_missing(res, name if name in res["variants"] else ref))
        continue
      value, q = v
      text = f"{value:.2f}" if q is None else f"{value:.2f} [{q[0]:.2f}, {q[1]:.2f}]"
      plain = median_ms(res, PLAIN)
      judged = not (name == EVERY and kind == "time" and (plain or 0) < EVERY_K_MIN_MS)
      if not judged:
        text = f"({text})"
      elif value > target:
        text = f"**{text}**"
        missed.append(f"{res['model']} {label} = {value:.2f} (<= {target:g})")
      cells.append(text)
    lines.append(
      f"| {res['model']} ({res['num_params']:,}) | " + " | ".join(cells) + " |"
    )
  return lines, missed


def wide_table(results, names, cell, first_cols) -> list[str]:
  """Rows: models; columns: ``first_cols`` then one per variant."""
  shown = [n for n in names if any(n in r["variants"] for r in results)]
  head = [c for c, _ in first_cols] + [SHORT.get(n, n) for n in shown]
  lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
  for res in results:
    row = [f(res) for _, f in first_cols]
    for n in shown:
      if n not in res["variants"] or res["variants"][n].get("error"):
        row.append(cell_missing(res, n))
      else:
        c = cell(res, n)
        row.append("n/a" if c is None else c)
    lines.append("| " + " | ".join(row) + " |")
  return lines


def model_col(res):
  return f"{res['model']} ({res['num_params']:,})"


def fmt(x, spec=".2f"):
  return "n/a" if x is None else format(x, spec)


def compile_ratio(res, n):
  a = res["variants"][n].get("compile_s")
  b = res["variants"].get(PLAIN, {}).get("compile_s")
  return None if not a or not b else f"{a / b:.2f}"


def ops_ratio(res, n):
  ops = res["variants"][n].get("ops")
  ref = res["variants"].get(PLAIN, {}).get("ops")
  if not ops or not ref or not (ref["dot"] + ref["conv"]):
    return None
  return f"{(ops['dot'] + ops['conv']) / (ref['dot'] + ref['conv']):.2f}"


def plain_copies(res):
  p = peak_bytes(res["variants"].get(PLAIN, {}).get("mem"))
  return fmt(None if p is None else p / res["param_bytes"])


def scaling_tables(results, names=None) -> tuple[str, list[str]]:
  """The markdown of the model-size tables, and the missed targets."""
  names = list(variants()) if names is None else list(names)
  others = [n for n in names if n != PLAIN]

  def time_cell(res, n):
    s = ratio_stats(res["variants"], n, PLAIN)
    return None if s is None else f"{s[0]:.2f}"

  def copies_cell(res, n):
    c = copies(res, n)
    return None if c is None else f"{c:+.2f}"

  steps = lambda r: f"{r.get('rounds', '?')} x {r.get('steps', '?')}"  # noqa: E731
  plain_ms = lambda r: fmt(median_ms(r, PLAIN))  # noqa: E731
  plain_compile = lambda r: fmt(  # noqa: E731
    r["variants"].get(PLAIN, {}).get("compile_s"), ".1f"
  )

  def plain_ops(r):
    ops = r["variants"].get(PLAIN, {}).get("ops")
    return "n/a" if not ops else f"{ops['dot']} / {ops['conv']}"

  checks, missed = checks_table(results, names)
  describe = "; ".join(
    f"{r['model']}: {r['describe']}" for r in results if r.get("describe")
  )
  parts = [
    "**Targets** (bold: missed; in parentheses: not judged, the plain step "
    f"is under {EVERY_K_MIN_MS:g} ms). Time checks: median of the per-round "
    "ratios [quartiles]; copies: extra memory over plain SGD (or over "
    "`optax.contrib.sam`) in parameter copies.",
    "",
    *checks,
    "",
    "**Step time**, ratio to plain SGD (median of the per-round ratios).",
    "",
    *wide_table(
      results,
      others,
      time_cell,
      [
        ("model (params)", model_col),
        ("plain ms", plain_ms),
        ("rounds x steps", steps),
      ],
    ),
    "",
    "**Memory**: argument + output + temp - alias bytes of the compiled step "
    "(`memory_analysis()`, params and state donated), extra over plain SGD "
    "in parameter copies; `plain` is plain SGD's own total in copies.",
    "",
    *wide_table(
      results,
      others,
      copies_cell,
      [("model (params)", model_col), ("plain", plain_copies)],
    ),
    "",
    "**Compile time** of the train step (trace + lower + compile), ratio to "
    "plain SGD's (plain SGD compiled twice, the second time counted: the "
    "first also pays for what later compiles reuse).",
    "",
    *wide_table(
      results,
      others,
      compile_ratio,
      [("model (params)", model_col), ("plain s", plain_compile)],
    ),
    "",
    "**Gradient work**: dots + convolutions in the compiled HLO, ratio to "
    "plain SGD's (`plain`: its dots / convolutions).",
    "",
    *wide_table(
      results, others, ops_ratio, [("model (params)", model_col), ("plain", plain_ops)]
    ),
    "",
    f"Models: {describe}.",
  ]
  return "\n".join(parts), missed


def ensemble_table(res) -> str:
  """The vmap-ensemble table and what it shows."""
  v = res["variants"]
  plain = ENSEMBLE_PLAIN
  lines = [
    f"**every_k under `jax.vmap`**: an ensemble of {res['model']} "
    f"({res.get('rounds', '?')} rounds of {res.get('steps', '?')} steps); "
    "ratio to the vmapped plain SGD step.",
    "",
    "| variant | ms / step | ratio to plain (quartiles) | extra copies | "
    "`conditional`s in the HLO | dots |",
    "|---|---|---|---|---|---|",
  ]
  for name, e in v.items():
    if e.get("error"):
      lines.append(f"| {name} | {cell_missing(res, name)} | | | | |")
      continue
    s = ratio_stats(v, name, plain)
    ratio = "n/a" if s is None else f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"
    c = copies(res, name, plain)
    ops = e.get("ops") or {}
    lines.append(
      f"| {name} | {fmt(median_ms(res, name))} | {ratio} | "
      f"{'n/a' if c is None else f'{c:+.2f}'} | {ops.get('conditional', '?')} | "
      f"{ops.get('dot', '?')} |"
    )
  names = (
    "sam (vmap)",
    f"sam every_k={EVERY_K}, state batched (vmap)",
    f"sam every_k={EVERY_K}, count unbatched (vmap)",
  )
  sam, batched, shared = (ratio_stats(v, n, plain) for n in names)
  conds = [(v.get(n, {}).get("ops") or {}).get("conditional") for n in names[1:]]
  if batched and shared and sam and None not in conds:
    lines += [
      "",
      f"With the whole state batched (the step count too), every_k={EVERY_K} "
      f"costs {batched[0]:.2f}x plain against {sam[0]:.2f}x for SAM on every "
      f"step, and its compiled step has {conds[0]} `conditional`: the batched "
      "predicate turns the `cond` into a `select` that computes both branches, "
      "the extra gradient included, on every step. Mapping the states with "
      "`axes = gx.ensemble_axes(state)` (`None` for the counts, 0 for the "
      "rest, as the state's `in_axes` and `out_axes`; the members step "
      f"together, so their counts are equal) keeps {conds[1]} `conditional` "
      f"in the compiled step: {shared[0]:.2f}x plain (1 + 1/{EVERY_K} = "
      f"{1 + 1 / EVERY_K:.2f} gradients a step).",
    ]
  return "\n".join(lines)


def plot(results, png: pathlib.Path, title: str = "") -> None:
  """Ratio to plain vs parameter count (log x), per family; memory below."""
  import matplotlib
  import matplotlib.ticker

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  families = [
    f
    for f in ("mlp", "resnet", "transformer")
    if any(r["family"] == f for r in results)
  ]
  fig, axes = plt.subplots(
    2, len(families), figsize=(5 * len(families), 8), squeeze=False, sharex="col"
  )
  shown = list(SECOND_GRADIENT)
  markers = dict(zip(shown, "o*s^vDPXh<", strict=False))
  colors = {n: f"C{i}" for i, n in enumerate(shown)}
  for j, fam in enumerate(families):
    rs = sorted(
      (r for r in results if r["family"] == fam), key=lambda r: r["num_params"]
    )
    top, bottom = axes[0, j], axes[1, j]
    for n in shown:
      xs, ts, cs = [], [], []
      for r in rs:
        s = ratio_stats(r["variants"], n, PLAIN)
        c = copies(r, n)
        if s is not None:
          xs.append(r["num_params"])
          ts.append(s[0])
          cs.append(c if c is not None else np.nan)
      if xs:
        style = dict(marker=markers[n], color=colors[n], label=SHORT[n])
        top.plot(xs, ts, **style)
        bottom.plot(xs, cs, **style)
    top.axhline(2.0, color="k", ls="--", lw=1, label="2 gradients")
    top.axhline(1 + 1 / EVERY_K, color="gray", ls=":", lw=1, label=f"1 + 1/{EVERY_K}")
    bottom.axhline(1.0, color="k", ls="--", lw=1, label="1 copy")
    top.set_title(f"{fam}{title}")
    top.set_ylabel("step time / plain SGD")
    bottom.set_ylabel("extra memory (parameter copies)")
    bottom.set_xlabel("parameters")
    # Activation-dominated models need tens of copies for double backprop.
    bottom.set_yscale("symlog", linthresh=2.0)
    bottom.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    for ax in (top, bottom):
      ax.set_xscale("log")
      ax.grid(True, which="both", alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  fig.tight_layout()
  png.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------


def setup() -> None:
  """Process-wide settings: no persistent compilation cache (compile times
  are measured), quiet donation warnings; one throwaway compile."""
  try:
    jax.config.update("jax_enable_compilation_cache", False)
  except Exception:  # noqa: BLE001 - an option this JAX may not have
    pass
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  # The first compile of a process also loads the backend's libraries (e.g.
  # cuBLAS): spend it here, not on the first variant timed.
  x = jnp.ones((8, 16))
  loss = lambda w: jnp.sum(jnp.tanh(x @ w) ** 2)  # noqa: E731
  jax.jit(jax.grad(loss)).lower(jnp.ones((16, 4))).compile()


def main(argv=None):
  """Command line: every model size and variant, then the ensemble."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument(
    "--png",
    type=pathlib.Path,
    default=None,
    help="where the plot goes (default: benchmarks/scaling.png; a temporary "
    "file with --small)",
  )
  args = parser.parse_args(argv)
  record = results_md.start(args, argv)
  setup()
  clock = Clock()
  if args.small:
    plan, rounds, round_s, ens = SMALL, 2, 0.01, ("mlp", "10k", 4)
  else:
    plan, rounds, round_s, ens = FULL, 7, 0.15, ("mlp", "1M", 4)
  results, failed = [], []
  for family, sizes in plan.items():
    for size in sizes:
      names = None
      if args.small and family != "mlp":
        names = SMALL_SUBSET
      problem = models_scaling.make(family, size)
      res = measure_problem(problem, names, rounds=rounds, round_s=round_s, clock=clock)
      failed += [
        f"{res['model']} {n}" for n, e in res["variants"].items() if e.get("error")
      ]
      results.append(res)
  ensemble = measure_ensemble(
    *ens[:2], ens[2], rounds=rounds, round_s=round_s, clock=clock
  )
  failed += [f"ensemble {n}" for n, e in ensemble["variants"].items() if e.get("error")]
  png = args.png
  if png is None:
    png = (
      pathlib.Path(tempfile.mkdtemp(prefix="scaling-small-")) / "scaling.png"
      if args.small
      else PNG
    )
  plot(results, png)
  tables, missed = scaling_tables(results)
  body = [
    f"Every variant's train step is `jax.jit(step, donate_argnums=(0, 1))` "
    f"(params and optimizer state donated) on one batch of synthetic data; "
    f"models of `benchmarks/models_scaling.py` (plain JAX). {rounds} "
    "interleaved rounds (order alternating) after warm-up, each of about "
    f"{round_s * 1e3:.0f} ms of plain SGD steps. Hyperparameters: lr {LR}, "
    f"rho {RHO}, alpha {ALPHA} (GNP), gamma {GAMMA}, epsilon {EPSILON}; "
    "`optax.contrib.sam(sgd(lr), chain(normalize(), sgd(rho)), "
    "sync_period=2, opaque_mode=True)` does the work of "
    "`chain(gx.sam(rho), sgd(lr))`; double backprop is the gradient of "
    "`L + gamma/2 ||grad L||^2` by `jax.grad` of a function calling "
    "`jax.grad` (the quantity exact GR and F-GR compute), then `sgd(lr)`.",
    "",
    f"![step time and memory vs parameters]({png.name})",
    "",
    tables,
    "",
    ensemble_table(ensemble),
    "",
  ]
  if missed:
    body += ["Missed targets in this run: " + "; ".join(missed) + ".", ""]
  if failed:
    body += ["Failed or skipped: " + "; ".join(failed) + ".", ""]
  text = "\n".join(body)
  print(text)
  print(f"plot in {png}; {clock.elapsed():.0f} s")
  results_md.write(record, SECTION, text)
  if failed:
    raise SystemExit(f"{len(failed)} measurement(s) failed: {failed}")


if __name__ == "__main__":
  main()
