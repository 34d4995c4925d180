"""Generalization: flat-minima methods against their baselines, paired by seed.

``python benchmarks/generalization.py`` (the README's main command) trains the
digits CNN (9,930 parameters; 1,348 training and 449 test images) on 20% noisy
labels with SGD, SAM (rho 0.15) and GNP (rho 0.15, alpha 0.8), seeds 0, 1
and 2: 60 epochs of SGD with momentum 0.9, batch 64, learning rate
cosine-decayed from 0.02, SAM and GNP in front of that same optimizer. It
prints a table of test accuracy, final train loss and top Hessian eigenvalue
(mean ± std over the seeds) with the paired difference to SGD on the same
seeds, and writes the runs as JSON and a PNG (the eigenvalue and the test
accuracy of every method and seed, and the test-accuracy curves) to
``--output-dir`` (default ``runs/generalization/``).

A seed fixes the split (digits), the label noise, the initial weights and the
batch order, the same for every method, so the per-seed difference to the
baseline removes the spread that all methods share.

``--full`` measures the papers' claims and writes one section per data set
of ``benchmarks/RESULTS.md`` and one PNG per data set
(``benchmarks/generalization_<dataset>.png``): on digits (the 64-wide MLP,
60 epochs of batch 64) and MNIST-1D (the paper's 40-100-100-10 MLP, 150
epochs of batch 100), with 0% and 20% label noise, a validation search
(``SEARCH``, on the last 20% of the training set, seeds 0 and 1) followed by
13 methods on seeds 0-4: SGD, SAM, GNP alpha 0.8/0.5/0.3, F-GR, B-GR, exact
GR, flooding, AdamW, AGR-AdamW, Adan, AGR-Adan. Each run also measures the
top five Hessian eigenvalues, the SLQ eigenvalue density and a 1-D
filter-normalized loss slice; each claim (``CLAIMS``) gets a paired t-test
over the seeds. The sweep uses the MLPs, not the CNN, to fit about 30
minutes on 2 CPU cores. ``--small`` (CI) runs the default mode and a sliver
of the sweep on MNIST-1D on a few hundred samples for two epochs, writing to
temporary files.

Run:  python benchmarks/generalization.py           (3 seeds; JSON + PNG)
      python benchmarks/generalization.py --full    (writes benchmarks/RESULTS.md)
      python benchmarks/generalization.py --small   (CI: seconds, temp files)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
import results_md  # noqa: E402

SECTION = "## Generalization on {dataset}"  # filled in with the data set
CLAIMS_SECTION = "## Generalization: the papers' claims on digits and MNIST-1D"
BASE = harness.RunConfig()  # the README's setting; method and seed replaced
# The README's comparison: (label, method, alpha).
DEFAULT_VARIANTS = (
  ("SGD", "sgd", None),
  (f"SAM (rho {BASE.rho})", "sam", None),
  (f"GNP (rho {BASE.rho}, alpha {BASE.alpha})", "gnp", None),
)
FLOOD_LEVEL = {0.0: 0.03, 0.2: 1.0}
# (column title, result key, format)
METRICS = (
  ("test accuracy", "final_test_accuracy", ".3f"),
  ("final train loss", "final_train_loss", ".3f"),
  ("grad norm", "grad_norm", ".3f"),
  ("top Hessian eig", "hessian_top_eigenvalue", ".2f"),
)
DEFAULT_METRICS = tuple(m for m in METRICS if m[1] != "grad_norm")
SWEEP_METRICS = (
  ("test accuracy", "final_test_accuracy", ".3f"),
  ("train loss", "final_train_loss", ".3f"),
  ("λ1", "hessian_top_eigenvalue", ".2f"),
  ("λ5", "lambda_5", ".2f"),
  ("tr H (SLQ)", "slq_trace", ".3g"),
  ("slice rise", "slice_rise", ".3f"),
)
# --small: a few hundred samples, two epochs, a short Lanczos run.
SMALL = dict(
  model="mlp", epochs=2, train_size=200, test_size=200, probe_size=128, hessian_iters=3
)

# ----------------------------------------------------------------------------
# The --full sweep: the papers' claims on digits and MNIST-1D.
# ----------------------------------------------------------------------------

# Per data set: the model and training length of every run. Both are the
# 2-hidden-layer MLP (an epoch per call, see harness), the digits one of width
# 64 (the README's default mode uses the slower CNN), MNIST-1D's the paper's
# 40-100-100-10 trained for the paper's 6,000 steps of batch 100.
SWEEP_DATA = {
  "digits": dict(model="mlp", epochs=60, batch_size=64),
  "mnist1d": dict(model="mlp", epochs=150, batch_size=100),
}
NOISES = (0.0, 0.2)
SEARCH_SEEDS = (0, 1)
VAL_FRACTION = 0.2
# The validation search, in order: (name, method, field, grid). The SGD
# learning rate is chosen first and shared by every SGD-based method; the
# Adam-type learning rates are shared by AdamW/AGR-AdamW and Adan/AGR-Adan.
SEARCH = (
  ("SGD lr", "sgd", "lr", (0.003, 0.01, 0.03, 0.1, 0.3)),
  ("SAM rho", "sam", "rho", (0.02, 0.05, 0.1, 0.2, 0.5)),
  ("F-GR gamma", "fdgr", "gamma", (0.003, 0.01, 0.03, 0.1, 0.3)),
  ("flood level", "flooding", "flood_level", None),
  ("AdamW lr", "adamw", "lr", (3e-4, 1e-3, 3e-3, 1e-2)),
  ("Adan lr", "adan", "lr", (3e-4, 1e-3, 3e-3, 1e-2)),
)
# Flood levels around each noise level's reachable training loss.
FLOOD_GRID = {0.0: (0.01, 0.03, 0.1, 0.3), 0.2: (0.3, 0.6, 0.9, 1.2)}
ALPHAS = (0.8, 0.5, 0.3)
# (label, method, the searched values it takes, extra fields)
SWEEP_VARIANTS = (
  ("SGD", "sgd", ("SGD lr",), {}),
  ("SAM (GNP alpha=1)", "sam", ("SGD lr", "SAM rho"), {}),
  *((f"GNP alpha={a}", "gnp", ("SGD lr", "SAM rho"), {"alpha": a}) for a in ALPHAS),
  ("F-GR", "fdgr", ("SGD lr", "F-GR gamma"), {}),
  ("B-GR", "bdgr", ("SGD lr", "F-GR gamma"), {}),
  ("GR (exact)", "gr", ("SGD lr", "F-GR gamma"), {}),
  ("flooding", "flooding", ("SGD lr", "flood level"), {}),
  ("AdamW", "adamw", ("AdamW lr",), {}),
  ("AGR-AdamW", "agr_adamw", ("AdamW lr",), {}),
  ("Adan", "adan", ("Adan lr",), {}),
  ("AGR-Adan", "agr_adan", ("Adan lr",), {}),
)
SEARCH_FIELD = {name: field for name, _, field, _ in SEARCH}
# The claims: (paper, claim, label a, label b, result key); a − b, paired.
CLAIMS = (
  ("SAM", "SAM beats SGD", "SAM (GNP alpha=1)", "SGD", "final_test_accuracy"),
  *(
    (
      "GNP",
      f"alpha={a} beats SAM",
      f"GNP alpha={a}",
      "SAM (GNP alpha=1)",
      "final_test_accuracy",
    )
    for a in ALPHAS
  ),
  ("Karakida", "F-GR beats B-GR", "F-GR", "B-GR", "final_test_accuracy"),
  ("Karakida", "F-GR beats exact GR", "F-GR", "GR (exact)", "final_test_accuracy"),
  ("Karakida", "F-GR beats SGD", "F-GR", "SGD", "final_test_accuracy"),
  ("Flooding", "flooding beats SGD", "flooding", "SGD", "final_test_accuracy"),
  ("AGR", "AGR-AdamW beats AdamW", "AGR-AdamW", "AdamW", "final_test_accuracy"),
  ("AGR", "AGR-AdamW trains faster", "AGR-AdamW", "AdamW", "early_train_loss"),
  ("AGR", "AGR-Adan beats Adan", "AGR-Adan", "Adan", "final_test_accuracy"),
  ("AGR", "AGR-Adan trains faster", "AGR-Adan", "Adan", "early_train_loss"),
)
SMALL_SWEEP = ("SGD", "SAM (GNP alpha=1)", "AdamW", "AGR-AdamW")


def runs_for(
  variants: Sequence[tuple[str, str, float | None]],
  seeds: Sequence[int],
  noise: float,
  base: harness.RunConfig,
) -> list[tuple[str, harness.RunConfig]]:
  """``(label, config)`` of every variant and seed; seeds in the outer loop,
  so that an interrupted sweep has every variant on its first seeds."""
  runs = []
  for seed in seeds:
    for label, method, alpha in variants:
      changes: dict[str, Any] = {
        "method": method,
        "seed": seed,
        "label_noise": noise,
        "flood_level": FLOOD_LEVEL.get(noise, base.flood_level),
      }
      if alpha is not None:
        changes["alpha"] = alpha
      runs.append((label, dataclasses.replace(base, **changes)))
  return runs


def table(
  results: Sequence[dict[str, Any]],
  metrics: Sequence[tuple[str, str, str]] = METRICS,
  reference: str = "SGD",
) -> str:
  """Markdown table, one row per variant: mean ± std and the paired difference.

  Args:
    results: runs of one noise level, with their ``label``.
    metrics: the ``(title, key, format)`` columns.
    reference: the label every variant is compared with, seed by seed.

  Returns:
    The table's lines.
  """
  groups = harness.group(results)
  head = [
    "method",
    *(t for t, _, _ in metrics),
    f"test acc − {reference} (paired)",
    f"wins/ties/losses vs {reference}",
    "s / run",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for label, runs in groups.items():
    n = len(runs)
    cells = [
      harness.format_mean_std(harness.mean_std(r[k] for r in runs), s, n)
      for _, k, s in metrics
    ]
    name = label + (" (diverged)" if any(r["diverged"] for r in runs) else "")
    if label == reference or reference not in groups:
      diff = wins = "-"
    else:
      p = harness.paired(runs, groups[reference])
      diff = harness.format_mean_std(p, "+.1f", len(p["seeds"])) + " pt"
      wins = f"{p['wins']}/{p['ties']}/{p['losses']}"
    t = np.mean([r["wall_time_s"] for r in runs])
    lines.append("| " + " | ".join([name, *cells, diff, wins, f"{t:.1f}"]) + " |")
  return "\n".join(lines)


def pair_notes(results: Sequence[dict[str, Any]], pairs) -> str:
  """One line per ``(a, b)`` label pair: per-seed test accuracy a − b."""
  groups = harness.group(results)
  notes = []
  for a, b in pairs:
    if a not in groups or b not in groups:
      continue
    p = harness.paired(groups[a], groups[b])
    per_seed = ", ".join("-" if x is None else f"{x:+.1f}" for x in p["diffs"])
    mean = harness.format_mean_std(p, "+.2f", len(p["seeds"]))
    notes.append(f"- {a} − {b}, per seed: {per_seed} pt (mean {mean})")
  return "\n".join(notes)


def plot(results: Sequence[dict[str, Any]], path: pathlib.Path, title: str) -> None:
  """Saves the comparison as a PNG: eigenvalue, final accuracy, accuracy curves.

  Left: the top Hessian eigenvalue of every method (bar: mean; markers: the
  seeds). Middle: the final test accuracy of every seed (a line joins one
  seed's methods, so the paired gap shows; bar: the mean), on an axis fitted
  to the values. Right: the mean test accuracy per epoch, on an axis fitted
  to the second half of training.

  Args:
    results: runs with their ``label``.
    path: the PNG file to write.
    title: the figure's title.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  groups = harness.group(results)
  labels = list(groups)
  seeds = sorted({r["config"]["seed"] for r in results})
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  markers = "osD^v<>phX*"
  fig, (ax_eig, ax_acc, ax_curve) = plt.subplots(
    1,
    3,
    figsize=(15, 4.6),
    constrained_layout=True,
    gridspec_kw={"width_ratios": [1, 1, 1.2]},
  )
  x = np.arange(len(labels))
  offsets = np.linspace(-0.2, 0.2, len(seeds)) if len(seeds) > 1 else [0.0]
  for i, label in enumerate(labels):
    color = colors[i % len(colors)]
    runs = harness.by_seed(groups[label])
    eigs = [r["hessian_top_eigenvalue"] for r in runs.values()]
    eigs = [e for e in eigs if e is not None]
    if eigs:
      ax_eig.bar(i, np.mean(eigs), width=0.6, color=color, alpha=0.3)
    for k, seed in enumerate(seeds):
      r = runs.get(seed)
      if r is not None and r["hessian_top_eigenvalue"] is not None:
        ax_eig.plot(
          i + offsets[k],
          r["hessian_top_eigenvalue"],
          markers[k % 11],
          color=color,
          ms=6,
        )
    accs = [r["final_test_accuracy"] for r in runs.values()]
    ax_acc.hlines(np.mean(accs), i - 0.3, i + 0.3, color=color, lw=3)
  for k, seed in enumerate(seeds):
    acc = [
      harness.by_seed(groups[lb]).get(seed, {}).get("final_test_accuracy")
      for lb in labels
    ]
    acc = [np.nan if a is None else a for a in acc]
    ax_acc.plot(
      x, acc, "-" + markers[k % 11], color="0.45", alpha=0.7, ms=5, label=f"seed {seed}"
    )
  for ax in (ax_eig, ax_acc):
    ax.set_xticks(
      x,
      labels,
      rotation=25 if len(labels) > 3 else 0,
      ha="right" if len(labels) > 3 else "center",
      fontsize=8,
    )
    ax.grid(axis="y", alpha=0.3)
  ax_eig.set_ylim(bottom=0)
  ax_eig.set_title("top Hessian eigenvalue (bar: mean, markers: seeds)")
  ax_acc.set_title("final test accuracy (line: one seed, bar: mean)")
  ax_acc.legend(fontsize=7)
  all_tail = []
  for i, label in enumerate(labels):
    runs = groups[label]
    length = max(len(r["test_accuracy"]) for r in runs)
    curves = np.array(
      [r["test_accuracy"] + [np.nan] * (length - len(r["test_accuracy"])) for r in runs]
    )
    mean = np.nanmean(curves, axis=0)
    epochs = np.arange(1, length + 1)
    ax_curve.plot(epochs, mean, color=colors[i % len(colors)], label=label)
    all_tail.append(mean[length // 2 :])
  tail = np.concatenate(all_tail)
  tail = tail[np.isfinite(tail)]
  if tail.size:
    low, high = tail.min(), tail.max()
    pad = max(0.1 * (high - low), 0.002)
    ax_curve.set_ylim(low - pad, high + pad)
  longest = max(len(r["test_accuracy"]) for r in results)
  if longest > 3:
    ax_curve.set_xlim(longest // 2 + 1, longest)
  ax_curve.set_xlabel("epoch")
  ax_curve.set_title("test accuracy, mean over seeds (second half of training)")
  ax_curve.grid(alpha=0.3)
  ax_curve.legend(fontsize=7)
  fig.suptitle(title)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def save(
  results: Sequence[dict[str, Any]],
  out_dir: pathlib.Path,
  stem: str,
  title: str,
  settings: dict[str, Any],
) -> list[pathlib.Path]:
  """Writes ``<stem>.json`` (settings, summary, every run) and ``<stem>.png``."""
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path, png_path = out_dir / f"{stem}.json", out_dir / f"{stem}.png"
  groups = harness.group(results)
  summary = [
    {
      "label": label,
      "seeds": [r["config"]["seed"] for r in runs],
      **{k: harness.mean_std(r[k] for r in runs) for _, k, _ in METRICS},
      **(
        {}
        if label == "SGD" or "SGD" not in groups
        else {"test_accuracy_minus_sgd_pt": harness.paired(runs, groups["SGD"])}
      ),
    }
    for label, runs in groups.items()
  ]
  record = {"settings": settings, "summary": summary, "runs": list(results)}
  json_path.write_text(json.dumps(harness.finite_or_none(record), indent=1))
  plot(results, png_path, title)
  return [json_path, png_path]


def describe(base: harness.RunConfig, seeds: Sequence[int]) -> str:
  """The shared recipe, in one sentence."""
  return (
    f"{base.dataset} {base.model.upper()}, {base.epochs} epochs of batch "
    f"{base.batch_size}, SGD momentum {base.momentum}, lr cosine-decayed from "
    f"{harness.default_lr('sgd')}, seeds {', '.join(map(str, seeds))}"
  )


def main_default(args, base, seeds, record) -> list[dict[str, Any]]:
  """The README's comparison: SGD, SAM, GNP on 20% noisy labels."""
  print(f"{describe(base, seeds)}; 20% label noise", flush=True)
  results = harness.run_all(
    runs_for(DEFAULT_VARIANTS, seeds, 0.2, base), cache=args.cache
  )
  print(table(results, DEFAULT_METRICS))
  title = f"20% label noise: {describe(base, seeds)}"
  files = save(
    results,
    args.output_dir,
    f"{base.dataset}_{base.model}_sgd_sam_gnp",
    title,
    {"base": dataclasses.asdict(base), "seeds": list(seeds), "label_noise": 0.2},
  )
  print(f"total {record.elapsed():.1f} s; wrote " + " and ".join(map(str, files)))
  return results


def derive(r: dict[str, Any]) -> dict[str, Any]:
  """``r`` with ``lambda_5`` and ``early_train_loss``: the mean training loss
  over the first quarter of the epochs (lower: faster training)."""
  tops = r.get("hessian_top_eigenvalues") or [None] * harness.TOP_K
  curve = r["train_loss"]
  early = float(np.mean(curve[: max(len(curve) // 4, 1)])) if curve else None
  return {**r, "lambda_5": tops[-1], "early_train_loss": early}


def search(
  base: harness.RunConfig,
  noise: float,
  seeds: Sequence[int],
  cache,
  log,
  small: bool = False,
) -> tuple[dict[str, float], list[str]]:
  """Chooses every searched hyperparameter on the validation split.

  Each candidate trains on the training set minus its last ``VAL_FRACTION``
  (``harness.RunConfig.val_fraction``) and is scored by its final accuracy
  on that held-out part (noisy labels, as the training set's), averaged over
  ``seeds``; the best is kept (the first on a tie). The test set is never
  read. ``small`` (CI) tries two SGD learning rates and takes the first value
  of the other grids.

  Returns:
    ``({search name: chosen value}, markdown lines reporting the search)``.
  """
  chosen: dict[str, float] = {}
  lines = []
  for name, method, field, grid in SEARCH:
    grid = FLOOD_GRID[noise] if grid is None else grid
    if small and name != "SGD lr":  # CI: the grid's first value, untried
      chosen[name] = grid[0]
      lines.append(f"- {name}: {grid[0]:g} (not searched: --small)")
      continue
    if small:
      grid = grid[:2]
    sgd_based = name != "SGD lr" and method not in harness.ADAPTIVE_METHODS
    fixed = {"lr": chosen["SGD lr"]} if sgd_based else {}
    scores = []
    for value in grid:
      runs = [
        (
          name,
          dataclasses.replace(
            base,
            method=method,
            seed=seed,
            label_noise=noise,
            val_fraction=VAL_FRACTION,
            probe_size=0,
            spectrum=False,
            **fixed,
            **{field: value},
          ),
        )
        for seed in seeds
      ]
      results = harness.run_all(runs, cache=cache, log=log)
      scores.append(float(np.mean([r["final_test_accuracy"] for r in results])))
    best = int(np.argmax(scores))
    chosen[name] = grid[best]
    cells = ", ".join(
      f"{'**' if i == best else ''}{v:g}: {100 * sc:.1f}{'**' if i == best else ''}"
      for i, (v, sc) in enumerate(zip(grid, scores, strict=True))
    )
    lines.append(
      f"- {name} ({method}" + (f", lr {fixed['lr']:g}" if fixed else "") + f"): {cells}"
    )
  return chosen, lines


def sweep_runs(
  base: harness.RunConfig,
  noise: float,
  seeds: Sequence[int],
  chosen: dict[str, float],
  variants=SWEEP_VARIANTS,
) -> list[tuple[str, harness.RunConfig]]:
  """``(label, config)`` of every sweep variant and seed (seeds outermost)."""
  runs = []
  for seed in seeds:
    for label, method, searched, extra in variants:
      changes = {SEARCH_FIELD[n]: chosen[n] for n in searched}
      config = dataclasses.replace(
        base,
        method=method,
        seed=seed,
        label_noise=noise,
        spectrum=True,
        **changes,
        **extra,
      )
      runs.append((label, config))
  return runs


def claim_test(
  groups: dict[str, list[dict[str, Any]]], a: str, b: str, key: str
) -> dict[str, Any] | None:
  """The paired test of claim ``a`` over ``b`` on ``key``; positive: ``a`` better.

  Accuracy differences are in points; a loss difference is ``(b − a) / b``
  in percent of ``b``'s loss (a lower loss is better), per seed. A difference
  beyond the seed noise but smaller than ``MIN_EFFECT`` (one test sample, or
  1% of the loss) is called ``"negligible"``. None if a label is missing.
  """
  if a not in groups or b not in groups:
    return None
  if key == "final_test_accuracy":
    p = harness.paired_test(harness.paired(groups[a], groups[b], key=key))
    return _negligible(p, 100 / groups[a][0]["num_test"])
  ra, rb = harness.by_seed(groups[a]), harness.by_seed(groups[b])
  relative = {
    s: {**ra[s], "gain": 100 * (rb[s][key] - ra[s][key]) / rb[s][key]}
    for s in ra
    if s in rb and ra[s][key] is not None and rb[s][key]
  }
  zero = {s: {**rb[s], "gain": 0.0} for s in relative}
  p = harness.paired(relative.values(), zero.values(), key="gain", scale=1.0)
  return _negligible(harness.paired_test(p), MIN_EFFECT["loss_percent"])


MIN_EFFECT = {"loss_percent": 1.0}  # and one test sample for accuracy


def _negligible(p: dict[str, Any], threshold: float) -> dict[str, Any]:
  if p["verdict"] in ("higher", "lower") and abs(p["mean"]) < threshold:
    return {**p, "verdict": "negligible"}
  return p


VERDICTS = {
  "higher": "**holds**",
  "lower": "**reversed**",
  "no difference": "not confirmed (within seed noise)",
  "negligible": "not confirmed (beyond the seed noise but below one test "
  "sample or 1% of the loss)",
}


def summary_section(
  cells: dict[tuple[str, float], list[dict[str, Any]]], seeds: Sequence[int]
) -> str:
  """Claim by claim over every (data set, noise) cell, then flatness by method."""
  names = list(cells)
  head = [f"{DATASET_NAMES[d]}, {n:.0%} noise" for d, n in names]
  lines = [
    f"Each cell: the paired difference a − b over seeds {seeds[0]}-{seeds[-1]} "
    "(mean ± std; test "
    "accuracy in points; for *trains faster*, how much lower a's mean training "
    "loss over the first quarter of the epochs is, in % of b's) and the verdict of a paired t-test "
    "at 5% (*holds*: a better beyond the seed noise; *reversed*: b better; "
    "*n.s.*: within the seed noise; *negligible*: beyond the seed noise but "
    "smaller than one test sample or 1% of the loss). Details, the validation search and the "
    "plots: the sections *Generalization on digits* and *on MNIST-1D*.",
    "",
    "| paper | claim | " + " | ".join(head) + " |",
    "|---|---|" + "---|" * len(head),
  ]
  short = {
    "higher": "holds",
    "lower": "reversed",
    "no difference": "n.s.",
    "negligible": "negligible",
  }
  for paper, claim, a, b, key in CLAIMS:
    row = []
    for cell in names:
      p = claim_test(harness.group(cells[cell]), a, b, key)
      if p is None:
        row.append("-")
        continue
      text = harness.format_mean_std(p, "+.2f", p["n"])
      text += " pt" if key == "final_test_accuracy" else " %"
      verdict = short.get(p["verdict"], p["verdict"])
      row.append(
        f"{text} **{verdict}**"
        if p["verdict"] in short and verdict in ("holds", "reversed")
        else f"{text} {verdict}"
      )
    lines.append(f"| {paper} | {claim} | " + " | ".join(row) + " |")
  lines += [
    "",
    "Flatness by method: top Hessian eigenvalue λ1 and the slice rise (loss "
    "increase at ±0.5 filter norms), mean over seeds; the test accuracy "
    "(mean ± std) for reference.",
    "",
    "| method | " + " | ".join(head) + " |",
    "|---|" + "---|" * len(head),
  ]
  labels = list(harness.group(cells[names[0]]))
  for label in labels:
    row = []
    for cell in names:
      runs = harness.group(cells[cell]).get(label, [])
      if not runs:
        row.append("-")
        continue
      lam = harness.mean_std(r["hessian_top_eigenvalue"] for r in runs)["mean"]
      rise = harness.mean_std(r.get("slice_rise") for r in runs)["mean"]
      acc = harness.mean_std(r["final_test_accuracy"] for r in runs)
      row.append(
        f"λ1 {harness._num(lam, '.2f')}, rise {harness._num(rise, '.3f')}; acc "
        + harness.format_mean_std(acc, ".3f", len(runs))
      )
    lines.append(f"| {label} | " + " | ".join(row) + " |")
  return "\n".join(lines)


def claims_table(results: Sequence[dict[str, Any]]) -> str:
  """One row per claim: the paired difference, wins/losses, t and the verdict."""
  groups = harness.group(results)
  lines = [
    "| paper | claim | a − b (paired, mean ± std) | wins/ties/losses | t | verdict |",
    "|---|---|---|---|---|---|",
  ]
  for paper, claim, a, b, key in CLAIMS:
    p = claim_test(groups, a, b, key)
    if p is None:
      continue
    accuracy = key == "final_test_accuracy"
    diff = harness.format_mean_std(p, "+.2f", p["n"])
    diff += " pt" if accuracy else " % (early loss, (b − a) / b)"
    t = "-" if p["t"] is None else f"{p['t']:+.1f}"
    lines.append(
      f"| {paper} | {claim} | {diff} | {p['wins']}/{p['ties']}/{p['losses']} | {t} "
      f"| {VERDICTS.get(p['verdict'], p['verdict'])} |"
    )
  return "\n".join(lines)


def plot_sweep(
  cells: dict[float, list[dict[str, Any]]], path: pathlib.Path, title: str
) -> None:
  """One PNG per data set: a row per noise level.

  Columns: test accuracy of every method and seed (bar: mean; a grey line
  joins one seed's methods), the top five Hessian eigenvalues (mean over
  seeds), the SLQ eigenvalue density (smoothed, mean over seeds; log scale)
  and the 1-D filter-normalized loss slice (mean over seeds), the last two for
  a few methods.
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shown = ("SGD", "SAM (GNP alpha=1)", "F-GR", "flooding", "AdamW", "AGR-AdamW")
  fig, axes = plt.subplots(
    len(cells),
    4,
    figsize=(20, 4.6 * len(cells)),
    constrained_layout=True,
    squeeze=False,
  )
  colors = [plt.get_cmap("tab20")(i) for i in range(0, 20, 2)]
  colors += [plt.get_cmap("tab20")(i) for i in range(1, 20, 2)]
  for row, (noise, results) in zip(axes, cells.items(), strict=True):
    groups = harness.group(results)
    labels = list(groups)
    ax_acc, ax_eig, ax_slq, ax_slice = row
    seeds = sorted({r["config"]["seed"] for r in results})
    x = np.arange(len(labels))
    for i, label in enumerate(labels):
      accs = [r["final_test_accuracy"] for r in groups[label]]
      ax_acc.bar(i, np.mean(accs), width=0.6, color=colors[i % 20], alpha=0.35)
      tops = [r.get("hessian_top_eigenvalues") for r in groups[label]]
      tops = np.array([t for t in tops if t])
      if tops.size:
        for k in range(tops.shape[1]):
          ax_eig.plot(i, tops[:, k].mean(), "o", color=colors[i % 20], ms=7 - k)
    for seed in seeds:
      acc = [
        harness.by_seed(groups[lb]).get(seed, {}).get("final_test_accuracy", np.nan)
        for lb in labels
      ]
      ax_acc.plot(x, acc, "-o", color="0.45", alpha=0.5, ms=3)
    accs = [r["final_test_accuracy"] for r in results]
    ax_acc.set_ylim(min(accs) - 0.02, max(accs) + 0.01)
    for ax in (ax_acc, ax_eig):
      ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
      ax.grid(axis="y", alpha=0.3)
    ax_acc.set_title(f"{noise:.0%} noise: test accuracy (bar: mean, lines: seeds)")
    ax_eig.set_title("top 5 Hessian eigenvalues (mean over seeds)")
    ax_eig.set_yscale("log")
    nodes = [np.asarray(r["slq_nodes"]) for r in results if r.get("slq_nodes")]
    if nodes:
      lo = min(n.min() for n in nodes)
      hi = max(n.max() for n in nodes)
      grid = np.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 400)
      sigma = 0.01 * (hi - lo) + 1e-6
      for i, label in enumerate(labels):
        if label not in shown:
          continue
        dens = []
        for r in groups[label]:
          if not r.get("slq_nodes"):
            continue
          nd, wt = np.asarray(r["slq_nodes"]), np.asarray(r["slq_weights"])
          z = (grid[:, None, None] - nd) / sigma
          k = np.exp(-0.5 * z**2) / (sigma * np.sqrt(2 * np.pi))
          dens.append((wt * k).sum(-1).mean(-1))
        if dens:
          ax_slq.semilogy(
            grid, np.mean(dens, 0) + 1e-8, color=colors[i % 20], label=label
          )
        curves = [r["slice_values"] for r in groups[label] if r.get("slice_values")]
        if curves:
          coords = groups[label][0]["slice_coords"]
          ax_slice.plot(coords, np.mean(curves, 0), color=colors[i % 20], label=label)
      ax_slq.set_ylim(bottom=1e-5)
    ax_slq.set_title("Hessian eigenvalue density (SLQ, mean over seeds)")
    ax_slq.set_xlabel("eigenvalue")
    ax_slq.legend(fontsize=7)
    ax_slice.set_title("loss along a filter-normalized direction")
    ax_slice.set_xlabel("step (filter norms)")
    ax_slice.set_yscale("log")
    ax_slice.legend(fontsize=7)
  fig.suptitle(title)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main_full(args, base, seeds, record) -> list[dict[str, Any]]:
  """The claims sweep of RESULTS.md, per data set: search, then 5 seeds."""
  noises = [float(x) for x in args.noise.split(",")]
  datasets = args.sweep_datasets.split(",")
  variants = SWEEP_VARIANTS
  if args.small:
    variants = tuple(v for v in SWEEP_VARIANTS if v[0] in SMALL_SWEEP)
  log = print
  everything, all_cells = [], {}
  for dataset in datasets:
    dbase = dataclasses.replace(base, dataset=dataset, **SWEEP_DATA[dataset])
    if args.small:
      dbase = dataclasses.replace(dbase, **SMALL)
    blocks, cells = [], {}
    for noise in noises:
      search_seeds = (0,) if args.small else SEARCH_SEEDS
      chosen, search_lines = search(
        dbase, noise, search_seeds, args.cache, log, small=args.small
      )
      results = harness.run_all(
        sweep_runs(dbase, noise, seeds, chosen, variants), cache=args.cache, log=log
      )
      results = [derive(r) for r in results]
      cells[noise] = all_cells[dataset, noise] = results
      everything += results
      blocks.append(
        f"### {noise:.0%} label noise\n\n"
        "Validation search (accuracy in % on the held-out "
        f"{VAL_FRACTION:.0%} of the training set, mean of seeds "
        f"{', '.join(map(str, search_seeds))}; "
        "chosen in bold):\n\n"
        + "\n".join(search_lines)
        + "\n\n"
        + table(results, SWEEP_METRICS)
        + "\n\nThe claims (a − b on the same seeds; t: paired t statistic; a "
        "difference is called one when |t| exceeds Student's 5% two-sided value "
        f"for {len(seeds) - 1} degrees of freedom):\n\n" + claims_table(results)
      )
      save(
        results,
        args.output_dir,
        f"{dataset}_{dbase.model}_sweep_noise{int(round(100 * noise))}",
        f"{noise:.0%} label noise: {describe(dbase, seeds)}",
        {
          "base": dataclasses.asdict(dbase),
          "seeds": list(seeds),
          "label_noise": noise,
          "chosen": chosen,
          "search": search_lines,
        },
      )
    png = (
      args.output_dir if args.small else results_md.PATH.parent
    ) / f"generalization_{dataset}.png"
    plot_sweep(cells, png, sweep_title(dbase, seeds))
    text = "\n\n".join(blocks)
    print(text)
    n_test = cells[noises[0]][0]["num_test"]
    body = f"{sweep_recipe(dbase, seeds, n_test)}\n\n![{dataset}]({png.name})\n\n{text}"
    results_md.write(record, SECTION.format(dataset=DATASET_NAMES[dataset]), body)
  results_md.write(record, CLAIMS_SECTION, summary_section(all_cells, seeds))
  return everything


DATASET_NAMES = {"digits": "digits", "mnist1d": "MNIST-1D"}


def sweep_recipe(base: harness.RunConfig, seeds: Sequence[int], n_test: int) -> str:
  """The section's opening paragraph: what was trained and how it is compared."""
  data_text = {
    "digits": "scikit-learn's digits (1,348 training and 449 test 8x8 images; a "
    "seed also draws the train/test split), the MLP of "
    "`gnorm_optax.examples.models` (64-64 hidden)",
    "mnist1d": "MNIST-1D with the package's default settings (4,000 training and "
    "1,000 test signals of length 40; the published split, the same for every "
    "seed), the paper's 40-100-100-10 MLP",
  }[base.dataset]
  return (
    f"{data_text}, {base.epochs} epochs of batch {base.batch_size} "
    f"({base.epochs * (len_train(base) // base.batch_size):,} steps), learning "
    "rate cosine-decayed to 0. SGD-based methods: SGD with momentum "
    f"{base.momentum} with the gradient transform in front; F-GR/B-GR epsilon "
    f"{base.epsilon}; Adam-type methods with optax's defaults (AdamW weight "
    "decay 1e-4). Hyperparameters were chosen on a validation split (the last "
    f"{VAL_FRACTION:.0%} of the training set, with its noisy labels; the test "
    "set is not read), one stage after the other as listed: the SGD learning "
    "rate for every SGD-based method, SAM's rho for SAM and every GNP alpha "
    "(the alpha sweep is the claim under test, at SAM's rho), F-GR's gamma for "
    "F-GR, B-GR and exact GR (the paper compares them at equal gamma), the "
    "flood level, and one learning rate per Adam type shared with its AGR "
    "variant (AGR is a drop-in: the paper keeps the base optimizer's "
    f"settings). Seeds {', '.join(map(str, seeds))}: a seed fixes the label "
    "noise, the initial weights and the batch order, the same for every "
    "method; mean ± sample std over seeds, and paired differences per seed. "
    "Flatness on the first "
    f"{base.probe_size} training samples (noisy labels) after training, in "
    f"eval mode: λ1 and λ5, the top and fifth Hessian eigenvalues "
    f"(Lanczos, {harness.SPECTRUM['top_iters']} steps), tr H from the SLQ "
    f"density ({harness.SPECTRUM['slq_probes']} probes x "
    f"{harness.SPECTRUM['slq_iters']} steps), and the slice rise, the mean loss "
    "increase at ±0.5 along one filter-normalized random direction (Li et "
    f"al. 2018). Test set: {n_test} clean samples, one is "
    f"{100 / n_test:.2f} points. `s / run` is wall time at the load above."
  )


def sweep_title(base: harness.RunConfig, seeds: Sequence[int]) -> str:
  """The sweep plot's title."""
  return (
    f"{DATASET_NAMES[base.dataset]}: {base.model.upper()}, {base.epochs} epochs of "
    f"batch {base.batch_size}, hyperparameters from the validation search, seeds "
    + ", ".join(map(str, seeds))
  )


def len_train(base: harness.RunConfig) -> int:
  """Training-set size of ``base``'s data set (after ``train_size``)."""
  n = {"digits": 1348, "mnist1d": 4000}[base.dataset]
  return min(n, base.train_size or n)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command line; returns the runs' results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument(
    "--full",
    action="store_true",
    help="the RESULTS.md sweep: validation search, then 13 methods on digits "
    "and MNIST-1D, 0%% and 20%% noise, seeds 0-4",
  )
  parser.add_argument(
    "--sweep-datasets",
    default="digits,mnist1d",
    help="--full: the data sets of the sweep (default: %(default)s)",
  )
  parser.add_argument(
    "--seeds", default=None, help="comma-separated seeds (default: 0,1,2; --full: 0-4)"
  )
  parser.add_argument(
    "--epochs",
    type=int,
    default=BASE.epochs,
    help="epochs per run (default: %(default)s)",
  )
  parser.add_argument(
    "--dataset",
    default=BASE.dataset,
    choices=sorted(harness.DATASETS),
    help="data set (default: %(default)s)",
  )
  parser.add_argument(
    "--model",
    default=BASE.model,
    help="a model of gnorm_optax.examples.models (default: %(default)s)",
  )
  parser.add_argument(
    "--noise",
    default="0.0,0.2",
    help="--full: label-noise levels (default: %(default)s)",
  )
  parser.add_argument(
    "--output-dir",
    type=pathlib.Path,
    default=None,
    help="JSON and PNG go here (default: runs/generalization/, "
    "a temporary folder with --small)",
  )
  parser.add_argument(
    "--cache",
    type=pathlib.Path,
    default=None,
    help="JSON file of finished runs, reused when present",
  )
  args = parser.parse_args(argv)
  record = results_md.start(args, argv)
  base = dataclasses.replace(
    BASE, epochs=args.epochs, dataset=args.dataset, model=args.model
  )
  seeds = [0, 1, 2, 3, 4] if args.full else [0, 1, 2]
  if args.seeds:
    seeds = [int(s) for s in args.seeds.split(",")]
  if args.output_dir is None:
    args.output_dir = (
      pathlib.Path(tempfile.mkdtemp(prefix="generalization-small-"))
      if args.small
      else pathlib.Path("runs/generalization")
    )
  if not args.small:
    return (main_full if args.full else main_default)(args, base, seeds, record)
  # CI: both modes, tiny, every write path (JSON, PNG, the results section).
  base = dataclasses.replace(base, **SMALL)
  results = main_default(args, base, [0], record)
  args.noise, args.sweep_datasets = "0.2", "mnist1d"
  return results + main_full(args, base, [0, 1], record)


if __name__ == "__main__":
  main()
