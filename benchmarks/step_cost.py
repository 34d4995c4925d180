"""Step cost and memory of every transform, as ratios to a reference step.

For the example models (MLP, CNN, ResNet with BatchNorm; Flax NNX, split into
graphdef + params + the rest of the state, with a pure loss that discards the
BatchNorm updates) on random 8x8x1 digits-sized inputs, batch 128, it times
one jitted train step of each variant, interleaving the variants round by
round and taking the median of the per-round ratios after warm-up. It also
reads the compiled step's `memory_analysis()` (working memory, arguments,
outputs) in multiples of the parameters' bytes, and counts the convolutions
and dots in the compiled HLO, the evidence for why a ratio is what it is.
`every_k` is measured in `every_k_cost.py`, on the same models.

Run:  python benchmarks/step_cost.py              (writes benchmarks/RESULTS.md)
      python benchmarks/step_cost.py --small      (CI: MLP only; temp file)
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gnorm_optax as gx
from gnorm_optax.examples.models import make_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_md  # noqa: E402

SECTION = "## Step cost and memory"
LR, RHO, ALPHA, GAMMA, EPSILON = 0.05, 0.05, 0.8, 0.1, 0.01
BATCH, IN_SHAPE, NUM_CLASSES = 128, (8, 8, 1), 10

# name -> (reference name, target ratio or None). `None` reference: no row.
COMPARISONS = {
  "gx.sam": ("optax.contrib.sam (opaque)", 1.00),
  "penalized_grad": ("plain sgd", 2.05),
  "finite_difference_gr (forward)": ("plain sgd", 2.05),
  "finite_difference_gr (forward) ": ("gradient_regularization (exact)", 0.6),
  "gradient_regularization (exact)": ("plain sgd", None),
  "optax.contrib.sam (opaque)": ("plain sgd", None),
  "gx.sam ": ("plain sgd", None),
  "agr_adamw": ("optax.adamw", 1.02),
  "agr_adan": ("gx.adan", 1.02),
}
# Variants whose extra working memory should stay within one parameter copy.
ONE_COPY = ("gx.sam", "penalized_grad", "finite_difference_gr (forward)")


def variants():
  """name -> (transformation, takes_index_grad_fn)."""
  sgd = lambda: optax.sgd(LR)
  out = {
    "plain sgd": (sgd(), False),
    "gx.sam": (optax.chain(gx.sam(RHO), sgd()), False),
    "optax.contrib.sam (opaque)": (
      optax.contrib.sam(
        sgd(),
        optax.chain(optax.contrib.normalize(), optax.sgd(RHO)),
        sync_period=2,
        opaque_mode=True,
      ),
      True,
    ),
    "penalized_grad": (optax.chain(gx.penalized_grad(RHO, ALPHA), sgd()), False),
    "finite_difference_gr (forward)": (
      optax.chain(gx.finite_difference_gr(GAMMA, EPSILON), sgd()),
      False,
    ),
    "gradient_regularization (exact)": (
      optax.chain(gx.gradient_regularization(GAMMA), sgd()),
      False,
    ),
  }
  out["optax.adamw"] = (optax.adamw(1e-3), False)
  out["agr_adamw"] = (gx.agr_adamw(1e-3), False)
  # The paper's Adan (gx.adan), which gx.agr_adan puts AGR in front of.
  out["gx.adan"] = (gx.adan(1e-3), False)
  out["agr_adan"] = (gx.agr_adan(1e-3), False)
  return out


def make_step(model_name, tx, index_grad_fn):
  """A jitted step and its arguments (params, opt_state, rest, x, y)."""
  model = make_model(model_name, 0, IN_SHAPE, NUM_CLASSES)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, *IN_SHAPE)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH))

  def loss_fn(p, rest, x, y):
    # A copy of the model: BatchNorm's statistics updates go to it and are
    # discarded, the same in every variant.
    logits = nnx.merge(graphdef, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, s, rest, x, y):
    loss, g = jax.value_and_grad(loss_fn)(p, rest, x, y)
    grad = lambda q: jax.grad(loss_fn)(q, rest, x, y)
    grad_fn = (lambda q, i: grad(q)) if index_grad_fn else grad
    u, s = tx.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s, loss

  args = (params, tx.init(params), rest, x, y)
  return step, args


def nbytes(tree):
  return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def hlo_counts(text):
  """Convolutions and dots in the compiled HLO (all computations)."""
  count = lambda op: len(re.findall(rf"[ )]{op}\(", text))
  return {"conv": count("convolution"), "dot": count("dot")}


def analyse(step, args):
  """The compiled step, its memory (bytes; None where the backend does not
  say) and its HLO op counts."""
  compiled = jax.jit(step).lower(*args).compile()
  mem = None
  try:
    ma = compiled.memory_analysis()
  except Exception:  # noqa: BLE001 - some backends raise instead of returning None
    ma = None
  if ma is not None:
    mem = {
      f: getattr(ma, f"{f}_size_in_bytes", None)
      for f in ("temp", "argument", "output", "alias")
    }
  try:
    counts = hlo_counts(compiled.as_text())
  except Exception:  # noqa: BLE001
    counts = None
  return compiled, mem, counts


def measure(model_name, rounds, steps):
  """Per-variant median ms/step, per-round times, memory and HLO counts."""
  built, info = {}, {}
  for name, (tx, index_grad_fn) in variants().items():
    step, args = make_step(model_name, tx, index_grad_fn)
    # The compiled executable is what `jax.jit(step)` would run; timing it
    # directly saves compiling every variant twice.
    jstep, *info[name] = analyse(step, args)
    p, s, rest, x, y = args
    for _ in range(2):  # compile and warm up
      p, s, _ = jstep(p, s, rest, x, y)
    jax.block_until_ready(p)
    built[name] = [jstep, p, s, rest, x, y]
  param_bytes = nbytes(built["plain sgd"][1])
  times = {name: [] for name in built}
  for r in range(rounds):
    order = list(built) if r % 2 == 0 else list(reversed(built))
    for name in order:
      entry = built[name]
      jstep, p, s, rest, x, y = entry
      t0 = time.perf_counter()
      for _ in range(steps):
        p, s, _ = jstep(p, s, rest, x, y)
      jax.block_until_ready(p)
      times[name].append((time.perf_counter() - t0) / steps)
      entry[1], entry[2] = p, s
  return times, info, param_bytes


def fmt_mem(mem, key, param_bytes):
  if mem is None or mem.get(key) is None:
    return "n/a"
  return f"{mem[key] / param_bytes:.2f}"


def main(argv=None):
  """Command line: times and analyses every variant, writes the section."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  args = parser.parse_args(argv)
  record = results_md.start(args, argv)
  # model -> timed steps per round
  if args.small:
    models, rounds = {"mlp": 10}, 2
  else:
    models, rounds = {"mlp": 100, "cnn": 20, "resnet": 10}, 7
  time_rows, mem_rows, missed = [], [], []
  for model_name, n_steps in models.items():
    times, info, param_bytes = measure(model_name, rounds, n_steps)
    n_params = param_bytes // 4
    med = {n: float(np.median(t)) for n, t in times.items()}
    for name, (ref, target) in COMPARISONS.items():
      var = name.strip()
      ratios = np.asarray(times[var]) / np.asarray(times[ref])
      ratio = float(np.median(ratios))
      q1, q3 = np.percentile(ratios, [25, 75])
      met = "" if target is None else ("yes" if ratio <= target else "**no**")
      if met == "**no**":
        missed.append((model_name, var, ref, ratio, target))
      time_rows.append(
        f"| {model_name} ({n_params}) | {var} | {med[var] * 1e3:.2f} | "
        f"{ratio:.2f} ({q1:.2f}-{q3:.2f}) | {ref} ({med[ref] * 1e3:.2f} ms) | "
        f"{'' if target is None else f'<= {target:.2f}'} | {met} |"
      )
    plain_mem = info["plain sgd"][0]
    for name, (mem, counts) in info.items():
      extra = "n/a"
      if (
        mem
        and plain_mem
        and mem.get("temp") is not None
        and plain_mem.get("temp") is not None
      ):
        extra = f"{(mem['temp'] - plain_mem['temp']) / param_bytes:+.2f}"
      ok = ""
      if name in ONE_COPY and extra != "n/a":
        ok = "yes" if float(extra) <= 1.0 else "**no**"
      c = counts or {}
      mem_rows.append(
        f"| {model_name} | {name} | {fmt_mem(mem, 'temp', param_bytes)} | "
        f"{extra} | {ok} | {fmt_mem(mem, 'argument', param_bytes)} | "
        f"{fmt_mem(mem, 'output', param_bytes)} | {c.get('conv', '?')} | "
        f"{c.get('dot', '?')} |"
      )
  steps_desc = ", ".join(f"{m}: {n}" for m, n in models.items())
  lines = [
    f"Example models of `gnorm_optax/examples/models.py` on random "
    f"{IN_SHAPE[0]}x{IN_SHAPE[1]}x{IN_SHAPE[2]} inputs, batch {BATCH}; params "
    "split out with `nnx.split(model, nnx.Param, ...)` and a pure loss on "
    "`nnx.merge` (BatchNorm in training mode, its statistics updates "
    f"discarded in every variant). Median over {rounds} interleaved rounds "
    f"(order alternating) of jitted steps ({steps_desc} steps a round) after "
    "warm-up; the ratio is the median of the per-round ratios, quartiles in "
    "brackets. `every_k` is measured in its own section (`every_k_cost.py`).",
    "",
    f"Hyperparameters: lr {LR}, rho {RHO}, alpha {ALPHA} (penalized_grad), "
    f"gamma {GAMMA}, epsilon {EPSILON}; `optax.contrib.sam(sgd(lr), "
    f"chain(normalize(), sgd(rho)), sync_period=2, opaque_mode=True)` does "
    "the same work as `chain(gx.sam(rho), sgd(lr))`: one extra gradient a "
    "step.",
    "",
    "| model (params) | variant | ms / step | ratio (quartiles) | compared to "
    "| target | met? |",
    "|---|---|---|---|---|---|---|",
    *time_rows,
    "",
    "Compiled memory (`jax.jit(step).lower(...).compile().memory_analysis()`) "
    "in multiples of the parameters' bytes; `extra temp` is the working "
    "memory beyond the plain SGD step's (target for GNP / SAM / F-GR: at "
    "most one extra copy). Arguments and outputs include the optimizer "
    "state, the batch and the BatchNorm statistics. conv / dot: "
    "`convolution` and `dot` ops in the compiled HLO (all "
    "computations, fused ones included).",
    "",
    "| model | variant | temp | extra temp | <= 1 copy? | arguments | outputs "
    "| conv | dot |",
    "|---|---|---|---|---|---|---|---|---|",
    *mem_rows,
    "",
  ]
  if missed:
    lines.append(
      "Missed targets in this run: "
      + "; ".join(
        f"{m} {v} / {r} = {x:.2f} (target {t:.2f})" for m, v, r, x, t in missed
      )
      + "."
    )
    lines.append("")
  text = "\n".join(lines)
  print(text)
  results_md.write(record, SECTION, text)


if __name__ == "__main__":
  main()
