"""AGR vs AdamW and Adan on digits: training speed and test accuracy, paired by seed.

Jiang et al. (2024, arXiv:2407.16944) report that adaptive gradient
regularization (AGR) in front of AdamW / Adan trains faster and generalizes
better. This trains the example's digits CNN on clean labels (label noise 0,
so the training loss can go low) with AdamW, AGR-AdamW, Adan and AGR-Adan;
within each pair everything is identical but the AGR transform: the same
cosine-decayed peak learning rate (the example's Adam default, 3e-3), optax's
default hyper-parameters (AdamW weight decay 1e-4, Adan 0), the same seed
(split, initial weights, batch order). The AGR optimizers come from the
example's `make_optimizer`; the plain ones are `optax.adamw` and `gx.adan`
(Adan as in its paper and official code, which `gx.agr_adan` puts AGR in
front of; `optax.adan` differs from it) with the same schedule. The loop is
the example's (`train_step`, `evaluate`, `flatness`), written out here to keep
every per-step loss.

Speed: the first epoch whose mean training loss (the example's `train_loss`)
is below each target, and the first step at which the mean of the last 21
steps (one epoch of batches) is below it. Generalization: final test accuracy
and the best test accuracy over epochs, plus the final full-batch gradient
norm and top Hessian eigenvalue.

Run:  python benchmarks/agr.py           (writes benchmarks/RESULTS.md)
      python benchmarks/agr.py --small   (CI: seconds, prints only)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from results_md import write_section  # noqa: E402

import gnorm_optax as gx  # noqa: E402
from gnorm_optax.examples import data  # noqa: E402
from gnorm_optax.examples.models import make_model  # noqa: E402
from gnorm_optax.examples.train import (  # noqa: E402
  TrainConfig,
  default_lr,
  evaluate,
  flatness,
  make_optimizer,
  mean_std,
  train_step,
)

SECTION = "## AGR vs AdamW and Adan"
PAIRS = (("adamw", "agr_adamw"), ("adan", "agr_adan"))
LABELS = {"adamw": "AdamW", "agr_adamw": "AGR-AdamW", "adan": "Adan",
          "agr_adan": "AGR-Adan"}
TARGETS = (0.1, 0.03)
# What the recorded run (default seeds) showed; written under the tables.
def optimizer_for(method, lr, steps):
  if method == "adamw":
    return optax.adamw(optax.cosine_decay_schedule(lr, decay_steps=steps))
  if method == "adan":
    return gx.adan(optax.cosine_decay_schedule(lr, decay_steps=steps))
  return make_optimizer(method, lr, steps)


def train(method, seed, cfg, lr):
  start = time.perf_counter()
  ds = data.load_dataset(cfg.dataset, label_noise=cfg.label_noise, seed=seed,
                         max_train=cfg.train_size, max_test=cfg.test_size)
  steps = cfg.epochs * (len(ds.x_train) // cfg.batch_size)
  model = make_model(cfg.model, seed, ds.x_train.shape[1:], data.NUM_CLASSES)
  optimizer = nnx.Optimizer(model, optimizer_for(method, lr, steps), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  step_losses, epoch_loss, test_acc = [], [], []
  for _ in range(cfg.epochs):
    model.train()
    losses = [train_step(model, optimizer, xb, yb) for xb, yb in
              data.iterate_batches(ds.x_train, ds.y_train, cfg.batch_size, rng)]
    losses = [float(v) for v in jax.device_get(losses)]
    step_losses += losses
    epoch_loss.append(float(np.mean(losses)))
    test_acc.append(evaluate(model, ds.x_test, ds.y_test))
  probe = slice(0, cfg.probe_size)
  diag = flatness(model, ds.x_train[probe], ds.y_train[probe],
                  key=jax.random.key(seed), hessian_iters=cfg.hessian_iters)
  per_epoch = len(ds.x_train) // cfg.batch_size
  r = {"method": method, "seed": seed, "epoch_loss": epoch_loss,
       "test_accuracy": test_acc, "final_test_accuracy": test_acc[-1],
       "best_test_accuracy": max(test_acc), "final_train_loss": epoch_loss[-1],
       **diag, "steps_per_epoch": per_epoch,
       "wall_time_s": time.perf_counter() - start}
  window = np.convolve(step_losses, np.ones(per_epoch) / per_epoch, mode="valid")
  for t in TARGETS:
    ep = next((i + 1 for i, v in enumerate(epoch_loss) if v < t), None)
    st = next((i + per_epoch for i, v in enumerate(window) if v < t), None)
    r[f"epoch_to_{t}"], r[f"step_to_{t}"] = ep, st
  return r


def fmt(values, spec, n_total):
  """mean ± std of the runs that reached it; '(k/n)' if not all did."""
  got = [v for v in values if v is not None]
  if not got:
    return f"not reached (0/{n_total})"
  s = mean_std(got)
  text = format(s["mean"], spec)
  if len(got) > 1:
    text += f" ± {format(s['std'], spec.lstrip('+'))}"
  if len(got) < n_total:
    text += f" ({len(got)}/{n_total} reached)"
  return text


def tables(results, methods, seeds, max_epoch):
  n = len(seeds)
  head = ["optimizer", *(f"epochs to loss < {t}" for t in TARGETS),
          *(f"steps to loss < {t} (1-epoch window)" for t in TARGETS),
          "final train loss", "final test acc", "best test acc", "grad norm",
          "top Hessian eig", "s / run"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for m in methods:
    runs = [results[(m, s)] for s in seeds]
    cells = [fmt([r[f"epoch_to_{t}"] for r in runs], ".1f", n) for t in TARGETS]
    cells += [fmt([r[f"step_to_{t}"] for r in runs], ".0f", n) for t in TARGETS]
    cells += [fmt([r["final_train_loss"] for r in runs], ".4f", n),
              fmt([r["final_test_accuracy"] for r in runs], ".3f", n),
              fmt([r["best_test_accuracy"] for r in runs], ".3f", n),
              fmt([r["grad_norm"] for r in runs], ".4f", n),
              fmt([r["hessian_top_eigenvalue"] for r in runs], ".2f", n),
              f"{np.mean([r['wall_time_s'] for r in runs]):.1f}"]
    lines.append("| " + " | ".join([LABELS[m], *cells]) + " |")
  # Paired (per seed) AGR − plain.
  plines = ["| pair | Δ epochs to loss < "
            + " | Δ epochs to loss < ".join(map(str, TARGETS))
            + " | Δ final test acc (pt) | AGR better / tie / worse (test acc)"
            " | largest relative gap of any epoch's train loss"
            " | largest test-acc gap on any epoch |",
            "|---|" + "---|" * (len(TARGETS) + 4)]
  for plain, agr in PAIRS:
    if plain not in methods or agr not in methods:
      continue
    cells = []
    for t in TARGETS:
      # an unreached target counts as max_epoch + 1 in the difference
      d = [(results[(agr, s)][f"epoch_to_{t}"] or max_epoch + 1)
           - (results[(plain, s)][f"epoch_to_{t}"] or max_epoch + 1) for s in seeds]
      cells.append(fmt(d, "+.1f", n) + f" (per seed {', '.join(f'{x:+d}' for x in d)})")
    d = [100 * (results[(agr, s)]["final_test_accuracy"]
                - results[(plain, s)]["final_test_accuracy"]) for s in seeds]
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

    gap = largest_gap("epoch_loss", relative=True)
    acc_gap = largest_gap("test_accuracy", relative=False)
    cells += [f"{100 * gap:.1f}%", f"{100 * acc_gap:.2f} pt"]
    plines.append(f"| {LABELS[agr]} − {LABELS[plain]} | " + " | ".join(cells) + " |")
  return (
      "\n".join(lines)
      + "\n\nPaired by seed, AGR minus plain (negative epochs = AGR faster):\n\n"
      + "\n".join(plines)
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true",
                      help="CI: 1 seed, 2 epochs, 200 samples, the AdamW pair; "
                      "prints only")
  parser.add_argument("--seeds", default="0,1,2,3,4")
  parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
  parser.add_argument("--no-write", action="store_true", help="print only")
  parser.add_argument("--cache", default=None,
                      help="JSON file of finished runs; reused when present")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  cfg = TrainConfig(epochs=args.epochs, label_noise=0.0)
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = [m for pair in PAIRS for m in pair]
  if args.small:
    cfg = TrainConfig(epochs=2, label_noise=0.0, train_size=200, test_size=200,
                      probe_size=128, hessian_iters=3)
    seeds = [0]
    methods = ["adamw", "agr_adamw"]
  lr = default_lr("agr_adamw")
  cache = pathlib.Path(args.cache) if args.cache else None
  done = json.loads(cache.read_text()) if cache and cache.exists() else {}
  results = {}
  total, i = len(seeds) * len(methods), 0
  for seed in seeds:
    for m in methods:
      i += 1
      key = f"{m}|{seed}"
      if key not in done:
        done[key] = train(m, seed, cfg, lr)
        if cache:
          cache.write_text(json.dumps(done))
      r = results[(m, seed)] = done[key]
      print(f"[{i}/{total}] {LABELS[m]} seed {seed}: epochs to <{TARGETS[0]} "
            f"{r[f'epoch_to_{TARGETS[0]}']}, to <{TARGETS[1]} "
            f"{r[f'epoch_to_{TARGETS[1]}']}, final loss {r['final_train_loss']:.4f}, "
            f"test acc {r['final_test_accuracy']:.3f}, {r['wall_time_s']:.1f} s",
            flush=True)
  text = tables(results, methods, seeds, cfg.epochs)
  print(text)
  print(f"total {time.perf_counter() - start:.1f} s")
  if args.small or args.no_write:
    return results
  section = (
      f"{SECTION}\n\n"
      f"jax {jax.__version__} on {jax.devices()[0].platform}. The example's digits "
      f"CNN on clean labels (label noise 0; 1,348 train / 449 test images), "
      f"{cfg.epochs} epochs of batch {cfg.batch_size}, the same cosine-decayed peak "
      f"learning rate {lr} (the example's default for `agr_*`) for all four "
      "optimizers, optax's defaults otherwise (AdamW weight decay 1e-4, Adan 0); "
      "AGR-AdamW / AGR-Adan are the example's `make_optimizer`, AdamW / Adan "
      "`optax.adamw` / `gx.adan` (the paper's Adan) with the same schedule. Seeds "
      f"{', '.join(map(str, seeds))} (a seed fixes the split, the initial weights and "
      "the batch order, the same within a pair); mean ± sample std over seeds. "
      "'Epochs to loss < t': first epoch whose mean training loss is below t; "
      "'steps to': first step at which the mean of the last epoch's worth of "
      "per-step losses is below t. Grad norm and top Hessian eigenvalue "
      f"(at most {cfg.hessian_iters} Lanczos steps): full-batch training loss on the "
      f"first {cfg.probe_size} training images after training.\n"
      "Command: `python benchmarks/agr.py`\n\n"
      f"{text}\n")
  write_section(SECTION, section)
  return results


if __name__ == "__main__":
  main()
