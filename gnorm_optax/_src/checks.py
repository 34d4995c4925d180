"""Checks of the transforms' arguments, done when they are built or traced.

Constants are checked when a transform is built (`check_scalar`,
`check_every_k`, `check_choice`); trees when `update` is traced
(`check_same_tree`, `check_full_tree`, `check_state_matches`,
`check_not_reduced`, `check_not_chained`), so that the checks cost nothing in
the compiled step. Traced values are never checked: a value known only inside
`jit` cannot raise a Python error.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gnorm_optax._src.tree_math import compute_dtype
from gnorm_optax._src.tree_math import same_structure
from gnorm_optax._src.tree_math import varying_axes

Updates = Any
Params = Any


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def check_scalar(
  name: str,
  value: Any,
  *,
  minimum: float | None = None,
  strict: bool = False,
  fix: str = "",
  owner: str = "",
) -> None:
  """Checks a numeric hyperparameter given as a constant.

  `owner` names the transform in the message for an optimizer passed where a
  number belongs (`gx.sam(optax.adam(1e-3))`, the optax.contrib.sam habit).

  Schedules (callables) and traced values (e.g. under
  `optax.inject_hyperparams` inside `jit`) are accepted as they are.

  Raises:
    TypeError: if `value` is neither a number, a scalar array nor a schedule.
    ValueError: if it is NaN/inf, not a scalar, or below `minimum`.
  """
  if isinstance(value, optax.GradientTransformation):
    owner = owner or "sam"
    raise TypeError(
      f"{name} must be a number or a schedule, got an optax optimizer. "
      f"gx.{owner} is not a wrapper around the optimizer (as "
      "optax.contrib.sam is): it transforms the gradient, so chain it in "
      f"front of the optimizer:\n    optax.chain(gx.{owner}(...), optimizer)"
    )
  if callable(value) or _is_traced(value):
    return
  if isinstance(value, (str, bytes, bool)) or not isinstance(
    value, (numbers.Real, np.ndarray, np.generic, jax.Array)
  ):
    raise TypeError(
      f"{name} must be a number or a schedule (a callable of the step "
      f"count), got {value!r} of type {type(value).__name__}"
    )
  shape = getattr(value, "shape", ())  # a Python number has none
  if shape != ():
    raise ValueError(f"{name} must be a scalar, got shape {shape}")
  v = float(value)
  if not math.isfinite(v):
    raise ValueError(f"{name} must be finite, got {v}")
  if minimum is not None and (v <= minimum if strict else v < minimum):
    rule = ">" if strict else ">="
    msg = f"{name} must be {rule} {minimum}, got {v}"
    raise ValueError(f"{msg}; {fix}" if fix else msg)


def check_every_k(every_k: Any) -> int | None:
  """Validates `every_k`; returns it as an int, or None when it is traced."""
  if _is_traced(every_k):
    return None
  if isinstance(every_k, (bool, float, str)) or np.ndim(every_k) != 0:
    raise TypeError(f"every_k must be an integer >= 1, got {every_k!r}")
  try:
    k = int(every_k)
  except (TypeError, ValueError):
    raise TypeError(f"every_k must be an integer >= 1, got {every_k!r}") from None
  if k != every_k or k < 1:
    raise ValueError(
      f"every_k must be an integer >= 1, got {every_k!r}; use every_k=1 to "
      "compute the extra gradient on every step"
    )
  return k


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
  """Raises a ValueError listing `choices` when `value` is not one of them."""
  if value not in choices:
    raise ValueError(
      f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}"
    )


def check_same_tree(
  name: str, tree: Any, params: Any, fix: str, *, dtypes: bool = True
) -> None:
  """Raises a ValueError when `tree` differs from `params` in structure, shape
  or (with `dtypes`) dtype; checked at trace time, free in the jitted step."""
  if not same_structure(tree, params):
    raise ValueError(
      f"{name} returned a tree of another structure than params:\n"
      f"  got     {jax.tree.structure(tree)}\n"
      f"  params  {jax.tree.structure(params)}\n{fix}"
    )
  for (path, x), p in zip(
    jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params), strict=True
  ):
    dtype_differs = dtypes and jnp.result_type(x) != jnp.result_type(p)
    if jnp.shape(x) != jnp.shape(p) or dtype_differs:
      raise ValueError(
        f"{name} returned {jnp.result_type(x).name}{list(jnp.shape(x))} at "
        f"{jax.tree_util.keystr(path)}, where params has "
        f"{jnp.result_type(p).name}{list(jnp.shape(p))}; {fix}"
      )


def masked_node_paths(tree: Any) -> list[str]:
  """Paths of the `optax.MaskedNode` leaves of `tree` (none outside `masked`)."""

  def is_masked(x):
    return isinstance(x, optax.MaskedNode)

  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_masked)
  return [jax.tree_util.keystr(path) for path, x in leaves if is_masked(x)]


def check_full_tree(name: str, tree: Any, what: str) -> None:
  """Raises a ValueError when `tree` is the partial tree of `optax.masked`.

  `optax.masked` and `optax.partition` hand their inner transformation a tree
  in which the other parameters are `optax.MaskedNode`s; a perturbation of
  part of the tree cannot be passed to the user's `grad_fn`, which takes all of
  the parameters.
  """
  paths = masked_node_paths(tree)
  if paths:
    shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
    raise ValueError(
      f"{name} needs the full parameter tree, but its {what} has "
      f"optax.MaskedNode leaves at {shown}: it is inside optax.masked or "
      "optax.partition, which pass only part of the tree, while grad_fn "
      "takes (and the perturbation moves) all of the parameters. Put "
      f"{name} outside, first in the chain, and mask the base optimizer "
      f"instead, e.g. optax.chain(gx.{name}(...), optax.masked(optax.sgd("
      "0.1), mask))"
    )


def check_state_matches(name: str, correction: Updates, params: Params) -> None:
  """Raises a ValueError when `params` is not the tree the state was built for.

  Only a state with an `every_k` cache records that tree; it is compared at
  trace time (free in the jitted step).
  """
  fix = (
    "re-run tx.init(params) for these params (the state was built by "
    "tx.init for another parameter tree, e.g. before the model changed), or "
    "restore the optimizer state saved with them"
  )
  if not same_structure(correction, params):
    raise ValueError(
      f"{name}: params has another structure than the params the "
      f"optimizer state (its every_k cache) was built for:\n"
      f"  params  {jax.tree.structure(params)}\n"
      f"  state   {jax.tree.structure(correction)}\n{fix}"
    )
  for (path, c), p in zip(
    jax.tree_util.tree_leaves_with_path(correction),
    jax.tree.leaves(params),
    strict=True,
  ):
    want = compute_dtype(jnp.result_type(p))
    if jnp.shape(c) != jnp.shape(p) or jnp.result_type(c) != want:
      raise ValueError(
        f"{name}: params has {jnp.result_type(p).name}"
        f"{list(jnp.shape(p))} at {jax.tree_util.keystr(path)}, where the "
        f"optimizer state (its every_k cache) was built for "
        f"{list(jnp.shape(c))} with compute dtype {jnp.result_type(c).name}; "
        f"{fix}"
      )


def check_not_reduced(name: str, axis_name: Any, updates: Updates) -> None:
  """Raises a ValueError when `shard_map` has already reduced the gradient.

  Inside `shard_map` with `check_vma=True`, `jax.grad` with respect to
  replicated (invariant) parameters returns the gradient already summed over
  the axis. There is then no local gradient to average or to perturb with, and
  averaging again would leave a gradient `axis_size` times too large.
  """
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
  if not set(names) <= varying_axes(jax.lax.axis_index(axis_name)):
    return  # The axis is not checked (check_vma=False, pmap): nothing to see.
  reduced = [x for x in jax.tree.leaves(updates) if not set(names) <= varying_axes(x)]
  if reduced:
    raise ValueError(
      f"{name}(axis_name={axis_name!r}) got a gradient that does not vary over "
      f"{axis_name!r}: inside shard_map(check_vma=True), jax.grad with respect "
      "to replicated params already sums it over the axis, so there is no "
      "local gradient to average or perturb with. Make the params vary "
      f"before differentiating, p = jax.lax.pcast(params, {axis_name!r}, "
      "to='varying'), or use shard_map(..., check_vma=False); under plain "
      "jax.jit with sharded arrays, drop axis_name"
    )


# The update leaves that second-gradient transforms returned and that are
# still alive: a second-gradient transform handed one of them as its gradient
# sits right after another in a chain (see `check_not_chained`).
_OUTPUTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def remember_outputs(updates: Updates) -> None:
  for x in jax.tree.leaves(updates)[:1]:
    try:
      _OUTPUTS[id(x)] = x
    except TypeError:  # Not weakly referenceable: nothing to remember.
      pass


def check_not_chained(name: str, updates: Updates) -> None:
  """Raises a ValueError when `updates` is the output of a second-gradient
  transform (two of them chained one after the other)."""
  leaves = jax.tree.leaves(updates)[:1]
  if leaves and _OUTPUTS.get(id(leaves[0])) is leaves[0]:
    raise ValueError(
      f"{name} got, as its gradient, the update of another second-gradient "
      "transform: two of them are chained, e.g. optax.chain(gx.sam(...), "
      "gx.finite_difference_gr(...), opt). The second one would perturb "
      "along the first one's update and add its correction to it, which is "
      "neither method. Use one second-gradient transform, first in the chain:"
      f"\n    optax.chain(gx.{name}(...), optimizer)"
    )
