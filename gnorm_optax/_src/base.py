"""The second-gradient protocol.

Every transformation that needs a gradient at other parameters (GNP, SAM,
finite-difference GR, exact GR) is built by `second_gradient_transformation`,
the one place where the protocol

    update(updates, state, params, *, grad_fn=None, value_fn=None, **extra_args)

is resolved, hyperparameter schedules are evaluated, `every_k` reuse and the
non-finite guard live, and dtypes are restored. The argument checks are in
`checks`, the tree math in `tree_math`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gnorm_optax._src import canonical_conv
from gnorm_optax._src import checks
from gnorm_optax._src.tree_math import abs_sq
from gnorm_optax._src.tree_math import compute_dtype
from gnorm_optax._src.tree_math import same_structure
from gnorm_optax._src.tree_math import tree_all_finite
from gnorm_optax._src.tree_math import upcast

Params = Any
Updates = Any
GradFn = Callable[[Params], Updates]

GRAD_FN_FIX = (
  "pass it to update, e.g. tx.update(grads, state, params, "
  "grad_fn=lambda p: jax.grad(loss_fn)(p, batch)), or pass value_fn="
  "lambda p: loss_fn(p, batch). With Flax NNX, build it before the clean "
  "pass:\n"
  "    grad_fn = gnorm_optax.flax.nnx_grad_fn(model, loss_fn, x, y)\n"
  "    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)\n"
  "    optimizer.update(model, grads, grad_fn=grad_fn)"
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
  if grad_fn is not None:
    source, fn = "grad_fn", grad_fn
  elif value_fn is not None:
    kwargs = value_fn_kwargs(value_fn, extra_args or {})
    loss = lambda q: value_fn(q, **kwargs)
    # optax's convention for complex params: the update direction is the
    # conjugate of what jax.grad returns (d/dx + i d/dy for z = x + iy).
    source, fn = "jax.grad(value_fn)", lambda p: optax.tree.conj(jax.grad(loss)(p))
  else:
    raise ValueError(f"{name} needs grad_fn (or value_fn): {GRAD_FN_FIX}")

  def checked(p: Params) -> Updates:
    g = fn(p)
    # The gradient has the dtypes of its argument (a perturbed point may be
    # formed in float32 for bfloat16 params) or of params.
    like = (
      p
      if same_structure(p, g)
      and all(
        jnp.result_type(x) == jnp.result_type(y)
        for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(p), strict=True)
      )
      else params
    )
    checks.check_same_tree(
      source,
      g,
      like,
      "grad_fn must return the gradient of the loss with respect to its "
      "argument, with the tree, shapes and dtypes of params (with flax.nnx, "
      "nnx.Optimizer passes plain arrays: build it with "
      "gnorm_optax.flax.nnx_grad_fn(model, loss_fn, *batch))",
    )
    if axis_name is not None:
      g = jax.lax.pmean(g, axis_name)
    return g

  return checked


# What a step whose extra gradient is not finite returns (see
# `SecondGradientState`).
ON_NONFINITE = ("clean", "zero", "propagate")


class SecondGradientState(NamedTuple):
  """State of the second-gradient transformations.

  This docstring is the one statement of their fault semantics; the
  transforms' docstrings link here.

  * A non-finite extra gradient (at the perturbed point) makes the step
    return the incoming gradient `g` unchanged (`on_nonfinite="clean"`, the
    default) or zeros (`on_nonfinite="zero"`); the cached correction is
    reset to zero and `nonfinite_count` is incremented. The fallback to `g`
    keeps `g` alive through the extra gradient's pass: for SAM, whose
    update is `g'` alone, that is one parameter copy of working memory more
    than `optax.contrib.sam` (4 GB for 1B float32 parameters).
    `on_nonfinite="zero"` drops it and takes SAM to optax's floor; GNP and
    the finite differences need `g` in their update anyway, so for them it
    only changes what a faulty step returns. A zero update is not a skipped
    step: an optimizer with momentum after it still moves the params by its
    momentum (wrap the chain in `optax.apply_if_finite` to skip steps).
    Either guard reads the extra gradient once more before the update can
    use it; `on_nonfinite="propagate"` does not check at all, as
    `optax.contrib.sam` does not: a non-finite extra gradient reaches the
    update (and, with `every_k`, the cache) and `nonfinite_count` stays 0.
    It is for steps wrapped in `optax.apply_if_finite`, which makes its own
    check, or for models small enough that a pass over the parameters
    matters (on an H200 the guard made SAM's step 1.2-1.3x optax's on
    parameter-bound MLPs; `benchmarks/RESULTS.md`).
  * A non-finite incoming gradient `g` is not hidden: it is passed through (on
    a refresh step the update is exactly `g`, on a reuse step `g` plus the
    cached correction), counted in `nonfinite_count`, and the cache is not
    poisoned. Wrap the whole chain in `optax.apply_if_finite` to skip such
    steps; it leaves this state untouched.
  * A degenerate perturbation is counted in `degenerate_count`: a refresh
    step whose perturbed point is off the intended one by more than half the
    intended step `s`, i.e. whose relative error
    `||(theta' - theta) - s|| / ||s||` exceeds 0.5 (0 when exact, 1 when
    nothing moved). It happens when `theta + s` rounds in the dtype the
    point is formed in: bfloat16 params of order 1 with a SAM radius of
    0.05, or `finite_difference_gr(epsilon=1e-12)` in float32, where
    `theta + epsilon g == theta` and the update is `g` exactly. The step is
    still taken (it is the method at the precision asked for);
    `perturbation_error` says how far off it was, and
    `perturb_dtype=jnp.float32` forms the point exactly for low-precision
    params. A gradient whose squares overflow (an entry of 1e20 in float32)
    makes SAM's normalized step zero: such a step is counted as degenerate
    too (error 1), not recomputed with a rescaled norm, which would cost a
    second pass over the gradient on every step.

  Attributes:
    count: int32 number of updates so far (indexes schedules and `every_k`).
    nonfinite_count: int32 number of steps whose extra gradient (or incoming
      gradient) was not finite, see above.
    degenerate_count: int32 number of refresh steps whose perturbed point
      was off by more than half the intended step, see above.
    perturbation_error: float32 relative error of the last refresh step's
      perturbed point (the largest over its points), measured where it can be
      large: points formed in bfloat16 or float16, and finite-difference
      steps in any dtype (see `Probe`); 0 elsewhere, and for the exact
      Hessian-vector product, which forms no point.
    correction: the cached correction, reused on the steps where the extra
      gradient is not recomputed, in the compute dtype of each parameter and
      with the parameter's sharding. Present when `every_k > 1`, or when
      `every_k` is an array (as `optax.inject_hyperparams` passes it), else
      None.
    policy: the state of the refresh policy (`RefreshPolicy`) when there is
      one (AE-SAM: running mean and variance of `||g||^2`), else None.
  """

  # `count` shadows tuple.count, as in optax's states (ScaleByAdamState).
  count: jax.Array  # type: ignore[assignment]
  nonfinite_count: jax.Array
  degenerate_count: jax.Array
  perturbation_error: jax.Array
  correction: Updates | None
  policy: Any = None


class RefreshPolicy(NamedTuple):
  """When to take the extra gradient, decided from the step's gradient.

  Attributes:
    init: `() -> state`, the policy's initial state (arrays).
    decide: `(state, g, hp) -> (refresh, state)`: whether this step takes
      the extra gradient (a boolean scalar) and the next state.
  """

  init: Callable[[], Any]
  decide: Callable[[Any, Updates, dict[str, jax.Array]], tuple[jax.Array, Any]]


class Probe:
  """Gradients near `params`: what a correction function is given.

  `probe(direction, scale)` forms the perturbed point
  `theta' = theta + scale * direction` (the sum in at least float32, the point
  in `perturb_dtype` or the params' dtypes), returns `grad_fn(theta')` in the
  compute dtype, and records the relative error of the point formed (see
  `SecondGradientState`). `probe.grad_fn` is the checked
  gradient function itself, for corrections that differentiate it (the exact
  Hessian-vector product).

  The error costs a reduction per parameter leaf, so by default it is
  measured only where it can be large: when some leaf of the point is formed
  in a dtype narrower than float32 (bfloat16, float16). `measure=True`
  measures it in every dtype, for steps whose size the user sets and that can
  fall below the params' resolution in float32 too (finite differences:
  `theta + epsilon g == theta`). A normalized step of radius `rho` in float32
  or wider is off by at most about `sqrt(n) * ulp(theta) / (2 rho)` of itself
  (4e-4 for 1e8 parameters of size 0.05 and `rho = 0.05`), never a degenerate
  amount.
  """

  def __init__(
    self, grad_fn: GradFn, params: Params, perturb_dtype: Any, axis_name: str | None
  ):
    self.grad_fn = grad_fn
    self._params = params
    self._perturb_dtype = perturb_dtype
    self._axis_name = axis_name
    self.errors: list[jax.Array] = []

  def point_dtype(self, p: jax.Array) -> jnp.dtype:
    """The dtype a perturbed point of parameter `p` is formed in."""
    if self._perturb_dtype is None:
      return jnp.result_type(p)
    return jnp.promote_types(jnp.result_type(p), self._perturb_dtype)

  def __call__(
    self, direction: Updates, scale: Any = 1.0, *, measure: bool | None = None
  ) -> Updates:
    point = jax.tree.map(
      lambda d, p: (scale * upcast(d) + upcast(p)).astype(self.point_dtype(p)),
      direction,
      self._params,
    )
    if measure is None:
      measure = any(
        jnp.dtype(x.dtype).itemsize < jnp.dtype(compute_dtype(x.dtype)).itemsize
        for x in jax.tree.leaves(point)
      )
    if measure:
      self._measure(point, direction, scale)
    return upcast(self.grad_fn(point))

  def _measure(self, point: Params, direction: Updates, scale: Any) -> None:
    # The step is recomputed here from `direction` rather than shared with
    # the point as a tree, which XLA kept as a buffer: an F-GR step of a 6M-
    # parameter MLP held 0.31 parameter copies more than GNP's, now 0.14.
    # (No reshape: it is not defined on explicitly sharded arrays.)
    def sums_of(x, p, d):
      s = scale * upcast(d)
      return jnp.stack([jnp.sum(abs_sq(upcast(x) - upcast(p) - s)), jnp.sum(abs_sq(s))])

    per_leaf = (
      sums_of(x, p, d)
      for x, p, d in zip(
        jax.tree.leaves(point),
        jax.tree.leaves(self._params),
        jax.tree.leaves(direction),
        strict=True,
      )
    )
    sums = sum(per_leaf, start=jnp.zeros([2], jnp.float32))
    miss, length = sums[0], sums[1]
    if self._axis_name is not None:
      miss, length = jax.lax.pmean((miss, length), self._axis_name)
    error = jnp.sqrt(miss / jnp.where(length > 0, length, 1.0))
    # A non-finite step is a non-finite fault (counted as such), not a
    # degenerate one.
    error = jnp.where(jnp.isfinite(error), error, 0.0)
    self.errors.append(error.astype(jnp.float32))

  def lost(self, flag: jax.Array) -> None:
    """Records a step lost before a point could be formed (error 1 where
    `flag`), e.g. a normalization by an infinite norm."""
    self.errors.append(jnp.where(flag, 1.0, 0.0).astype(jnp.float32))


# `correction_fn(probe, g_perturb, g, params, hp) -> d`: the correction from
# the extra gradient(s), given the `Probe`, the gradient that defines the
# perturbation (`g_perturb`: local or averaged), the averaged clean gradient
# `g` (compute dtype), `params` and the evaluated hyperparameters.
CorrectionFn = Callable[
  [Probe, Updates, Updates, Params, dict[str, jax.Array]], Updates
]
# `apply_fn(g, d, hp) -> update`: combines the clean gradient and the correction.
ApplyFn = Callable[[Updates, Updates, dict[str, jax.Array]], Updates]
# `cache_fn(d, g, hp) -> cache`: what a refresh step keeps for the steps that
# reuse it; `reuse_fn(cache, g, hp) -> d`: the correction of such a step.
CacheFn = Callable[[Updates, Updates, dict[str, jax.Array]], Updates]


def second_gradient_transformation(
  name: str,
  correction_fn: CorrectionFn,
  apply_fn: ApplyFn,
  hyperparams: Mapping[str, optax.ScalarOrSchedule],
  *,
  every_k: int | jax.Array = 1,
  axis_name: str | None = None,
  sync_perturbation: bool = True,
  perturb_dtype: Any = None,
  identity_at_zero: bool = True,
  on_nonfinite: str = "clean",
  cache_fn: CacheFn | None = None,
  reuse_fn: CacheFn | None = None,
  policy: RefreshPolicy | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds a transformation `g -> apply_fn(g, d)` with `d` from extra gradients.

  This is the one implementation of the second-gradient protocol shared by
  `penalized_grad`, `sam`, `gsam`, `finite_difference_gr` and
  `gradient_regularization`, and the building block for new variants: a
  `correction_fn` that takes its extra gradients through the `Probe` it is
  given, and an `apply_fn` that combines them with `g` (see the example).

  On a refresh step (`count % every_k == 0`) `d = correction_fn(...)` is
  computed from the gradient at other parameters; on the other steps the cached
  `d` is reused, so the amortized cost is `1 + c / every_k` gradients (c extra
  gradients per refresh). Faults (non-finite and degenerate steps) are handled
  as `SecondGradientState` describes.

  The state's structure never depends on a traced value: with `every_k` a
  Python integer, the cache exists iff `every_k > 1`; with `every_k` an array
  (`optax.inject_hyperparams` makes it one, concrete in `tx.init` but traced
  under `jax.eval_shape(tx.init, params)` or `jax.jit`), the cache always
  exists, so `tx.init` and its abstract evaluation agree and the injected
  value can be changed later (a value below 1 is taken as 1: a refresh on
  every step). A state with a cache remembers the parameter tree it was built
  for; `update` with other params raises a ValueError. No two leaves of the
  state share a buffer (it can be donated), and the cache has the sharding of
  the params (explicit-sharding meshes).

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
    perturb_dtype: the dtype perturbed points are formed in (promoted with
      each parameter's dtype; None keeps the params' dtypes).
    identity_at_zero: `apply_fn(g, 0, hp)` is `g`. A non-finite correction
      is zeroed, so the fallback to `g` then costs no second pass over the
      tree; pass False when it is not (penalized_grad's `normalize_clean`,
      or an `apply_fn` that returns the extra gradient itself, as SAM's
      does), and the update selects `g` explicitly on such a step.
    on_nonfinite: what a step whose extra gradient is not finite returns:
      `"clean"`, the incoming gradient `g`; `"zero"`, zeros; `"propagate"`,
      no check (see `SecondGradientState`).
    cache_fn: with a cache, `cache_fn(d, g, hp)` is what a refresh step
      caches instead of `d` itself (LookSAM caches the part of `g'`
      orthogonal to `g`); a faulty step caches zeros (except with
      `on_nonfinite="propagate"`).
    reuse_fn: with a cache, `reuse_fn(cache, g, hp)` is the correction of a
      step that reuses it (default: the cache itself).
    policy: decides on each step whether to take the extra gradient, in
      place of `count % every_k == 0`; a step that does not reuses the cache
      when `every_k > 1`, else its correction is zero (the update is
      `apply_fn(g, 0)`). A step whose gradient is not finite takes no extra
      gradient and keeps the policy's state.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    A new variant in a few lines: SAM with the ascent step of the L-infinity
    ball, `theta' = theta + rho * sign(g)` (Foret et al.'s `p = infinity`),
    with `every_k`, `axis_name`, schedules, dtypes, the fault guard and the
    state handled as in the built-in transforms:

    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> def linf_sam(rho, **kwargs):
    ...   def correction_fn(probe, g_perturb, g, params, hp):
    ...     step = jax.tree.map(lambda x: hp["rho"] * jnp.sign(x), g_perturb)
    ...     return jax.tree.map(jnp.subtract, probe(step), g)   # d = g' - g
    ...   apply_fn = lambda g, d, hp: optax.tree.add(g, d)       # g + d = g'
    ...   return gx.second_gradient_transformation(
    ...       "linf_sam", correction_fn, apply_fn, dict(rho=rho), **kwargs)
    >>> loss = lambda p: jnp.sum(p ** 4)
    >>> params = jnp.array([1.0, -0.5])
    >>> tx = linf_sam(0.1, every_k=2)
    >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params),
    ...                            params, grad_fn=jax.grad(loss))
    >>> print([f"{u:.3f}" for u in updates])    # 4 (theta + 0.1 sign(g))^3
    ['5.324', '-0.864']

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
    Generalization*, ICLR 2021, https://arxiv.org/abs/2010.01412 (the
    p-norm ascent step)
  """
  # The state's structure must not depend on a traced value. Under
  # `optax.inject_hyperparams` every_k arrives as an array: concrete in
  # `tx.init`, traced under `jax.eval_shape(tx.init, params)` (orbax's restore
  # target), `jax.jit` and in `update`. An array every_k therefore always
  # keeps a cache; `update` reads the decision back from the state.
  k = checks.check_every_k(every_k)
  checks.check_choice("on_nonfinite", on_nonfinite, ON_NONFINITE)
  keeps_cache = k is None or not isinstance(every_k, (int, np.integer)) or k > 1
  if perturb_dtype is not None:
    perturb_dtype = jnp.dtype(perturb_dtype)
    if not jnp.issubdtype(perturb_dtype, jnp.inexact):
      raise ValueError(
        f"perturb_dtype must be a floating dtype such as jnp.float32, got "
        f"{perturb_dtype}"
      )

  def init_fn(params: Params) -> SecondGradientState:
    checks.check_full_tree(name, params, "params")
    correction = None
    if keeps_cache:
      # zeros_like keeps each parameter's sharding (explicit meshes).
      correction = jax.tree.map(
        lambda p: jnp.zeros_like(p, dtype=compute_dtype(p.dtype)), params
      )
    # One array per field: a state whose leaves share a buffer cannot be
    # donated (`jax.jit(step, donate_argnums=...)`).
    return SecondGradientState(
      count=jnp.zeros([], jnp.int32),
      nonfinite_count=jnp.zeros([], jnp.int32),
      degenerate_count=jnp.zeros([], jnp.int32),
      perturbation_error=jnp.zeros([], jnp.float32),
      correction=correction,
      policy=None if policy is None else policy.init(),
    )

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
    checks.check_not_chained(name, updates)
    checks.check_full_tree(name, params, "params")
    checks.check_full_tree(name, updates, "updates")
    if state.correction is not None:
      checks.check_state_matches(name, state.correction, params)
    checks.check_same_tree(
      "updates",
      updates,
      params,
      f"the gradient given to {name}.update must have the tree of params",
      dtypes=False,
    )
    if axis_name is not None:
      checks.check_not_reduced(name, axis_name, updates)
    hp = evaluate(hyperparams, state.count)
    g_local = upcast(updates)
    g = g_local if axis_name is None else jax.lax.pmean(g_local, axis_name)
    g_perturb = g if sync_perturbation else g_local

    def refresh(g_perturb, g, params):
      probe = Probe(checked_grad_fn, params, perturb_dtype, axis_name)
      d = correction_fn(probe, g_perturb, g, params, hp)
      d = jax.tree.map(lambda di, gi: di.astype(gi.dtype), d, g)
      if on_nonfinite == "propagate":
        finite = jnp.asarray(True)
      else:
        finite = tree_all_finite(d)
        d = optax.tree.where(finite, d, optax.tree.zeros_like(d))
      error = jnp.max(jnp.stack(probe.errors)) if probe.errors else jnp.zeros([])
      error = error.astype(jnp.float32)
      if axis_name is not None:  # one value for all devices (and the state)
        error = jax.lax.pmax(error, axis_name)
      # A non-finite step is a non-finite fault, counted as such.
      return d, finite, error, (error > 0.5) & finite

    new_policy = state.policy
    if policy is not None:
      decided, new_policy = policy.decide(state.policy, g, hp)
      # A step whose gradient is not finite takes no extra gradient and leaves
      # the policy's state as it was (a NaN in running statistics would
      # decide every later step); the NaN itself comes out, as on a reuse step.
      g_finite = tree_all_finite(g)
      decided = decided & g_finite
      new_policy = optax.tree.where(g_finite, new_policy, state.policy)

    if state.correction is None and policy is None:
      d, finite, error, degenerate = refresh(g_perturb, g, params)
      correction = None
    elif state.correction is None:

      def skip(g_perturb, g, params):
        del g_perturb, params
        return (
          optax.tree.zeros_like(g),
          jnp.asarray(True),
          state.perturbation_error,
          jnp.asarray(False),
        )

      d, finite, error, degenerate = jax.lax.cond(
        decided, canonical_conv.for_xla_cpu(refresh), skip, g_perturb, g, params
      )
      correction = None
    else:

      def reuse(g_perturb, g, params):
        del g_perturb, g, params
        return (
          state.correction,
          jnp.asarray(True),
          state.perturbation_error,
          jnp.asarray(False),
        )

      # An injected every_k below 1 (or fractional) is taken as max(1, int).
      k_now = jnp.maximum(jnp.asarray(every_k).astype(jnp.int32), 1)
      refreshes = state.count % k_now == 0 if policy is None else decided
      if cache_fn is None and reuse_fn is None:  # the cache is `d` itself
        d, finite, error, degenerate = jax.lax.cond(
          refreshes, canonical_conv.for_xla_cpu(refresh), reuse, g_perturb, g, params
        )
        correction = d
      else:

        def refresh_and_cache(g_perturb, g, params):
          d, finite, *rest = refresh(g_perturb, g, params)
          cache = d if cache_fn is None else cache_fn(d, g, hp)
          if cache_fn is not None and on_nonfinite != "propagate":
            # A faulty step caches zero, not what cache_fn makes of its
            # (maybe non-finite) clean gradient.
            cache = optax.tree.where(finite, cache, optax.tree.zeros_like(cache))
          return d, optax.tree.cast_like(cache, state.correction), finite, *rest

        def reuse_cache(g_perturb, g, params):
          _, *rest = reuse(g_perturb, g, params)
          d = (
            state.correction if reuse_fn is None else reuse_fn(state.correction, g, hp)
          )
          return optax.tree.cast_like(d, g), state.correction, *rest

        d, correction, finite, error, degenerate = jax.lax.cond(
          refreshes,
          canonical_conv.for_xla_cpu(refresh_and_cache),
          reuse_cache,
          g_perturb,
          g,
          params,
        )
      if policy is not None:
        # A skipped step reuses the cache only when every_k > 1 (an injected
        # every_k keeps a cache even at 1): at 1 its correction is zero, as
        # without a cache.
        d = optax.tree.where(refreshes | (k_now > 1), d, optax.tree.zeros_like(d))

    out = apply_fn(g, d, hp)  # = g where d was zeroed (identity_at_zero)
    if on_nonfinite == "zero":
      out = optax.tree.where(finite, out, optax.tree.zeros_like(out))
    elif not identity_at_zero and on_nonfinite == "clean":
      out = optax.tree.where(finite, out, g)
    out = optax.tree.cast_like(out, updates)
    new_state = SecondGradientState(
      count=optax.safe_increment(state.count),
      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
      degenerate_count=state.degenerate_count + degenerate.astype(jnp.int32),
      perturbation_error=error,
      correction=correction,
      policy=new_policy,
    )
    checks.remember_outputs(out)
    return out, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
