"""Gradient-norm penalty (GNP) and SAM as optax transformations."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from gnorm_optax._src import base
from gnorm_optax._src import checks
from gnorm_optax._src.tree_math import global_norm
from gnorm_optax._src.tree_math import real_vdot
from gnorm_optax._src.tree_math import upcast


def _normalize(g: base.Updates, eps: jax.Array) -> tuple[base.Updates, jax.Array]:
  """`g / (||g|| + eps)`, and `||g||`."""
  norm = global_norm(g)
  return jax.tree.map(lambda x: x / (norm + eps), g), norm


def _adaptive_scale(params: base.Params, eta, adaptive_mask) -> base.Updates:
  """ASAM's `T = |theta| + eta` in each parameter's compute dtype; `T = 1`
  where `adaptive_mask` is False."""
  t = jax.tree.map(lambda p: jnp.abs(upcast(p)) + eta, params)
  if adaptive_mask is None:
    return t
  mask = adaptive_mask(params) if callable(adaptive_mask) else adaptive_mask
  try:
    return jax.tree.map(lambda m, ti: ti if m else jnp.ones_like(ti), mask, t)
  except (ValueError, TypeError) as e:
    raise ValueError(
      "adaptive_mask must be a tree of Python bools with the structure of "
      "params (or a callable params -> such a tree), as optax.masked takes; "
      f"{e}"
    ) from None


def _perturbation(
  g: base.Updates,
  params: base.Params,
  rho,
  eps,
  adaptive: bool,
  eta,
  adaptive_mask=None,
) -> tuple[base.Updates, jax.Array]:
  """`rho * g / ||g||`, or ASAM's `rho * T^2 g / ||T g||` with `T = |theta| + eta`;
  and the norm it divides by."""
  if not adaptive:
    unit, norm = _normalize(g, eps)
    return jax.tree.map(lambda x: rho * x, unit), norm
  t = _adaptive_scale(params, eta, adaptive_mask)
  tg = jax.tree.map(jnp.multiply, t, g)
  norm = global_norm(tg)
  return jax.tree.map(lambda ti, tgi: rho * ti * tgi / (norm + eps), t, tg), norm


# What the steps between two extra gradients reuse (penalized_grad's `reuse`).
REUSE = ("correction", "looksam")


def _looksam_cache(d, g, hp):
  """LookSAM's cache: the part of `g' = g + d` orthogonal to `g`."""
  del hp
  g_adv = optax.tree.add(g, d)
  sq = real_vdot(g, g)
  along = jnp.where(sq > 0, real_vdot(g_adv, g) / jnp.where(sq > 0, sq, 1.0), 0.0)
  return jax.tree.map(lambda a, gi: a - along * gi, g_adv, g)


def _looksam_reuse(g_v, g, hp):
  """LookSAM's correction `alpha * ||g|| / ||g_v|| * g_v` (0 if `g_v = 0`)."""
  norm_v = global_norm(g_v)
  ratio = global_norm(g) / jnp.where(norm_v > 0, norm_v, 1.0)
  scale = jnp.where(norm_v > 0, hp["looksam_alpha"] * ratio, 0.0)
  return jax.tree.map(lambda v: scale * v, g_v)


_LOOKSAM = dict(cache_fn=_looksam_cache, reuse_fn=_looksam_reuse)


def _ae_policy(decay: float) -> base.RefreshPolicy:
  """AE-SAM: the extra gradient when `||g||^2 >= mu + c sigma`, with `mu`,
  `sigma^2` running statistics of `||g||^2` updated by this step's."""

  def init():
    return (jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32))

  def decide(stats, g, hp):
    mean, var = stats
    sq = jnp.square(global_norm(g)).astype(jnp.float32)
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * jnp.square(sq - mean)
    return sq >= mean + hp["ae_threshold"] * jnp.sqrt(var), (mean, var)

  return base.RefreshPolicy(init, decide)


def _check_step_args(owner, rho, eta, eps, adaptive, adaptive_mask) -> None:
  """The factory checks of SAM's (or ASAM's) ascent step."""
  checks.check_scalar(
    "rho", rho, minimum=0.0, fix="use rho=0 for no penalty", owner=owner
  )
  checks.check_scalar("eta", eta, minimum=0.0, owner=owner)
  checks.check_scalar("eps", eps, minimum=0.0, owner=owner)
  if adaptive_mask is not None and not adaptive:
    raise ValueError(
      "adaptive_mask only applies to ASAM's step: pass adaptive=True with it, "
      "or drop adaptive_mask"
    )


def penalized_grad(
  rho: optax.ScalarOrSchedule = 0.05,
  alpha: optax.ScalarOrSchedule = 0.8,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: Any = None,
  normalize_clean: bool = False,
  every_k: int | jax.Array = 1,
  axis_name: str | None = None,
  sync_perturbation: bool = True,
  perturb_dtype: Any = None,
  on_nonfinite: str = "clean",
  reuse: str = "correction",
  looksam_alpha: optax.ScalarOrSchedule = 0.7,
  ae_threshold: optax.ScalarOrSchedule | None = None,
  ae_decay: float = 0.9,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty (GNP): the gradient of `L + lambda * ||grad L||`.

  With `g = grad L(theta)` (the incoming updates) and the extra gradient
  `g' = grad L(theta')` taken at

  .. math::
    \theta' = \theta + \rho\, g / (\|g\| + \mathrm{eps}),

  the output is the first-order approximation of the penalized gradient

  .. math::
    (1 - \alpha) g + \alpha g' \approx g + \alpha \rho H g / \|g\|
    = \nabla (L + \lambda \|\nabla L\|), \quad \lambda = \alpha \rho.

  `alpha = 1` is SAM; `alpha = 0` or `rho = 0` gives `g` back exactly.
  `||.||` is the global L2 norm over the whole tree, computed in float32 at
  least, and as `sqrt(sum |x|^2)` for complex leaves (optax's
  convention: the gradient of complex params is the conjugate of what
  `jax.grad` returns, and `grad_fn` must return it the same way; `value_fn=`
  does so itself). `adaptive=True` takes ASAM's scale-invariant step
  `theta' = theta + rho * T^2 g / ||T g||` with `T = |theta| + eta`, in each
  parameter's compute dtype. By default `T` applies to every leaf; the
  official ASAM code applies it only to the parameters named `weight` (biases
  keep `T = 1`), which `adaptive_mask` expresses: a tree of bools shaped like
  params, or a callable `params -> tree of bools`, True where `T` applies,
  e.g. for Flax kernels only,
  `adaptive_mask=lambda p: jax.tree_util.tree_map_with_path(
  lambda path, _: path[-1].key == "kernel", p)`.
  `normalize_clean=True` mixes the *normalized* clean gradient,
  `(1 - alpha) g / ||g|| + alpha g'`, as the GNP reference code does by default
  (its flag `gnp.norm_perturbations`); the paper's formula is the default
  `normalize_clean=False`.

  The transform needs the gradient at other parameters: call
  `update(grads, state, params, grad_fn=...)` (or `value_fn=`). It goes first
  in `optax.chain`. With `every_k = k`, `g'` is recomputed on one step in k and
  the correction `g' - g` is reused on the others.

  Low-precision params: with bfloat16 params of order 1, `theta + rho g/||g||`
  rounds to the bfloat16 grid, whose spacing (2^-7 near 1) exceeds each
  entry's share of the step once there are more than a few hundred entries:
  with 1,024 entries and `rho = 0.05` the point misses by 99% of the step
  (`tests/test_reliability.py`). `perturb_dtype=jnp.float32` forms the perturbed
  point in float32 and passes it to `grad_fn` as float32 (the loss must accept
  float32 params; Flax modules with `dtype=` set still compute in that
  dtype); `state.perturbation_error` and `state.degenerate_count` show how
  far off the point was.

  Faults (a non-finite `g'` falls back to `g`; a degenerate perturbation is
  counted) are as `gnorm_optax.SecondGradientState` describes.

  Args:
    rho: radius of the ascent step (>= 0), a scalar or a schedule.
    alpha: interpolation weight; the penalty weight is `alpha * rho`.
    adaptive: use ASAM's scale-invariant ascent step.
    eta: ASAM's offset in `T = |theta| + eta`.
    adaptive_mask: with `adaptive`, where `T` applies (a tree of bools or a
      callable returning one; None: everywhere); elsewhere `T = 1`.
    normalize_clean: mix `g / ||g||` instead of `g` (GNP reference code).
    every_k: recompute the extra gradient on one step in `every_k` (>= 1).
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    sync_perturbation: with `axis_name`, perturb with the averaged gradient
      (True) or with each device's own gradient (False: SAM's m-sharpness).
    perturb_dtype: form the perturbed point in this dtype (promoted with each
      parameter's; e.g. `jnp.float32` for bfloat16 params); None: the params'.
    on_nonfinite: a step whose extra gradient is not finite returns `g`
      (`"clean"`) or zeros (`"zero"`), or is not checked (`"propagate"`); see
      `gnorm_optax.SecondGradientState`.
    reuse: with `every_k > 1`, what the steps between two extra gradients
      reuse: the correction `g' - g` (`"correction"`), or LookSAM's
      (`"looksam"`): the part `g_v` of `g'` orthogonal to `g`, rescaled to
      the current gradient, `d = looksam_alpha * ||g|| / ||g_v|| * g_v`.
    looksam_alpha: LookSAM's weight of the reused component (a scalar or a
      schedule).
    ae_threshold: AE-SAM's adaptive policy (None: off): with `mu` and
      `sigma^2` running means (decay `ae_decay`) of `||g||^2` and of its
      squared deviation, a step takes the extra gradient only when
      `||g||^2 >= mu + ae_threshold * sigma` (a scalar or a schedule, e.g.
      rising linearly over training, as the paper schedules it); the other steps
      reuse the cache with `every_k > 1`, else return `g` (plain SGD).
    ae_decay: AE-SAM's decay of the running statistics.
    eps: added to the norm so that a zero gradient gives a zero step.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> loss = lambda p: jnp.sum(p ** 4)
    >>> params = jnp.array([1.0, -0.5])
    >>> tx = gx.penalized_grad(rho=0.1, alpha=0.8)
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> print(updates.round(3))        # 0.2 * g + 0.8 * g(theta + 0.1 g/|g|)
    [ 5.05  -0.531]

  References:
    Zhao, Zhang, Hu, *Penalizing Gradient Norm for Efficiently Improving
    Generalization in Deep Learning*, ICML 2022, https://arxiv.org/abs/2202.03599

    Kwon et al., *ASAM: Adaptive Sharpness-Aware Minimization for
    Scale-Invariant Learning of Deep Neural Networks*, ICML 2021,
    https://arxiv.org/abs/2102.11600

    Liu et al., *Towards Efficient and Scalable Sharpness-Aware
    Minimization*, CVPR 2022, https://arxiv.org/abs/2203.02714 (LookSAM)

    Jiang et al., *An Adaptive Policy to Employ Sharpness-Aware
    Minimization*, ICLR 2023, https://arxiv.org/abs/2304.14647 (AE-SAM)
  """
  _check_step_args("penalized_grad", rho, eta, eps, adaptive, adaptive_mask)
  checks.check_scalar("alpha", alpha, owner="penalized_grad")
  checks.check_choice("reuse", reuse, REUSE)
  checks.check_scalar(
    "looksam_alpha", looksam_alpha, minimum=0.0, owner="penalized_grad"
  )
  checks.check_scalar("ae_decay", ae_decay, minimum=0.0, owner="penalized_grad")
  if isinstance(ae_decay, (int, float)) and not ae_decay < 1:  # not injected
    raise ValueError(f"ae_decay must be < 1, got {ae_decay}; AE-SAM uses 0.9")
  if ae_threshold is not None:
    checks.check_scalar("ae_threshold", ae_threshold, owner="penalized_grad")
  if reuse == "looksam" and normalize_clean:
    raise ValueError(
      "reuse='looksam' reuses a component of g' orthogonal to g, which "
      "normalize_clean's mix does not define: use reuse='correction' with "
      "normalize_clean=True"
    )

  # With alpha = 1 and nothing cached (SAM), the update is g' itself: formed
  # as g + (g' - g), it would keep g alive through the second pass.
  direct = (
    isinstance(alpha, (int, float))
    and alpha == 1
    and not normalize_clean
    and isinstance(every_k, int)
    and every_k == 1
    and ae_threshold is None
  )

  def clean(g, hp):
    return _normalize(g, hp["eps"])[0] if normalize_clean else g

  def correction_fn(probe, g_perturb, g, params, hp):
    step, norm = _perturbation(
      g_perturb,
      params,
      hp["rho"],
      hp["eps"],
      adaptive,
      hp["eta"],
      adaptive_mask,
    )
    probe.lost(jnp.isinf(norm))  # squares overflowed: the step is zero
    if direct:
      return probe(step)
    return jax.tree.map(jnp.subtract, probe(step), clean(g, hp))

  def apply_fn(g, d, hp):
    if direct:
      return d
    return optax.tree.add_scale(clean(g, hp), hp["alpha"], d)

  return base.second_gradient_transformation(
    "penalized_grad",
    correction_fn,
    apply_fn,
    dict(
      rho=rho,
      alpha=alpha,
      eta=eta,
      eps=eps,
      looksam_alpha=looksam_alpha,
      **({} if ae_threshold is None else {"ae_threshold": ae_threshold}),
    ),
    every_k=every_k,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    perturb_dtype=perturb_dtype,
    identity_at_zero=not (normalize_clean or direct),
    on_nonfinite=on_nonfinite,
    **(_LOOKSAM if reuse == "looksam" else {}),
    policy=None if ae_threshold is None else _ae_policy(ae_decay),
  )


def sam(
  rho: optax.ScalarOrSchedule = 0.05,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: Any = None,
  every_k: int | jax.Array = 1,
  axis_name: str | None = None,
  sync_perturbation: bool = True,
  perturb_dtype: Any = None,
  on_nonfinite: str = "clean",
  reuse: str = "correction",
  looksam_alpha: optax.ScalarOrSchedule = 0.7,
  ae_threshold: optax.ScalarOrSchedule | None = None,
  ae_decay: float = 0.9,
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware minimization: the gradient at the adversarial point.

  .. math::
    \theta' = \theta + \rho\, g / (\|g\| + \mathrm{eps}), \quad
    \mathrm{update} = \nabla L(\theta').

  This is `penalized_grad(rho, alpha=1)`; `adaptive=True` is ASAM. Chain it in
  front of the base optimizer, e.g. `optax.chain(gx.sam(0.05), optax.sgd(0.1))`,
  and pass `grad_fn=` (or `value_fn=`) to `update`.

  Compared with `optax.contrib.sam(optimizer, adv_optimizer, sync_period)`:
  that one wraps the optimizer and, by default, takes the adversarial step
  over `sync_period` calls of `update`, the caller computing the gradient at
  the point it is given (with `opaque_mode=True` it calls
  `grad_fn(params, i)` itself). `gx.sam` is a gradient transformation that
  goes in front of any optimizer and takes the adversarial gradient within one
  `update` through `grad_fn(params)`. `optax.chain(gx.sam(rho),
  optax.sgd(lr))` takes the steps of `optax.contrib.sam(optax.sgd(lr),
  optax.chain(optax.contrib.normalize(), optax.sgd(rho)), sync_period=2,
  opaque_mode=True)` (tested step for step) and adds `every_k`, ASAM,
  `axis_name` and the fault guard.

  Where it goes: first. The transforms that must see the raw gradient
  (clipping, `optax.add_decayed_weights`) come after it, or their effect on
  `g` is replaced by `g'`: `chain(add_decayed_weights(wd), sam, sgd)` drops
  the weight decay (use `chain(sam, add_decayed_weights(wd), sgd)` or
  `optax.adamw`), and `chain(optax.adam(lr), sam)` perturbs along Adam's step
  and returns an unscaled gradient, which diverges. Two second-gradient
  transforms chained one after the other raise a ValueError.

  SAM stops where the gradient at the perturbed point vanishes,
  `grad L(theta + rho g/||g||) = 0`, not where `grad L(theta) = 0`: on
  Rosenbrock's curved valley it comes to rest in the flat part of the valley,
  short of the minimum, as the peer implementations do. That is the method
  (it trades loss for flatness), not a fault; with `rho` decayed to zero by a
  schedule, SAM becomes plain gradient descent.

  Low-precision params, `perturb_dtype` and the fault semantics are as in
  `penalized_grad`.

  Args:
    rho: radius of the ascent step (>= 0), a scalar or a schedule.
    adaptive: use ASAM's scale-invariant ascent step.
    eta: ASAM's offset in `T = |theta| + eta`.
    adaptive_mask: with `adaptive`, where `T` applies (see `penalized_grad`).
    every_k: recompute the adversarial gradient on one step in `every_k`.
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    sync_perturbation: with `axis_name`, perturb with the averaged gradient
      (True) or with each device's own gradient (False: m-sharpness).
    perturb_dtype: form the perturbed point in this dtype (see
      `penalized_grad`); None: the params' dtypes.
    on_nonfinite: a step whose adversarial gradient is not finite returns
      `g` (`"clean"`, the default) or zeros (`"zero"`: no copy of `g` is kept
      through the second pass, the memory of `optax.contrib.sam`), or is
      not checked (`"propagate"`: no pass over `g'` either, as
      `optax.contrib.sam`); see `gnorm_optax.SecondGradientState`.
    reuse: with `every_k > 1`, reuse the correction `g' - g` (`"correction"`)
      or LookSAM's rescaled orthogonal component (`"looksam"`; see
      `penalized_grad`).
    looksam_alpha: LookSAM's weight of the reused component.
    ae_threshold: AE-SAM's adaptive policy (see `penalized_grad`).
    ae_decay: AE-SAM's decay of its running statistics.
    eps: added to the norm so that a zero gradient gives a zero step.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> loss = lambda p: jnp.sum(p ** 4)
    >>> params = jnp.array([1.0, -0.5])
    >>> tx = optax.chain(gx.sam(rho=0.1), optax.sgd(0.01))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params,
    ...                            grad_fn=jax.grad(loss))
    >>> print(updates.round(4))        # -0.01 * g(theta + 0.1 g/|g|)
    [-0.0531  0.0054]

  References:
    Foret et al., *Sharpness-Aware Minimization for Efficiently Improving
    Generalization*, ICLR 2021, https://arxiv.org/abs/2010.01412

    Zhao, Zhang, Hu, ICML 2022, https://arxiv.org/abs/2202.03599 (SAM as
    the alpha = 1 case of the gradient-norm penalty).
  """
  checks.check_scalar(
    "rho", rho, minimum=0.0, fix="use rho=0 for no penalty", owner="sam"
  )
  return penalized_grad(
    rho,
    1.0,
    adaptive=adaptive,
    eta=eta,
    adaptive_mask=adaptive_mask,
    every_k=every_k,
    perturb_dtype=perturb_dtype,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    on_nonfinite=on_nonfinite,
    reuse=reuse,
    looksam_alpha=looksam_alpha,
    ae_threshold=ae_threshold,
    ae_decay=ae_decay,
    eps=eps,
  )


def gsam(
  rho: optax.ScalarOrSchedule = 0.05,
  alpha: optax.ScalarOrSchedule = 0.1,
  *,
  adaptive: bool = False,
  eta: float = 0.01,
  adaptive_mask: Any = None,
  every_k: int | jax.Array = 1,
  axis_name: str | None = None,
  sync_perturbation: bool = True,
  perturb_dtype: Any = None,
  on_nonfinite: str = "clean",
  eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Surrogate-gap guided SAM (GSAM): SAM's gradient plus an ascent across it.

  With `g` the incoming gradient and `g' = grad L(theta')` at SAM's point
  `theta' = theta + rho g / (||g|| + eps)`, the clean gradient is split into
  its parts along `g'` and orthogonal to it,

  .. math::
    g_\parallel = (\langle g, g' \rangle / \|g'\|^2)\, g', \qquad
    g_\perp = g - g_\parallel, \qquad
    \mathrm{update} = g' - \alpha\, g_\perp .

  Descending along `g'` lowers the perturbed loss as SAM does; the step
  `-alpha * g_perp` raises the clean loss in a direction that leaves the
  perturbed loss unchanged to first order, so the surrogate gap (perturbed
  minus clean loss, a measure of sharpness) shrinks. `alpha = 0` is SAM; the
  cost is SAM's: one extra gradient (the projection is two inner products).
  A zero `g'` gives `g_parallel = 0`.

  The paper ties `rho` to the learning rate: with the learning rate `lr_t`
  running from `lr_max` down to `lr_min`, `rho_t = rho_min + (rho_max -
  rho_min) (lr_t - lr_min) / (lr_max - lr_min)`. Pass that as the `rho`
  schedule, e.g. for a cosine decay to 0,
  `lr = optax.cosine_decay_schedule(lr_max, steps)` and
  `rho = lambda t: rho_min + (rho_max - rho_min) * lr(t) / lr_max`.
  `adaptive=True` takes ASAM's step (as `penalized_grad`); big_vision's
  `adaptive_perturbation` is another one (`theta + |theta| rho g/||g||`).
  Other arguments, the fault semantics and `every_k` (the correction
  `update - g` is cached) are as in `penalized_grad`.

  Args:
    rho: radius of the ascent step (>= 0), a scalar or a schedule.
    alpha: weight of the ascent along the orthogonal part (>= 0), a scalar
      or a schedule.
    adaptive: use ASAM's scale-invariant ascent step.
    eta: ASAM's offset in `T = |theta| + eta`.
    adaptive_mask: with `adaptive`, where `T` applies (see `penalized_grad`).
    every_k: recompute the adversarial gradient on one step in `every_k`.
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    sync_perturbation: with `axis_name`, perturb with the averaged gradient
      (True) or with each device's own gradient (False: m-sharpness).
    perturb_dtype: form the perturbed point in this dtype (see
      `penalized_grad`); None: the params' dtypes.
    on_nonfinite: a step whose adversarial gradient is not finite returns
      `g` (`"clean"`) or zeros (`"zero"`), or is not checked (`"propagate"`); see
      `gnorm_optax.SecondGradientState`.
    eps: added to the norm so that a zero gradient gives a zero step.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> loss = lambda p: jnp.sum(p ** 4)
    >>> params = jnp.array([1.0, -0.5])
    >>> tx = gx.gsam(rho=0.1, alpha=0.5)
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
    ...                        grad_fn=jax.grad(loss))
    >>> print([f"{u:.3f}" for u in updates])  # g' - 0.5 (g - <g,g'>/|g'|^2 g')
    ['5.318', '-0.491']

  References:
    Zhuang et al., *Surrogate Gap Guided Sharpness-Aware Minimization*,
    ICLR 2022, https://arxiv.org/abs/2203.08065 (big_vision's
    `trainers/proj/gsam/gsam.py` is the authors' JAX code).
  """
  _check_step_args("gsam", rho, eta, eps, adaptive, adaptive_mask)
  checks.check_scalar(
    "alpha", alpha, minimum=0.0, fix="use alpha=0 for SAM", owner="gsam"
  )
  # With nothing cached the update is returned as is (not as g + (update - g)).
  direct = isinstance(every_k, int) and every_k == 1

  def correction_fn(probe, g_perturb, g, params, hp):
    step, norm = _perturbation(
      g_perturb, params, hp["rho"], hp["eps"], adaptive, hp["eta"], adaptive_mask
    )
    probe.lost(jnp.isinf(norm))  # squares overflowed: the step is zero
    g_adv = probe(step)
    sq = real_vdot(g_adv, g_adv)
    along = jnp.where(sq > 0, real_vdot(g, g_adv) / jnp.where(sq > 0, sq, 1.0), 0.0)
    # g' - alpha (g - along g') = (1 + alpha along) g' - alpha g
    a = hp["alpha"]
    update = jax.tree.map(lambda ga, gi: (1 + a * along) * ga - a * gi, g_adv, g)
    return update if direct else jax.tree.map(jnp.subtract, update, g)

  def apply_fn(g, d, hp):
    return d if direct else optax.tree.add(g, d)

  return base.second_gradient_transformation(
    "gsam",
    correction_fn,
    apply_fn,
    dict(rho=rho, alpha=alpha, eta=eta, eps=eps),
    every_k=every_k,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    perturb_dtype=perturb_dtype,
    identity_at_zero=not direct,
    on_nonfinite=on_nonfinite,
  )
