"""Shared helpers: the second-gradient protocol, hyperparameters, tree math.

Every transformation that needs a gradient at other parameters (GNP, SAM,
finite-difference GR, exact GR) is built by `second_gradient_transformation`,
the one place where the protocol

    update(updates, state, params, *, grad_fn=None, value_fn=None, **extra_args)

is resolved, hyperparameter schedules are evaluated, `every_k` reuse and the
non-finite guard live, and dtypes are restored.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gnorm_optax._src import canonical_conv

Params = Any
Updates = Any
GradFn = Callable[[Params], Updates]

GRAD_FN_FIX = (
    "pass it to update, e.g. tx.update(grads, state, params, "
    "grad_fn=lambda p: jax.grad(loss_fn)(p, batch)), or pass value_fn="
    "lambda p: loss_fn(p, batch)"
)


# ----------------------------------------------------------------------------
# Tree math.
# ----------------------------------------------------------------------------


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the math runs in: at least float32 (bf16/f16 are promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(tree: Any) -> Any:
  """Casts every leaf to its compute dtype (at least float32)."""
  return jax.tree.map(lambda x: x.astype(compute_dtype(x.dtype)), tree)


def cast_like(tree: Any, like: Any) -> Any:
  """Casts every leaf of `tree` to the dtype of the matching leaf of `like`."""
  return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)


def global_norm(tree: Any) -> jax.Array:
  """L2 norm over all leaves of a tree, accumulated in at least float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  sq = [jnp.sum(jnp.square(x.astype(compute_dtype(x.dtype)))) for x in leaves]
  return jnp.sqrt(sum(sq))


def tree_all_finite(tree: Any) -> jax.Array:
  """True when every element of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def axpy(a: Any, x: Any, y: Any) -> Any:
  """`a * x + y` leaf by leaf (a is a scalar)."""
  return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def shifted(params: Any, direction: Any, scale: Any = 1.0) -> Any:
  """`params + scale * direction`, computed in float32 at least, in params' dtypes."""
  return cast_like(axpy(scale, direction, upcast(params)), params)


# ----------------------------------------------------------------------------
# Validation of constants (traced values are never checked: see STYLE.md).
# ----------------------------------------------------------------------------


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def check_scalar(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    fix: str = "",
) -> None:
  """Checks a numeric hyperparameter given as a constant.

  Schedules (callables) and traced values (e.g. under
  `optax.inject_hyperparams` inside `jit`) are accepted as they are.

  Raises:
    TypeError: if `value` is neither a number, a scalar array nor a schedule.
    ValueError: if it is NaN/inf, not a scalar, or below `minimum`.
  """
  if callable(value) or _is_traced(value):
    return
  if isinstance(value, (str, bytes, bool)) or not isinstance(
      value, (numbers.Real, np.ndarray, np.generic, jax.Array)
  ):
    raise TypeError(
        f"{name} must be a number or a schedule (a callable of the step "
        f"count), got {value!r} of type {type(value).__name__}"
    )
  if np.ndim(value) != 0:
    raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
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


def evaluate(
    hyperparams: Mapping[str, optax.ScalarOrSchedule], count: jax.Array
) -> dict[str, jax.Array]:
  """Evaluates schedules at `count`; checks that each gives a scalar.

  Python numbers stay weakly typed (as floats), so that they take the dtype of
  the arrays they meet: with `jax_enable_x64` on, `rho=0.05` must not turn the
  math on float32 parameters into float64. Arrays are promoted to their
  compute dtype (at least float32).
  """
  out = {}
  for name, value in hyperparams.items():
    v = jnp.asarray(value(count) if callable(value) else value)
    if v.ndim != 0:
      raise ValueError(
          f"the schedule for {name} must return a scalar, got shape {v.shape}"
      )
    out[name] = v * 1.0 if v.weak_type else v.astype(compute_dtype(v.dtype))
  return out


# ----------------------------------------------------------------------------
# The second-gradient protocol.
# ----------------------------------------------------------------------------


def check_same_tree(
    name: str, tree: Any, params: Any, fix: str, *, dtypes: bool = True
) -> None:
  """Raises a ValueError when `tree` differs from `params` in structure, shape
  or (with `dtypes`) dtype; checked at trace time, free in the jitted step."""
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError(
        f"{name} returned a tree of another structure than params:\n"
        f"  got     {jax.tree.structure(tree)}\n"
        f"  params  {jax.tree.structure(params)}\n{fix}"
    )
  for (path, x), p in zip(
      jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(params)
  ):
    dtype_differs = dtypes and jnp.result_type(x) != jnp.result_type(p)
    if jnp.shape(x) != jnp.shape(p) or dtype_differs:
      raise ValueError(
          f"{name} returned {jnp.result_type(x).name}{list(jnp.shape(x))} at "
          f"{jax.tree_util.keystr(path)}, where params has "
          f"{jnp.result_type(p).name}{list(jnp.shape(p))}; {fix}"
      )


def value_fn_kwargs(
    value_fn: Callable[..., jax.Array], extra_args: Mapping[str, Any]
) -> dict[str, Any]:
  """The extra arguments that `value_fn` takes by name.

  This is optax's line-search convention (`scale_by_backtracking_linesearch`,
  `scale_by_zoom_linesearch`): `update(..., value_fn=fn, x=x, y=y)` evaluates
  `fn(params, x=x, y=y)`, so one `value_fn` serves both.
  """
  try:
    names = list(inspect.signature(value_fn).parameters)[1:]
  except (TypeError, ValueError):  # No signature (some builtins): nothing.
    return {}
  return {k: v for k, v in extra_args.items() if k in names}


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


def check_state_matches(
    name: str, correction: Updates, params: Params
) -> None:
  """Raises a ValueError when `params` is not the tree the state was built for.

  Only a state with an `every_k` cache records that tree; it is compared at
  trace time (free in the jitted step).
  """
  fix = (
      "re-run tx.init(params) for these params (the state was built by "
      "tx.init for another parameter tree, e.g. before the model changed), or "
      "restore the optimizer state saved with them"
  )
  if jax.tree.structure(correction) != jax.tree.structure(params):
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


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which `x` varies inside `shard_map` (empty elsewhere).

  Only tracked when `shard_map` checks them (`check_vma=True`, its default).
  """
  aval = jax.typeof(x)
  axes = getattr(aval, "vma", None)  # jax < 0.9
  if axes is None:
    axes = getattr(getattr(aval, "manual_axis_type", None), "varying", ())
  return frozenset(axes)


def match_varying(x: Any, like: Any) -> Any:
  """Casts `x` to vary over the axes that `like` varies over (leaf by leaf).

  Needed where an averaged (invariant) value meets per-device values in one
  primitive, e.g. the tangent of `jax.jvp` at varying parameters.
  """

  def one(a, b):
    missing = tuple(sorted(varying_axes(b) - varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(one, x, like)


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


def resolve_grad_fn(
    name: str,
    params: Params | None,
    grad_fn: GradFn | None,
    value_fn: Callable[..., jax.Array] | None,
    axis_name: str | None,
    extra_args: Mapping[str, Any] | None = None,
) -> GradFn:
  """Returns the checked gradient function of the protocol.

  `grad_fn` wins over `value_fn`; `value_fn` also gets the `extra_args` that
  it takes by name (see `value_fn_kwargs`). The result checks, at trace time,
  that the gradient has the tree, shapes and dtypes of `params`, and averages
  it over `axis_name` when one is given (inside `shard_map` / `pmap`).
  """
  if params is None:
    raise ValueError(
        f"{name} needs params: call tx.update(grads, state, params, "
        "grad_fn=...), not tx.update(grads, state)"
    )
  if grad_fn is None and value_fn is None:
    raise ValueError(f"{name} needs grad_fn (or value_fn): {GRAD_FN_FIX}")
  source = "grad_fn" if grad_fn is not None else "jax.grad(value_fn)"
  if grad_fn is not None:
    fn = grad_fn
  else:
    kwargs = value_fn_kwargs(value_fn, extra_args or {})
    fn = jax.grad(lambda p: value_fn(p, **kwargs))

  def checked(p: Params) -> Updates:
    g = fn(p)
    check_same_tree(
        source,
        g,
        params,
        "grad_fn must return the gradient of the loss with respect to its "
        "argument, with the tree, shapes and dtypes of params (with flax.nnx, "
        "nnx.Optimizer passes plain arrays: differentiate a loss of the plain "
        "params with jax.grad, or return nnx.as_pure(grads))",
    )
    if axis_name is not None:
      g = jax.lax.pmean(g, axis_name)
    return g

  return checked


class SecondGradientState(NamedTuple):
  """State of the second-gradient transformations.

  Attributes:
    count: int32 number of updates so far (indexes schedules and `every_k`).
    nonfinite_count: int32 number of steps whose extra gradient was not finite;
      on those steps the transform returned the incoming gradient unchanged.
      (A non-finite incoming gradient makes the extra gradient non-finite
      too, so such a step is counted as well; its update is not finite.)
    correction: the cached correction, reused on the steps where the extra
      gradient is not recomputed, in the compute dtype of each parameter.
      Present when `every_k > 1`, or when `every_k` is an array (as
      `optax.inject_hyperparams` passes it), else None.
  """

  count: jax.Array
  nonfinite_count: jax.Array
  correction: Updates | None


class CorrectionFn(Protocol):
  """Computes the correction `d` from the extra gradient(s).

  Called with the checked `grad_fn`, the gradient that defines the
  perturbation (`g_perturb`: local or averaged), the averaged clean gradient
  `g` (float32), `params` and the evaluated hyperparameters.
  """

  def __call__(
      self,
      grad_fn: GradFn,
      g_perturb: Updates,
      g: Updates,
      params: Params,
      hp: dict[str, jax.Array],
  ) -> Updates: ...


class ApplyFn(Protocol):
  """Combines the clean gradient `g` and the correction `d` into the update."""

  def __call__(
      self, g: Updates, d: Updates, hp: dict[str, jax.Array]
  ) -> Updates: ...


def second_gradient_transformation(
    name: str,
    correction_fn: CorrectionFn,
    apply_fn: ApplyFn,
    hyperparams: Mapping[str, optax.ScalarOrSchedule],
    *,
    every_k: int = 1,
    axis_name: str | None = None,
    sync_perturbation: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Builds a transformation `g -> apply_fn(g, d)` with `d` from extra gradients.

  This is the one implementation of the second-gradient protocol shared by
  `penalized_grad`, `sam`, `finite_difference_gr` and `gradient_regularization`.

  On a refresh step (`count % every_k == 0`) `d = correction_fn(...)` is
  computed from the gradient at other parameters; on the other steps the cached
  `d` is reused, so the amortized cost is `1 + c / every_k` gradients (c extra
  gradients per refresh). If `d` is not finite, the step returns `g` unchanged,
  caches a zero correction and increments `state.nonfinite_count`.

  Faults: a non-finite extra gradient (at the perturbed point) falls back to
  `g` as above. A non-finite *incoming* gradient `g` is not hidden: it is
  passed through (on a refresh step the update is exactly `g`, on a reuse step
  `g` plus the cached correction), the step is counted, and the cache is not
  poisoned (it is reset to zero). Wrap the whole chain in
  `optax.apply_if_finite` to skip such steps; it leaves this state untouched.

  The state's structure never depends on a traced value: with `every_k` a
  Python integer, the cache exists iff `every_k > 1`; with `every_k` an array
  (`optax.inject_hyperparams` makes it one, concrete in `tx.init` but traced
  under `jax.eval_shape(tx.init, params)` or `jax.jit`), the cache always
  exists, so `tx.init` and its abstract evaluation agree and the injected
  value can be changed later. A state with a cache remembers the parameter
  tree it was built for; `update` with other params raises a ValueError.

  Args:
    name: the public name of the transform, for error messages.
    correction_fn: computes `d` (see `CorrectionFn`).
    apply_fn: computes the update from `g` and `d`.
    hyperparams: numeric hyperparameters, each a scalar or a schedule of the
      step count; evaluated once per step and passed to both functions.
    every_k: recompute `d` on one step in `every_k`.
    axis_name: inside `shard_map` / `pmap`, the mapped axis over which the
      gradients are averaged.
    sync_perturbation: with `axis_name`, perturb with the averaged gradient
      (True) or with each device's local gradient (False: SAM's m-sharpness).

  Returns:
    An optax.GradientTransformationExtraArgs.
  """
  # The state's structure must not depend on a traced value. Under
  # `optax.inject_hyperparams` every_k arrives as an array: concrete in
  # `tx.init`, traced under `jax.eval_shape(tx.init, params)` (orbax's restore
  # target), `jax.jit` and in `update`. An array every_k therefore always
  # keeps a cache; `update` reads the decision back from the state.
  k = check_every_k(every_k)
  keeps_cache = not isinstance(every_k, (int, np.integer)) or k > 1

  def init_fn(params: Params) -> SecondGradientState:
    check_full_tree(name, params, "params")
    zero = jnp.zeros([], jnp.int32)
    correction = None
    if keeps_cache:
      correction = jax.tree.map(
          lambda p: jnp.zeros(p.shape, compute_dtype(p.dtype)), params
      )
    return SecondGradientState(zero, zero, correction)

  def update_fn(
      updates: Updates,
      state: SecondGradientState,
      params: Params | None = None,
      *,
      grad_fn: GradFn | None = None,
      value_fn: Callable[..., jax.Array] | None = None,
      **extra_args: Any,
  ) -> tuple[Updates, SecondGradientState]:
    # Unknown extra arguments are ignored (optax convention), except those
    # that value_fn takes by name (optax's line-search convention).
    checked_grad_fn = resolve_grad_fn(
        name, params, grad_fn, value_fn, axis_name, extra_args
    )
    check_full_tree(name, params, "params")
    check_full_tree(name, updates, "updates")
    if state.correction is not None:
      check_state_matches(name, state.correction, params)
    check_same_tree(
        "updates",
        updates,
        params,
        f"the gradient given to {name}.update must have the tree of params",
        dtypes=False,
    )
    if axis_name is not None:
      check_not_reduced(name, axis_name, updates)
    hp = evaluate(hyperparams, state.count)
    g_local = upcast(updates)
    g = g_local if axis_name is None else jax.lax.pmean(g_local, axis_name)
    g_perturb = g if sync_perturbation else g_local

    def refresh(g_perturb, g, params):
      d = correction_fn(checked_grad_fn, g_perturb, g, params, hp)
      d = jax.tree.map(lambda di, gi: di.astype(gi.dtype), d, g)
      finite = tree_all_finite(d)
      d = jax.tree.map(lambda di: jnp.where(finite, di, jnp.zeros_like(di)), d)
      return d, finite

    if state.correction is None:
      d, finite = refresh(g_perturb, g, params)
      correction = None
    else:

      def reuse(g_perturb, g, params):
        del g_perturb, g, params
        return state.correction, jnp.asarray(True)

      d, finite = jax.lax.cond(
          state.count % every_k == 0,
          canonical_conv.for_xla_cpu(refresh),
          reuse,
          g_perturb,
          g,
          params,
      )
      correction = d

    out = apply_fn(g, d, hp)
    out = jax.tree.map(lambda o, gi: jnp.where(finite, o, gi), out, g)
    out = cast_like(out, updates)
    new_state = SecondGradientState(
        count=optax.safe_increment(state.count),
        nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
        correction=correction,
    )
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

