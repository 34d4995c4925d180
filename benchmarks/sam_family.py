"""The SAM family at the cost it can afford: step cost vs test accuracy.

For SGD, SAM, GNP, GSAM, AE-SAM (its adaptive policy at threshold 0: the
extra gradient when ``||g||^2`` is above its running mean) and every cheap
SAM configuration (``every_k`` 2, 5
and 10, each with ``reuse="correction"`` (the default: the cached correction
``g' - g`` is added to later clean gradients) and ``reuse="looksam"``
(LookSAM: only the cached correction's part orthogonal to the clean
gradient, rescaled)), on scikit-learn's digits and on MNIST-1D, both with
20% label noise, this measures

* the step cost relative to plain SGD: the jitted training scan of the
  benchmark harness (``harness.scan_epoch``, the same code that trains),
  timed over 100 steps (whole ``every_k`` cycles), the variants interleaved
  round by round after warm-up, the median over rounds of each round's ratio
  to SGD;
* the final test accuracy over seeds 0-7 (the harness's runner, mean ± std),
  and the paired difference to SAM on the same seeds with a paired t-test.

Hyperparameters are those the generalization benchmark chose on its
validation split for 20% noise (no test-set tuning here): digits MLP, 60
epochs of batch 64, lr 0.01, rho 0.05; MNIST-1D MLP, 150 epochs of batch
100, lr 0.1, rho 0.05; GNP alpha 0.8 (the README's default); GSAM alpha 0.1
(the library's default, not tuned); LookSAM's alpha 0.7 (the default).
Every method is in front of SGD with momentum 0.9 and a cosine-decayed
learning rate; the harness builds each from its name (``gsam``,
``sam_k<k>_<reuse>``).

Run:  python benchmarks/sam_family.py           (writes RESULTS.md + PNG)
      python benchmarks/sam_family.py --small   (CI: seconds, temp files)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gnorm_optax.examples import models

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
import results_md  # noqa: E402

SECTION = "## The SAM family: step cost vs test accuracy"
PNG = pathlib.Path(__file__).with_name("sam_family.png")
NOISE = 0.2
GNP_ALPHA, GSAM_ALPHA = 0.8, 0.1
# Per data set: the generalization benchmark's 20%-noise choices.
DATA = {
  "digits": dict(model="mlp", epochs=60, batch_size=64, lr=0.01, rho=0.05),
  "mnist1d": dict(model="mlp", epochs=150, batch_size=100, lr=0.1, rho=0.05),
}
NAMES = {"digits": "digits", "mnist1d": "MNIST-1D"}
KS, REUSES = (2, 5, 10), ("correction", "looksam")
# (label, method name)
CONFIGS = (
  ("SGD", "sgd"),
  ("SAM", "sam"),
  (f"GNP a={GNP_ALPHA}", "gnp"),
  (f"GSAM a={GSAM_ALPHA}", "gsam"),
  ("AE-SAM c=0", "sam_ae"),
  *((f"SAM k={k} {r}", f"sam_k{k}_{r}") for k in KS for r in REUSES),
)
SEEDS = tuple(range(8))  # 8 seeds: more power than 5 at 2x the time
TIMING = dict(steps=100, rounds=25, warmup=2)
SMALL = dict(
  configs=("SGD", "SAM", f"GSAM a={GSAM_ALPHA}", "SAM k=2 looksam"),
  seeds=(0, 1),
  run=dict(epochs=2, train_size=300, test_size=200),
  timing=dict(steps=10, rounds=3, warmup=1),
)
BUDGETS = (1.1, 1.25, 2.0)


def base_config(dataset: str, small: bool) -> harness.RunConfig:
  """The run settings of ``dataset`` (probe diagnostics off: not needed)."""
  spec = dict(DATA[dataset])
  if small:
    spec |= SMALL["run"]
  return harness.RunConfig(
    dataset=dataset,
    label_noise=NOISE,
    alpha=GNP_ALPHA,
    probe_size=0,
    hessian_iters=0,
    **spec,
  )


def step_costs(
  base: harness.RunConfig, configs: Sequence[tuple[str, str]], timing: dict
) -> dict[str, dict[str, float]]:
  """Per-step time of each config's jitted training scan, and its ratio to SGD.

  Each variant trains its own copy of the seed-0 model on random batches of
  the seed-0 training set; every round times one call of ``timing["steps"]``
  steps of every variant, in a fresh random order, after ``warmup`` calls.

  Returns:
    ``{label: {"ms": median ms per step, "ratio": median over rounds of the
    round's time over SGD's, "q1", "q3": quartiles of that ratio}}``.
  """
  ds = harness.load(base)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  rng = np.random.default_rng(0)
  order = jnp.asarray(
    rng.integers(0, len(ds.x_train), (timing["steps"], base.batch_size))
  )
  steps = base.epochs * (len(ds.x_train) // base.batch_size)
  spec = harness.DATASETS[base.dataset]
  variants = {}
  for label, method in configs:
    model = models.make_model(base.model, 0, ds.x_train.shape[1:], spec.num_classes)
    tx = harness.make_optimizer(
      method, base.lr, steps, momentum=base.momentum, rho=base.rho, alpha=base.alpha
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model.train()
    variants[label] = list(nnx.split((model, optimizer)))

  def call(label: str) -> float:
    graphdef, state = variants[label]
    t0 = time.perf_counter()
    state, losses = harness.scan_epoch(graphdef, state, x, y, order)
    jax.block_until_ready((state, losses))
    variants[label][1] = state
    return time.perf_counter() - t0

  for label in variants:
    for _ in range(timing["warmup"]):
      call(label)
  times: dict[str, list[float]] = {label: [] for label in variants}
  labels = list(variants)
  for _ in range(timing["rounds"]):
    for i in rng.permutation(len(labels)):
      times[labels[i]].append(call(labels[i]))
  sgd = np.array(times["SGD"])
  out = {}
  for label, t in times.items():
    ratio = np.array(t) / sgd
    out[label] = {
      "ms": 1e3 * float(np.median(t)) / timing["steps"],
      "ratio": float(np.median(ratio)),
      "q1": float(np.quantile(ratio, 0.25)),
      "q3": float(np.quantile(ratio, 0.75)),
    }
  return out


def rows(
  results: Sequence[dict[str, Any]], costs: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
  """One row per config: cost, accuracy stats, paired comparisons."""
  groups = harness.group(results)
  out = []
  for label, runs in groups.items():
    acc = harness.mean_std(r["final_test_accuracy"] for r in runs)
    vs = {}
    for ref in ("SAM", "SGD"):
      if label != ref and ref in groups:
        vs[ref] = harness.paired_test(harness.paired(runs, groups[ref]))
    out.append(
      {
        "label": label,
        "n": len(runs),
        "cost": costs[label],
        "acc": acc,
        "vs": vs,
        "diverged": any(r["diverged"] for r in runs),
        "s_run": float(np.mean([r["wall_time_s"] for r in runs])),
      }
    )
  return out


def _diff(p: dict[str, Any] | None) -> str:
  if p is None:
    return "-"
  text = harness.format_mean_std(p, "+.1f", len(p["seeds"])) + " pt"
  return f"{text} ({p['wins']}/{p['ties']}/{p['losses']}, {p['verdict']})"


def table(table_rows: Sequence[dict[str, Any]]) -> str:
  """Markdown table of one data set."""
  head = (
    "| config | step cost vs SGD (median [IQR]) | ms / step | test accuracy "
    "| − SAM, paired (w/t/l, verdict) | − SGD, paired (w/t/l, verdict) | s / run |"
  )
  lines = [head, "|---|---|---|---|---|---|---|"]
  for r in table_rows:
    c = r["cost"]
    name = r["label"] + (" (diverged)" if r["diverged"] else "")
    lines.append(
      f"| {name} | {c['ratio']:.2f}x [{c['q1']:.2f}, {c['q3']:.2f}] "
      f"| {c['ms']:.3f} | {harness.format_mean_std(r['acc'], '.3f', r['n'])} "
      f"| {_diff(r['vs'].get('SAM'))} | {_diff(r['vs'].get('SGD'))} "
      f"| {r['s_run']:.1f} |"
    )
  return "\n".join(lines)


def budget_lines(table_rows: Sequence[dict[str, Any]]) -> str:
  """At each step-cost budget: the affordable config of highest mean accuracy."""
  lines = []
  for b in BUDGETS:
    ok = [r for r in table_rows if r["cost"]["ratio"] <= b and r["acc"]["mean"]]
    if not ok:
      lines.append(f"- {b:g}x: nothing fits")
      continue
    best = max(ok, key=lambda r: r["acc"]["mean"])
    lines.append(
      f"- {b:g}x ({len(ok)} config(s) fit): highest mean accuracy {best['label']} "
      f"({best['cost']['ratio']:.2f}x, {best['acc']['mean']:.3f}); vs SGD "
      f"{_diff(best['vs'].get('SGD'))}; vs SAM {_diff(best['vs'].get('SAM'))}"
    )
  return "\n".join(lines)


def plot(panels: dict[str, list[dict[str, Any]]], path: pathlib.Path) -> None:
  """Pareto plot: step cost vs SGD (x) against test accuracy (y), per data set."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
    1, len(panels), figsize=(7 * len(panels), 5), constrained_layout=True
  )
  axes = np.atleast_1d(axes)
  colors = {"correction": "tab:blue", "looksam": "tab:orange"}
  for ax, (dataset, table_rows) in zip(axes, panels.items(), strict=True):
    pts = []
    for r in table_rows:
      label, c, acc = r["label"], r["cost"], r["acc"]
      if acc["mean"] is None:
        continue
      reuse = next((u for u in REUSES if label.endswith(u)), None)
      base_color = {"SGD": "black", "SAM": "tab:red", "GNP": "tab:purple"}
      color = colors.get(reuse) or base_color.get(label.split()[0], "tab:green")
      marker = "o" if reuse else "s"
      ax.errorbar(
        c["ratio"],
        100 * acc["mean"],
        yerr=100 * acc["std"],
        xerr=[[c["ratio"] - c["q1"]], [c["q3"] - c["ratio"]]],
        fmt=marker,
        color=color,
        capsize=3,
        ms=6,
      )
      ax.annotate(
        label,
        (c["ratio"], 100 * acc["mean"]),
        fontsize=7,
        xytext=(4, 4),
        textcoords="offset points",
      )
      pts.append((c["ratio"], 100 * acc["mean"]))
    front, best = [], -np.inf
    for x, yv in sorted(pts):
      if yv > best:
        front.append((x, yv))
        best = yv
    if front:
      fx, fy = zip(*front, strict=True)
      ax.plot(fx, fy, color="0.5", ls="--", lw=1, label="Pareto front (means)")
    for b in BUDGETS:
      ax.axvline(b, color="0.8", lw=0.8, ls=":")
    ax.set_xlabel("step cost relative to plain SGD (median over rounds)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title(f"{NAMES[dataset]}, {NOISE:.0%} label noise")
    ax.grid(alpha=0.3)
    ax.plot([], [], "o", color=colors["correction"], label="every_k, correction")
    ax.plot([], [], "o", color=colors["looksam"], label="every_k, looksam")
    for name, col in (("SGD", "black"), ("SAM", "tab:red"), ("GNP", "tab:purple")):
      ax.plot([], [], "s", color=col, label=name)
    ax.plot([], [], "s", color="tab:green", label="GSAM")
    ax.legend(fontsize=7, loc="lower right")
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  """Measures cost and accuracy on both data sets; writes RESULTS.md and the PNG."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument(
    "--png",
    type=pathlib.Path,
    default=None,
    help="where the plot goes (default: benchmarks/sam_family.png, a "
    "temporary file with --small)",
  )
  parser.add_argument(
    "--seeds", type=int, nargs="+", default=None, help="seeds (default 0-7)"
  )
  args = parser.parse_args(argv)
  record = results_md.start(args, argv)
  small = args.small
  configs = [c for c in CONFIGS if not small or c[0] in SMALL["configs"]]
  seeds = args.seeds or (SMALL["seeds"] if small else SEEDS)
  timing = SMALL["timing"] if small else TIMING
  png = args.png or (
    pathlib.Path(tempfile.mkdtemp(prefix="sam-family-small-")) / PNG.name
    if small
    else PNG
  )
  panels, text = {}, []
  for dataset in DATA:
    base = base_config(dataset, small)
    load = os.getloadavg()
    costs = step_costs(base, configs, timing)
    print(
      f"{dataset}: step cost "
      + ", ".join(f"{k} {v['ratio']:.2f}x" for k, v in costs.items()),
      flush=True,
    )
    runs = [
      (label, dataclasses.replace(base, method=method, seed=seed))
      for seed in seeds
      for label, method in configs
    ]
    results = harness.run_all(runs)
    table_rows = rows(results, costs)
    panels[dataset] = table_rows
    n_train = results[0]["num_train"]
    steps = results[0]["steps_per_epoch"] * base.epochs
    text.append(
      f"### {NAMES[dataset]}\n\n"
      f"{n_train} training samples, {results[0]['num_test']} clean test samples; "
      f"{base.epochs} epochs of batch {base.batch_size} ({steps} steps), lr "
      f"{base.lr}, rho {base.rho}. Load average (1 min) when its timing "
      f"started: {load[0]:.2f}.\n\n{table(table_rows)}\n\n"
      f"Budgets (step cost vs SGD at most; the config of highest mean test "
      f"accuracy among those that fit):\n\n{budget_lines(table_rows)}"
    )
  plot(panels, png)
  seeds_text = ", ".join(map(str, seeds))
  body = (
    f"Step cost vs test accuracy of the SAM family, {NOISE:.0%} label noise on "
    "both data sets (the generalization benchmark's harness and its 20%-noise "
    f"hyperparameters, chosen there on a validation split; GNP alpha {GNP_ALPHA}, "
    f"GSAM alpha {GSAM_ALPHA} (library default, not tuned), LookSAM alpha 0.7 "
    "(default), AE-SAM threshold 0 and decay 0.9 (its policy's step cost is "
    "measured over the timing's 2,700 steps of training, not assumed); every method in front of SGD with momentum 0.9, cosine-decayed "
    f"learning rate). Seeds {seeds_text}: a seed fixes the label noise, the "
    "weights and the batch order (and the digits split), the same for every "
    "config; test accuracy mean ± sample std over seeds, and paired per-seed "
    "differences to SAM and to SGD with a paired t-test (verdict 'higher'/"
    "'lower' when |t| exceeds Student's two-sided 5% value, else 'no "
    "difference'). Step cost: the jitted training scan (the code that "
    f"trains), {timing['steps']} steps per call (whole every_k cycles), "
    f"{timing['warmup']} warm-up calls, then {timing['rounds']} rounds with "
    "the configs in a random order per round; the cost is the median over "
    "rounds of the config's time over SGD's in the same round ([IQR]), "
    "`ms / step` the median time per step. `s / run` is the wall time of a "
    "whole training run including compilation and evaluation.\n\n"
    f"![step cost vs test accuracy]({png.name})\n\n" + "\n\n".join(text)
  )
  results_md.write(record, SECTION, body)
  print(f"plot in {png}; total {record.elapsed():.0f} s")


if __name__ == "__main__":
  main()
