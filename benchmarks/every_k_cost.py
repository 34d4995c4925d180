"""Step cost of `every_k`: ratios to the plain optimizer's step, side by side.

The one home of the every_k measurement. For the example models `mlp` and
`cnn` of `gnorm_optax.examples.models` (Flax NNX, split into graphdef +
params + the rest of the state, with a pure loss) on random 8x8x1
digits-sized inputs, batch 128, it times one jitted train step of plain SGD,
SAM every step, and SAM with every_k = 2, 5, 10, interleaving the variants
round by round and taking the median of the rounds after warm-up. It also
times every_k=5 with the XLA:CPU convolution workaround switched off
(`gnorm_optax._src.canonical_conv.enabled = False` while the step is
compiled), to show what the workaround buys, pins the step count to time one
skipped and one refresh step, and counts real `grad_fn` executions.

Run:  python benchmarks/every_k_cost.py            (writes benchmarks/RESULTS.md)
      python benchmarks/every_k_cost.py --small    (CI: seconds, temp file)
"""

from __future__ import annotations

import argparse
import contextlib
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import gnorm_optax as gx
from gnorm_optax._src import canonical_conv
from gnorm_optax.examples.models import count_params
from gnorm_optax.examples.models import make_model

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results_md  # noqa: E402

SECTION = "## every_k: step time relative to plain SGD"
BATCH, IN_SHAPE, NUM_CLASSES = 128, (8, 8, 1), 10


def make_step(model_name, tx, count_calls=False):
  """A compiled step ``(params, opt_state) -> (params, opt_state, loss)``.

  The step is compiled here, so ``canonical_conv.enabled`` at the time of the
  call is the one it keeps.
  """
  model = make_model(model_name, 0, IN_SHAPE, NUM_CLASSES)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  params, rest = nnx.as_pure(params), nnx.as_pure(rest)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, *IN_SHAPE)), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, BATCH))
  calls = []

  def loss_fn(p):
    logits = nnx.merge(graphdef, p, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def grad_fn(p):
    if count_calls:  # a host callback: only in the counting run, never timed
      jax.debug.callback(lambda: calls.append(1))
    return jax.grad(loss_fn)(p)

  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p, grad_fn=grad_fn)
    return optax.apply_updates(p, u), s, loss

  state = tx.init(params)
  compiled = jax.jit(step).lower(params, state).compile()
  return compiled, params, state, calls, count_params(model)


@contextlib.contextmanager
def without_cpu_workaround():
  """Turns the canonical-convolution rewrite off for the steps compiled inside."""
  saved = canonical_conv.enabled
  canonical_conv.enabled = False
  try:
    yield
  finally:
    canonical_conv.enabled = saved


def variants(lr=0.05):
  sgd = lambda: optax.sgd(lr, momentum=0.9)
  out = {
    "plain sgd": optax.sgd(lr, momentum=0.9),
    "sam": optax.chain(gx.sam(0.05), sgd()),
  }
  for k in (2, 5, 10):
    out[f"sam every_k={k}"] = optax.chain(gx.sam(0.05, every_k=k), sgd())
  out["sam every_k=5, no CPU workaround"] = optax.chain(gx.sam(0.05, every_k=5), sgd())
  # The same step with the count pinned: what one skipped / one refresh step costs.
  out[PINNED_SKIP] = optax.chain(gx.sam(0.05, every_k=10), sgd())
  out[PINNED_REFRESH] = optax.chain(gx.sam(0.05, every_k=10), sgd())
  return out


PINNED_SKIP = "sam every_k=10, a skipped step"
PINNED_REFRESH = "sam every_k=10, a refresh step"


def pin_count(state, count):
  """`state` of chain(sam, sgd) with the sam count set to `count`."""
  return (state[0]._replace(count=jnp.asarray(count, jnp.int32)), *state[1:])


def count_executions(model_name, tx, steps):
  """Real executions of grad_fn over `steps` jitted steps."""
  step, p, s, calls, _ = make_step(model_name, tx, count_calls=True)
  for _ in range(steps):
    p, s, _ = step(p, s)
  jax.block_until_ready(p)
  jax.effects_barrier()
  return len(calls)


def measure(model_name, rounds, steps_per_round):
  """Median seconds per step of each variant (rounds interleaved), grad_fn
  executions per round, and the model's parameter count."""
  built, executions = {}, {}
  for name, tx in variants().items():
    ctx = without_cpu_workaround() if "no CPU" in name else contextlib.nullcontext()
    with ctx:
      step, p, s, _, num_params = make_step(model_name, tx)
    for _ in range(3):  # warm up
      p, s, _ = step(p, s)
    jax.block_until_ready(p)
    if name in (PINNED_SKIP, PINNED_REFRESH):
      s = pin_count(s, 1 if name == PINNED_SKIP else 0)
      executions[name] = steps_per_round if name == PINNED_REFRESH else 0
    else:
      executions[name] = count_executions(model_name, tx, steps_per_round)
    built[name] = [step, p, s]
  times = {name: [] for name in built}
  for _ in range(rounds):
    for name, entry in built.items():
      step, p, s = entry
      t0 = time.perf_counter()
      pinned = name in (PINNED_SKIP, PINNED_REFRESH)
      for _ in range(steps_per_round):
        p, s_next, _ = step(p, s)
        s = s if pinned else s_next
      jax.block_until_ready(p)
      times[name].append((time.perf_counter() - t0) / steps_per_round)
      entry[1], entry[2] = p, s
  return {n: float(np.median(t)) for n, t in times.items()}, executions, num_params


def target(name):
  if name in (PINNED_SKIP, PINNED_REFRESH):
    return ""
  if name.startswith("sam every_k=") and "no CPU" not in name:
    k = int(name.split("=")[1])
    return f"<= {1.05 * (1 + 1 / k):.2f}"
  return {"sam": "<= 2.05", "plain sgd": "1"}.get(name, "")


def main(argv=None):
  """Command line: times every variant on both models, writes the section."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  results_md.add_arguments(parser)
  args = parser.parse_args(argv)
  record = results_md.start(args, argv)
  rounds, steps = (2, 5) if args.small else (9, 40)
  lines = [
    f"Median of {rounds} interleaved rounds of {steps} jitted steps after "
    f"warm-up; batch {BATCH} of {IN_SHAPE[0]}x{IN_SHAPE[1]}x{IN_SHAPE[2]} "
    "random inputs; the example models `mlp` and `cnn` of "
    "`gnorm_optax.examples.models` (the same as in `multi_device.py`; "
    "`scaling.py` measures every_k at other model sizes and under "
    "`jax.vmap`); `chain(gx.sam(0.05, every_k=k), sgd(0.05, "
    "momentum=0.9))`. Target for every_k: `1.05 * (1 + 1/k)`.",
    "",
    "| model (params) | variant | ms / step | ratio to plain | target | grad_fn "
    f"runs per {steps} steps |",
    "|---|---|---|---|---|---|",
  ]
  for model_name in ("mlp", "cnn"):
    times, executions, num_params = measure(model_name, rounds, steps)
    for name, t in times.items():
      lines.append(
        f"| {model_name} ({num_params}) | {name} | {t * 1e3:.2f} | "
        f"{t / times['plain sgd']:.2f} | {target(name)} | {executions[name]} |"
      )
  lines += [
    "",
    "The last two rows of a model pin the step count, so every step is a "
    "skipped one (the cached correction is reused) or a refresh (the extra "
    "gradient inside `lax.cond`); a k-step cycle costs about (k - 1) skipped "
    "steps and one refresh. The `no CPU workaround` row is `every_k=5` "
    "compiled with `gnorm_optax._src.canonical_conv.enabled = False`: on "
    "XLA:CPU the convolutions inside the `cond` then run on its slow path "
    "(the MLP has no convolution, so there it changes nothing).",
  ]
  text = "\n".join(lines)
  print(text)
  results_md.write(record, SECTION, text)


if __name__ == "__main__":
  main()
