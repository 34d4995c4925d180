"""Gradient regularization `L + gamma/2 ||grad L||^2`: finite-difference and exact."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gnorm_optax._src import base
from gnorm_optax._src import checks
from gnorm_optax._src import sharpness
from gnorm_optax._src.tree_math import upcast

SCHEMES = ("forward", "backward", "central")


def hessian_direction(probe, direction, g, params, epsilon, scheme):
  """Estimates `H @ direction`.

  `"exact"` differentiates `grad_fn` forward-over-reverse (`jax.jvp`); the
  finite differences step `epsilon` along `direction` and, for the one-sided
  schemes, difference against the clean gradient `g` (no third gradient).
  """
  if scheme == "exact":
    return upcast(sharpness.hvp(probe.grad_fn, params, direction))
  # epsilon * g can fall below the params' resolution in any dtype: measure.
  at = lambda s: probe(direction, s, measure=True)
  if scheme == "forward":
    hi, lo, width = at(epsilon), g, epsilon
  elif scheme == "backward":
    hi, lo, width = g, at(-epsilon), epsilon
  else:
    hi, lo = at(epsilon), at(-epsilon)
    width = 2 * epsilon
  return jax.tree.map(lambda a, b: (a - b) / width, hi, lo)


def _gr_transformation(name, scheme, hyperparams, **kwargs):
  """`g + gamma * d` with `d ~= H @ g`: shared by both public transforms."""

  def correction_fn(probe, g_perturb, g, params, hp):
    return hessian_direction(probe, g_perturb, g, params, hp.get("epsilon"), scheme)

  def apply_fn(g, d, hp):
    return optax.tree.add_scale(g, hp["gamma"], d)

  return base.second_gradient_transformation(
    name, correction_fn, apply_fn, hyperparams, **kwargs
  )


def finite_difference_gr(
  gamma: optax.ScalarOrSchedule,
  epsilon: optax.ScalarOrSchedule,
  *,
  scheme: str = "forward",
  every_k: int | jax.Array = 1,
  axis_name: str | None = None,
  sync_perturbation: bool = True,
  perturb_dtype: Any = None,
  on_nonfinite: str = "clean",
) -> optax.GradientTransformationExtraArgs:
  r"""Finite-difference gradient regularization (F-GR, B-GR, central).

  The gradient of `L + (gamma/2) ||grad L||^2` is `g + gamma H g`. The
  Hessian-vector product is replaced by a difference of gradients along `g`:

  .. math::
    \text{forward:} \quad & g + (\gamma / \epsilon)
      (\nabla L(\theta + \epsilon g) - g) \\
    \text{backward:} \quad & g + (\gamma / \epsilon)
      (g - \nabla L(\theta - \epsilon g)) \\
    \text{central:} \quad & g + (\gamma / 2 \epsilon)
      (\nabla L(\theta + \epsilon g) - \nabla L(\theta - \epsilon g))

  Forward and backward need one extra gradient and have `O(epsilon)` error;
  central needs two and has `O(epsilon^2)` error. Karakida et al. show that the
  forward scheme (ascent, then descent: SAM-like) biases training further
  toward flat, rich-regime solutions as `epsilon` grows, the backward scheme
  the other way, and that flooding performs F-GR implicitly.

  Pass `grad_fn=` (or `value_fn=`) to `update`; the transform goes first in
  `optax.chain`. With `every_k = k` the difference is recomputed on one step in
  k and reused on the others.

  Precision: `theta + epsilon g` is formed in the params' dtype, so the
  difference sees only what survives rounding. In float32 with params of order
  1, `epsilon * |g|` must stay well above 1e-7 (at `epsilon = 1e-12`,
  `theta + epsilon g == theta` and the update is `g` exactly); in bfloat16 the
  estimate of `H g` is about 10% off at usual `epsilon` and in float16 about
  1%. Such steps are counted in `state.degenerate_count`, with the point's
  relative error in `state.perturbation_error`; `perturb_dtype=jnp.float32`
  forms the point in float32 for low-precision params (the loss must accept
  them).
  Faults are as `gnorm_optax.SecondGradientState` describes.

  Args:
    gamma: regularization strength (>= 0), a scalar or a schedule.
    epsilon: finite-difference step (> 0), a scalar or a schedule.
    scheme: `"forward"`, `"backward"` or `"central"`.
    every_k: recompute the extra gradient(s) on one step in `every_k` (>= 1).
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    sync_perturbation: with `axis_name`, step along the averaged gradient
      (True) or along each device's own gradient (False).
    perturb_dtype: form the perturbed point(s) in this dtype (promoted with
      each parameter's; e.g. `jnp.float32` for bfloat16 params); None: the
      params' dtypes.
    on_nonfinite: a step whose extra gradient is not finite returns `g`
      (`"clean"`) or zeros (`"zero"`), or is not checked (`"propagate"`); see
      `gnorm_optax.SecondGradientState`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> loss = lambda p: 0.5 * jnp.sum(jnp.array([1.0, 3.0]) * p ** 2)
    >>> params = jnp.array([1.0, 1.0])   # g = [1, 3], H g = [1, 9]
    >>> tx = gx.finite_difference_gr(gamma=0.1, epsilon=0.01)
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
    ...                        grad_fn=jax.grad(loss))
    >>> print(updates.round(3))      # g + 0.1 * H g (exact for a quadratic)
    [1.1 3.9]

  References:
    Karakida, Takase, Hayase, Osawa, *Understanding Gradient Regularization in
    Deep Learning: Efficient Finite-Difference Computation and Implicit Bias*,
    ICML 2023, https://arxiv.org/abs/2210.02720
  """
  checks.check_scalar(
    "gamma",
    gamma,
    minimum=0.0,
    fix="use gamma=0 for no penalty",
    owner="finite_difference_gr",
  )
  checks.check_scalar(
    "epsilon",
    epsilon,
    minimum=0.0,
    strict=True,
    fix="the finite-difference step must be positive, e.g. epsilon=0.01",
    owner="finite_difference_gr",
  )
  checks.check_choice("scheme", scheme, SCHEMES)
  return _gr_transformation(
    "finite_difference_gr",
    scheme,
    dict(gamma=gamma, epsilon=epsilon),
    every_k=every_k,
    axis_name=axis_name,
    sync_perturbation=sync_perturbation,
    perturb_dtype=perturb_dtype,
    on_nonfinite=on_nonfinite,
  )


def gradient_regularization(
  gamma: optax.ScalarOrSchedule,
  *,
  every_k: int | jax.Array = 1,
  axis_name: str | None = None,
  on_nonfinite: str = "clean",
) -> optax.GradientTransformationExtraArgs:
  r"""Exact gradient regularization: `g + gamma * H @ g` by double backprop.

  .. math::
    \nabla (L + (\gamma / 2) \|\nabla L\|^2) = g + \gamma H g,

  with `H g` computed exactly by forward-over-reverse differentiation of
  `grad_fn` (`jax.jvp`). It is the reference that `finite_difference_gr`
  approximates; it costs about as much as two or three gradients and keeps
  the forward-mode tangents in memory. Faults are as
  `gnorm_optax.SecondGradientState` describes (a non-finite `H g` falls back
  to `g`; no perturbed point is formed, so no step is degenerate).

  Args:
    gamma: regularization strength (>= 0), a scalar or a schedule.
    every_k: recompute `H g` on one step in `every_k` (>= 1).
    axis_name: inside `shard_map`/`pmap`, average the gradients over this axis.
    on_nonfinite: a step whose `H g` is not finite returns `g` (`"clean"`)
      or zeros (`"zero"`), or is not checked (`"propagate"`); see
      `gnorm_optax.SecondGradientState`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> loss = lambda p: jnp.sum(jnp.sin(p))
    >>> params = jnp.array([0.5, 1.0])
    >>> tx = gx.gradient_regularization(gamma=0.1)
    >>> updates, _ = tx.update(jax.grad(loss)(params), tx.init(params), params,
    ...                        grad_fn=jax.grad(loss))
    >>> print(updates.round(4))      # cos(p) - 0.1 * sin(p) * cos(p)
    [0.8355 0.4948]

  References:
    Karakida, Takase, Hayase, Osawa, ICML 2023, https://arxiv.org/abs/2210.02720

    Drucker and Le Cun, *Improving generalization performance using double
    backpropagation*, IEEE Trans. Neural Networks, 1992.
  """
  checks.check_scalar(
    "gamma",
    gamma,
    minimum=0.0,
    fix="use gamma=0 for no penalty",
    owner="gradient_regularization",
  )
  return _gr_transformation(
    "gradient_regularization",
    "exact",
    dict(gamma=gamma),
    every_k=every_k,
    axis_name=axis_name,
    on_nonfinite=on_nonfinite,
  )
