"""Keeps convolutions fast inside `lax.cond` on XLA:CPU (used by `every_k`).

Why this exists. `every_k > 1` computes the extra gradient inside
`jax.lax.cond`, so that the skipped steps really skip it. On XLA:CPU a
convolution is run by the fast Eigen kernel only when its dimension numbers are
canonical (input NHWC, kernel HWIO, output NHWC). The backward pass of a conv
net contains non-canonical convolutions (the kernel gradient is a convolution
with `f01b_i01o->01bf` layout), and XLA:CPU's `ConvCanonicalization` pass, which
inserts the transposes that make them canonical, only visits the *entry*
computation (`xla/service/cpu/conv_canonicalization.cc`:
`module->entry_computation()->MakeInstructionPostOrder()`). Inside a `cond`
branch or `while` body the convolution falls back to a naive loop emitter:
measured on 2 CPU cores, the gradient of a small CNN took 3.7 ms outside a cond
and 46 ms inside it. A `while_loop` with a 0/1 trip count fails the same way
(and XLA hoists a loop-invariant gradient out of the loop, so nothing is
saved), and no XLA flag in jaxlib 0.10 changes it.

The mechanism. The branch function is traced to a jaxpr and re-evaluated with
every non-canonical `conv_general_dilated` replaced by transposes around a
canonical convolution: the same arithmetic, the form XLA:CPU's fast kernel
takes anywhere. `jit` sub-jaxprs are inlined so that convolutions inside them
are reached; other higher-order primitives (scan, while, remat) are bound
unchanged. With it, the refreshed step inside the cond took 3.5 ms, as fast as
outside.

When it applies. `for_xla_cpu` decides at trace time: when JAX's default
backend is not CPU (GPU, TPU) the branch is traced and compiled as written and
the jaxpr interpreter never runs. On a CPU backend the rewrite is selected by
`lax.platform_dependent`, so a step traced on a CPU host but lowered for
another platform still gets the plain branch there. If the rewrite raises (a
primitive it cannot re-bind, a future JAX internal change), the plain branch is
used and a warning says so: slower on CPU, never wrong. Set the module-level
switch `enabled = False` before a step is traced to turn the rewrite off (the
`every_k` benchmark measures the difference that way).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.extend.core import primitives as jex_prims

# Read at trace time by `for_xla_cpu`: False compiles every branch as written.
enabled = True


def _canonical_dimension_numbers(num_spatial: int) -> jax.lax.ConvDimensionNumbers:
  n = num_spatial
  nhwc = (0, n + 1, *range(1, n + 1))
  hwio = (n + 1, n, *range(n))
  return jax.lax.ConvDimensionNumbers(nhwc, hwio, nhwc)


def _conv(lhs, rhs, *, dimension_numbers, **params):
  """`conv_general_dilated` with canonical layouts (same values)."""
  lhs_spec, rhs_spec, out_spec = dimension_numbers
  canonical = _canonical_dimension_numbers(len(lhs_spec) - 2)
  if params["batch_group_count"] != 1 or tuple(dimension_numbers) == tuple(canonical):
    return jex_prims.conv_general_dilated_p.bind(
      lhs, rhs, dimension_numbers=dimension_numbers, **params
    )
  lhs = jnp.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
  rhs = jnp.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
  out = jex_prims.conv_general_dilated_p.bind(
    lhs, rhs, dimension_numbers=canonical, **params
  )
  out_order = (out_spec[0], *out_spec[2:], out_spec[1])
  return jnp.transpose(out, tuple(int(i) for i in np.argsort(out_order)))


def _eval_jaxpr(jaxpr: jex_core.Jaxpr, consts: list[Any], *args: Any) -> list[Any]:
  env: dict[Any, Any] = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts, strict=True))
  env.update(zip(jaxpr.invars, args, strict=True))
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if eqn.primitive is jex_prims.conv_general_dilated_p:
      outs = [_conv(*invals, **eqn.params)]
    elif eqn.primitive is jex_prims.jit_p:
      sub = eqn.params["jaxpr"]
      outs = _eval_jaxpr(sub.jaxpr, sub.consts, *invals)
    else:
      with eqn.ctx.manager:
        outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
      if not eqn.primitive.multiple_results:
        outs = [outs]
    for v, x in zip(eqn.outvars, outs, strict=True):
      if not isinstance(v, jex_core.DropVar):
        env[v] = x
  return [read(v) for v in jaxpr.outvars]


def canonicalize_convolutions(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Returns `fn` with its convolutions in canonical (NHWC/HWIO) layout."""

  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    outs = _eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

  return wrapped


def _or_plain(fast: Callable[..., Any], fn: Callable[..., Any]):
  """`fast`, or `fn` with a warning if tracing `fast` raises.

  An error that `fn` raises too (a user's grad_fn returning the wrong tree)
  is raised as `fn` raises it, without the warning.
  """

  def wrapped(*args):
    try:
      return fast(*args)
    except Exception as e:  # noqa: BLE001 -- any failure means: use the plain branch.
      out = fn(*args)
      warnings.warn(
        "gnorm_optax: the CPU convolution rewrite for every_k failed "
        f"({type(e).__name__}: {e}); using the plain branch, which is correct "
        "but slower on XLA:CPU. Please report this with your JAX version.",
        RuntimeWarning,
        stacklevel=2,
      )
      return out

  return wrapped


def for_xla_cpu(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn`, with canonical convolutions when it is compiled for XLA:CPU.

  Decided when the returned function is traced: with `enabled` False or a
  default backend other than CPU it is `fn` itself; otherwise
  `lax.platform_dependent` picks the rewritten branch on CPU and `fn` on any
  other platform. A rewrite that fails falls back to `fn` with a warning.

  Args:
    fn: the function to compile, e.g. a `lax.cond` branch.

  Returns:
    A function with `fn`'s signature and values.
  """
  fast = _or_plain(canonicalize_convolutions(fn), fn)

  def wrapped(*args):
    if not enabled or jax.default_backend() != "cpu":
      return fn(*args)
    return jax.lax.platform_dependent(*args, cpu=fast, default=fn)

  return wrapped
