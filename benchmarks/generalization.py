"""Generalization on digits: flat-minima methods against SGD, paired by seed.

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

A seed fixes the split, the label noise, the initial weights and the batch
order, the same for every method, so the per-seed difference to SGD removes
the spread that all methods share. One test image is 0.22 points.

``--full`` is the benchmark sweep that writes its section of
``benchmarks/RESULTS.md``: SGD, SAM, GNP (alpha 0.8 and 0.5), forward and
backward finite-difference gradient regularization (F-GR, B-GR, gamma 0.05,
epsilon 0.01), exact GR and flooding (level 1.0 at 20% noise, 0.03 at 0%),
on 0% and 20% label noise, seeds 0-4, with the paired differences to SGD and
of GNP to SAM. ``--small`` (CI) runs both modes on a few hundred samples for
two epochs and writes the section to a temporary file.

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
BASE = harness.RunConfig()  # the README's setting; method and seed replaced
# The README's comparison: (label, method, alpha).
DEFAULT_VARIANTS = (
  ("SGD", "sgd", None),
  (f"SAM (rho {BASE.rho})", "sam", None),
  (f"GNP (rho {BASE.rho}, alpha {BASE.alpha})", "gnp", None),
)
# The --full sweep.
FULL_VARIANTS = (
  ("SGD", "sgd", None),
  ("SAM (GNP alpha=1)", "sam", None),
  ("GNP alpha=0.8", "gnp", 0.8),
  ("GNP alpha=0.5", "gnp", 0.5),
  ("F-GR (fdgr)", "fdgr", None),
  ("B-GR (bdgr)", "bdgr", None),
  ("GR (exact)", "gr", None),
  ("flooding", "flooding", None),
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
# --small: a few hundred samples, two epochs, a short Lanczos run.
SMALL = dict(
  model="mlp", epochs=2, train_size=200, test_size=200, probe_size=128, hessian_iters=3
)
SMALL_VARIANTS = ("SGD", "SAM (GNP alpha=1)", "GNP alpha=0.8", "F-GR (fdgr)")


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


def main_full(args, base, seeds, record) -> list[dict[str, Any]]:
  """The sweep of RESULTS.md: 8 variants, 0% and 20% label noise."""
  noises = [float(s) for s in args.noise.split(",")]
  variants = FULL_VARIANTS
  if args.small:  # one variant the default mode did not compile, and one pair
    variants = tuple(v for v in FULL_VARIANTS if v[0] in SMALL_VARIANTS)
  runs = [r for noise in noises for r in runs_for(variants, seeds, noise, base)]
  results = harness.run_all(runs, cache=args.cache)
  blocks = []
  for noise in noises:
    per = [r for r in results if r["config"]["label_noise"] == noise]
    level = FLOOD_LEVEL.get(noise, base.flood_level)
    blocks.append(
      f"### {noise:.0%} label noise (flooding level {level})\n\n" + table(per)
    )
    notes = pair_notes(
      per,
      [("GNP alpha=0.8", "SAM (GNP alpha=1)"), ("GNP alpha=0.5", "SAM (GNP alpha=1)")],
    )
    if notes:
      blocks.append(notes)
    save(
      per,
      args.output_dir,
      f"{base.dataset}_{base.model}_sweep_noise{int(round(100 * noise))}",
      f"{noise:.0%} label noise: {describe(base, seeds)}",
      {"base": dataclasses.asdict(base), "seeds": list(seeds), "label_noise": noise},
    )
  text = "\n\n".join(blocks)
  print(text)
  n_test = results[0]["num_test"]
  body = (
    f"The {base.dataset} {base.model.upper()} of `gnorm_optax.examples.models` "
    "trained by "
    f"`benchmarks/harness.py`: {base.epochs} epochs, batch {base.batch_size}, "
    f"SGD momentum {base.momentum}, lr cosine-decayed from "
    f"{harness.default_lr('sgd')}, rho {base.rho}, gamma {base.gamma}, epsilon "
    f"{base.epsilon}; flooding level 1.0 at 20% noise and 0.03 at 0%. Seeds "
    f"{', '.join(map(str, seeds))}: mean ± sample std over seeds. A seed fixes "
    "the split, the label noise, the initial weights and the batch order, the "
    "same for every method, so the paired difference to SGD (per seed, then "
    "mean ± std) and the wins/ties/losses against SGD are the sharper "
    "comparison. Train loss is on the (noisy) training labels; gradient norm "
    f"and top Hessian eigenvalue (at most {base.hessian_iters} Lanczos steps) "
    f"are of the full-batch training loss on the first {base.probe_size} "
    f"training images, in eval mode, after training. Test set: {n_test} clean "
    f"images, so one image is {100 / n_test:.2f} points. `s / run` is wall "
    "time on this "
    "machine at the load stated above, not a timing benchmark.\n\n" + text
  )
  results_md.write(record, SECTION.format(dataset=base.dataset), body)
  return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """Command line; returns the runs' results."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument(
    "--full",
    action="store_true",
    help="the RESULTS.md sweep: 8 variants, 0%% and 20%% noise, seeds 0-4",
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
  args.noise = "0.2"
  return results + main_full(args, base, [0, 1], record)


if __name__ == "__main__":
  main()
