"""AGR vs AdamW and Adan on digits: training speed and test accuracy, paired by seed.

Jiang et al. (2024, arXiv:2407.16944) report that adaptive gradient
regularization (AGR) in front of AdamW / Adan trains faster and generalizes
better. This trains the digits CNN on clean labels (label noise 0, so the
training loss can go low) with AdamW, AGR-AdamW, Adan and AGR-Adan through
`benchmarks/harness.py`; within each pair everything is identical but the AGR
transform: the same cosine-decayed peak learning rate (3e-3, the harness's
default for Adam-type methods), optax's default hyper-parameters (AdamW
weight decay 1e-4, Adan 0), the same seed (split, initial weights, batch
order). AdamW is `optax.adamw`, AGR-AdamW `gx.agr_adamw`; Adan is `gx.adan`
(Adan as in its paper and official code; `optax.adan` differs from it), which
`gx.agr_adan` puts AGR in front of.

Speed: the first epoch whose mean training loss is below each target, and
the first step at which the mean of the last epoch's worth of per-step losses
is below it. Generalization: final test accuracy and the best test accuracy
over epochs, plus the final full-batch gradient norm and top Hessian
eigenvalue.

Run:  python benchmarks/agr.py           (writes benchmarks/RESULTS.md)
      python benchmarks/agr.py --small   (CI: seconds, writes a temp file)
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
import results_md  # noqa: E402

SECTION = "## AGR vs AdamW and Adan"
PAIRS = (("adamw", "agr_adamw"), ("adan", "agr_adan"))
LABELS = {
  "adamw": "AdamW",
  "agr_adamw": "AGR-AdamW",
  "adan": "Adan",
  "agr_adan": "AGR-Adan",
}
TARGETS = (0.1, 0.03)
BASE = harness.RunConfig(label_noise=0.0)


def speed(r):
  """``r`` with the epoch and step at which each training-loss target is met."""
  per_epoch = r["steps_per_epoch"]
  window = np.convolve(r["step_loss"], np.ones(per_epoch) / per_epoch, mode="valid")
  out = dict(r)
  for t in TARGETS:
    out[f"epoch_to_{t}"] = next(
      (i + 1 for i, v in enumerate(r["train_loss"]) if v is not None and v < t), None
    )
    out[f"step_to_{t}"] = next(
      (i + per_epoch for i, v in enumerate(window) if v < t), None
    )
  return out


def fmt(values, spec, n_total):
  """mean ± std of the runs that reached it; '(k/n)' if not all did."""
  got = [v for v in values if v is not None]
  if not got:
    return f"not reached (0/{n_total})"
  s = harness.mean_std(got)
  text = format(s["mean"], spec)
  if len(got) > 1:
    text += f" ± {format(s['std'], spec.lstrip('+'))}"
  if len(got) < n_total:
    text += f" ({len(got)}/{n_total} reached)"
  return text


def tables(results, methods, seeds, max_epoch):
  """Markdown: one row per optimizer, then the paired AGR − plain table."""
  n = len(seeds)
  head = [
    "optimizer",
    *(f"epochs to loss < {t}" for t in TARGETS),
    *(f"steps to loss < {t} (1-epoch window)" for t in TARGETS),
    "final train loss",
    "final test acc",
    "best test acc",
    "grad norm",
    "top Hessian eig",
    "s / run",
  ]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in methods:
    runs = [results[(m, s)] for s in seeds]
    cells = [fmt([r[f"epoch_to_{t}"] for r in runs], ".1f", n) for t in TARGETS]
    cells += [fmt([r[f"step_to_{t}"] for r in runs], ".0f", n) for t in TARGETS]
    cells += [
      fmt([r["final_train_loss"] for r in runs], ".4f", n),
      fmt([r["final_test_accuracy"] for r in runs], ".3f", n),
      fmt([r["best_test_accuracy"] for r in runs], ".3f", n),
      fmt([r["grad_norm"] for r in runs], ".4f", n),
      fmt([r["hessian_top_eigenvalue"] for r in runs], ".2f", n),
      f"{np.mean([r['wall_time_s'] for r in runs]):.1f}",
    ]
    lines.append("| " + " | ".join([LABELS[m], *cells]) + " |")
  # Paired (per seed) AGR − plain.
  plines = [
    "| pair | Δ epochs to loss < "
    + " | Δ epochs to loss < ".join(map(str, TARGETS))
    + " | Δ final test acc (pt) | AGR better / tie / worse (test acc)"
    " | largest relative gap of any epoch's train loss"
    " | largest test-acc gap on any epoch |",
    "|---|" + "---|" * (len(TARGETS) + 4),
  ]
  for plain, agr in PAIRS:
    if plain not in methods or agr not in methods:
      continue
    cells = []
    for t in TARGETS:
      # an unreached target counts as max_epoch + 1 in the difference
      d = [
        (results[(agr, s)][f"epoch_to_{t}"] or max_epoch + 1)
        - (results[(plain, s)][f"epoch_to_{t}"] or max_epoch + 1)
        for s in seeds
      ]
      cells.append(fmt(d, "+.1f", n) + f" (per seed {', '.join(f'{x:+d}' for x in d)})")
    d = [
      100
      * (
        results[(agr, s)]["final_test_accuracy"]
        - results[(plain, s)]["final_test_accuracy"]
      )
      for s in seeds
    ]
    per_seed = ", ".join(f"{x:+.1f}" for x in d)
    cells.append(fmt(d, "+.2f", n) + f" (per seed {per_seed})")
    d = np.array(d)
    better, worse = (d > 1e-9).sum(), (d < -1e-9).sum()
    cells.append(f"{better} / {len(d) - better - worse} / {worse}")

    def largest_gap(key, relative, agr=agr, plain=plain):
      gaps = []
      for s in seeds:
        a = np.array(results[(agr, s)][key])
        b = np.array(results[(plain, s)][key])
        gaps.append(np.max(np.abs(a - b) / (b if relative else 1.0)))
      return float(max(gaps))

    gap = largest_gap("train_loss", relative=True)
    acc_gap = largest_gap("test_accuracy", relative=False)
    cells += [f"{100 * gap:.1f}%", f"{100 * acc_gap:.2f} pt"]
    plines.append(f"| {LABELS[agr]} − {LABELS[plain]} | " + " | ".join(cells) + " |")
  return (
    "\n".join(lines)
    + "\n\nPaired by seed, AGR minus plain (negative epochs = AGR faster):\n\n"
    + "\n".join(plines)
  )


def main(argv=None):
  """Command line: trains every (optimizer, seed), prints and writes the tables."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--epochs", type=int, default=BASE.epochs)
  parser.add_argument(
    "--cache",
    type=pathlib.Path,
    default=None,
    help="JSON file of finished runs; reused when present",
  )
  args = parser.parse_args(argv)
  record = results_md.start(args, argv)
  cfg = dataclasses.replace(BASE, epochs=args.epochs)
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = [m for pair in PAIRS for m in pair]
  if args.small:  # both pairs, two seeds, so that every table cell is computed
    cfg = dataclasses.replace(
      cfg,
      model="mlp",
      epochs=2,
      train_size=200,
      test_size=200,
      probe_size=128,
      hessian_iters=3,
    )
    seeds = [0, 1]
  runs = [
    (LABELS[m], dataclasses.replace(cfg, method=m, seed=s))
    for s in seeds
    for m in methods
  ]
  results = {
    (r["config"]["method"], r["config"]["seed"]): speed(r)
    for r in harness.run_all(runs, cache=args.cache)
  }
  text = tables(results, methods, seeds, cfg.epochs)
  print(text)
  first = results[(methods[0], seeds[0])]
  body = (
    f"The digits {cfg.model.upper()} on clean labels (label noise 0; "
    f"{first['num_train']:,} train / {first['num_test']:,} test images), "
    f"{cfg.epochs} epochs of batch {cfg.batch_size}, the "
    f"same cosine-decayed peak learning rate {harness.default_lr('adamw')} for "
    "all four optimizers, optax's defaults otherwise (AdamW weight decay 1e-4, "
    "Adan 0); AdamW / AGR-AdamW are `optax.adamw` / `gx.agr_adamw`, Adan / "
    "AGR-Adan `gx.adan` (the paper's Adan) / `gx.agr_adan`, with the same "
    f"schedule. Seeds {', '.join(map(str, seeds))} (a seed fixes the split, the "
    "initial weights and the batch order, the same within a pair); mean ± "
    "sample std over seeds. 'Epochs to loss < t': first epoch whose mean "
    "training loss is below t; 'steps to': first step at which the mean of the "
    "last epoch's worth of per-step losses is below t. Grad norm and top "
    f"Hessian eigenvalue (at most {cfg.hessian_iters} Lanczos steps): "
    f"full-batch training loss on the first {cfg.probe_size} training images "
    "after training. `s / run` is wall time at the load stated above.\n\n" + text
  )
  results_md.write(record, SECTION, body)
  return results


if __name__ == "__main__":
  main()
