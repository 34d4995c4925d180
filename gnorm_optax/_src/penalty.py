"""Gradient-norm penalty (GNP) and SAM as optax transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gnorm_optax._src import base


def _normalize(g: base.Updates, eps: jax.Array) -> base.Updates:
  norm = base.global_norm(g)
  return jax.tree.map(lambda x: x / (norm + eps), g)


def _perturbation(
    g: base.Updates, params: base.Params, rho, eps, adaptive: bool, eta
) -> base.Updates:
  """`rho * g / ||g||`, or ASAM's `rho * T^2 g / ||T g||` with `T = |theta| + eta`."""
  if not adaptive:
    return jax.tree.map(lambda x: rho * x, _normalize(g, eps))
  t = jax.tree.map(lambda p: jnp.abs(p.astype(jnp.float32)) + eta, params)
  tg = jax.tree.map(jnp.multiply, t, g)
  norm = base.global_norm(tg)
  return jax.tree.map(lambda ti, tgi: rho * ti * tgi / (norm + eps), t, tg)


def penalized_grad(
    rho: optax.ScalarOrSchedule = 0.05,
    alpha: optax.ScalarOrSchedule = 0.8,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    normalize_clean: bool = False,
    every_k: int = 1,
    axis_name: str | None = None,
    sync_perturbation: bool = True,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient-norm penalty (GNP): the gradient of `L + lambda * ||grad L||`.

  With `g = grad L(theta)` (the incoming updates) and the extra gradient
  `g' = grad L(theta')` taken at

  .. math::
    \theta' = \theta + \rho \frac{g}{\|g\| + \epsilon},

  the output is the first-order approximation of the penalized gradient

  .. math::
    (1 - \alpha)\, g + \alpha\, g' \approx g + \alpha\rho\, H \frac{g}{\|g\|}
    = \nabla\big(L + \lambda \|\nabla L\|\big),\qquad \lambda = \alpha\rho.

  `alpha = 1` is SAM; `alpha = 0` or `rho = 0` gives `g` back exactly.
  `||.||` is the global L2 norm over the whole tree, computed in float32 at
  least. `adaptive=True` takes ASAM's scale-invariant step
  `theta' = theta + rho * T^2 g / ||T g||` with `T = |theta| + eta`.
  `normalize_clean=True` mixes the *normalized* clean gradient,
  `(1 - alpha) g / ||g|| + alpha g'`, as the GNP reference code does by default
  (its flag `gnp.norm_perturbations`); the paper's formula is the default
  `normalize_clean=False`.

  The transform needs the gradient at other parameters: call
  `update(grads, state, params, grad_fn=...)` (or `value_fn=`). It goes first
  in `optax.chain`. With `every_k = k`, `g'` is recomputed on one step in k and
  the correction `g' - g` is reused on the others.

  If `g'` is not finite, the step returns `g` and counts it in
  `state.nonfinite_count`; a non-finite `g` is passed through, not hidden
  (wrap the chain in `optax.apply_if_finite` to skip such steps).

  Args:
    rho: radius of the ascent step (>= 0), a scalar or a schedule.
    alpha: interpolation weight; the penalty weight is `alpha * rho`.
    adaptive: use ASAM's scale-invariant ascent step.
    eta: ASAM's offset in `T = |theta| + eta`.
    normalize_clean: mix `g / ||g||` instead of `g` (GNP reference code).
    every_k: recompute the extra gradient on one step in `every_k` (>= 1).
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    sync_perturbation: with `axis_name`, perturb with the averaged gradient
      (True) or with each device's own gradient (False: SAM's m-sharpness).
    eps: added to the norm so that a zero gradient gives a zero step.

  Returns:
    An optax.GradientTransformationExtraArgs.

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
  """
  base.check_scalar("rho", rho, minimum=0.0, fix="use rho=0 for no penalty")
  base.check_scalar("alpha", alpha)
  base.check_scalar("eta", eta, minimum=0.0)
  base.check_scalar("eps", eps, minimum=0.0)

  def clean(g, hp):
    return _normalize(g, hp["eps"]) if normalize_clean else g

  def correction_fn(grad_fn, g_perturb, g, params, hp):
    step = _perturbation(
        g_perturb, params, hp["rho"], hp["eps"], adaptive, hp["eta"]
    )
    perturbed = base.shifted(params, step)
    return jax.tree.map(jnp.subtract, base.upcast(grad_fn(perturbed)), clean(g, hp))

  def apply_fn(g, d, hp):
    return base.axpy(hp["alpha"], d, clean(g, hp))

  return base.second_gradient_transformation(
      "penalized_grad",
      correction_fn,
      apply_fn,
      dict(rho=rho, alpha=alpha, eta=eta, eps=eps),
      every_k=every_k,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
  )


def sam(
    rho: optax.ScalarOrSchedule = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    every_k: int = 1,
    axis_name: str | None = None,
    sync_perturbation: bool = True,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Sharpness-aware minimization: the gradient at the adversarial point.

  .. math::
    \theta' = \theta + \rho \frac{g}{\|g\| + \epsilon},\qquad
    \text{update} = \nabla L(\theta').

  This is `penalized_grad(rho, alpha=1)`; `adaptive=True` is ASAM. Chain it in
  front of the base optimizer, e.g. `optax.chain(gx.sam(0.05), optax.sgd(0.1))`,
  and pass `grad_fn=` (or `value_fn=`) to `update`. A non-finite `g'` falls
  back to `g` (counted in `state.nonfinite_count`); a non-finite `g` is passed
  through.

  Args:
    rho: radius of the ascent step (>= 0), a scalar or a schedule.
    adaptive: use ASAM's scale-invariant ascent step.
    eta: ASAM's offset in `T = |theta| + eta`.
    every_k: recompute the adversarial gradient on one step in `every_k`.
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    sync_perturbation: with `axis_name`, perturb with the averaged gradient
      (True) or with each device's own gradient (False: m-sharpness).
    eps: added to the norm so that a zero gradient gives a zero step.

  Returns:
    An optax.GradientTransformationExtraArgs.

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
  return penalized_grad(
      rho,
      1.0,
      adaptive=adaptive,
      eta=eta,
      every_k=every_k,
      axis_name=axis_name,
      sync_perturbation=sync_perturbation,
      eps=eps,
  )
