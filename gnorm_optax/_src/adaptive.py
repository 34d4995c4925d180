"""Adaptive gradient regularization (AGR) and its AdamW / Adan aliases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gnorm_optax._src import base


def _agr_leaf(g: jax.Array) -> jax.Array:
  """`g - g * |g| / sum|g|` for one tensor; an all-zero tensor stays zero."""
  x = g.astype(base.compute_dtype(g.dtype))
  a = jnp.abs(x)
  total = jnp.sum(a)
  safe = jnp.where(total > 0, total, jnp.ones_like(total))
  # The coefficient first: `1 - |g|/sum|g|` is in [0, 1] after rounding (the
  # sum of non-negatives is >= each term), so no entry can change sign and a
  # lone nonzero entry maps to exactly 0; `x - x*a/safe` could overshoot by an ulp.
  return (x * (1 - a / safe)).astype(g.dtype)


def adaptive_gradient_regularization() -> optax.GradientTransformationExtraArgs:
  r"""Adaptive gradient regularization: shrink each tensor's large entries.

  For every leaf (tensor) `g` of the gradient,

  .. math::
    \alpha = \frac{|g|}{\sum |g|},\qquad g \leftarrow g - \alpha \odot g
    = g \odot \Big(1 - \frac{|g|}{\sum |g|}\Big).

  The coefficient `alpha` is in `[0, 1]`, so each entry keeps its sign and the
  entries that dominate the tensor are damped most. An all-zero tensor stays
  zero (never NaN). The map is scale-equivariant: `AGR(c g) = c AGR(g)`. Put it
  in front of the optimizer, as `agr_adamw` and `agr_adan` do.

  A tensor with a single entry always gets `alpha = 1`: its gradient is zeroed
  on every step, so a scalar parameter (a learned temperature, a gate) does not
  train under AGR; leave such leaves out with `optax.masked` or
  `optax.partition`. Large tensors are barely touched (each entry is a small
  share of the sum); the factor bites on small ones such as biases.

  Returns:
    An optax.GradientTransformationExtraArgs (stateless; extra arguments such
    as `grad_fn=` or `value=` are ignored, so it chains with anything).

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> tx = gx.adaptive_gradient_regularization()
    >>> g = {"w": jnp.array([3.0, -1.0]), "b": jnp.zeros(2)}
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> print(updates["w"], updates["b"])   # 3 - 3*3/4, -1 + 1*1/4
    [ 0.75 -0.75] [0. 0.]

  References:
    Jiang et al., *Adaptive Gradient Regularization: A Faster and Generalizable
    Optimization Technique for Deep Neural Networks*, 2024,
    https://arxiv.org/abs/2407.16944
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return jax.tree.map(_agr_leaf, updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agr_adamw(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype=None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask=None,
    *,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with adaptive gradient regularization in front.

  `optax.chain(adaptive_gradient_regularization(), optax.adamw(...))`: the
  gradient of each tensor is rescaled by `1 - |g| / sum|g|` before AdamW's
  moments; decoupled weight decay is applied by AdamW as usual. Arguments and
  defaults are those of `optax.adamw`.

  Args:
    learning_rate: a scalar or a schedule.
    b1: exponential decay rate of the first moment.
    b2: exponential decay rate of the second moment.
    eps: added to the denominator.
    eps_root: added to the second moment inside the square root.
    mu_dtype: dtype of the first moment.
    weight_decay: decoupled weight decay rate.
    mask: which parameters get weight decay (see `optax.adamw`).
    nesterov: use Nesterov momentum.

  Returns:
    An optax.GradientTransformationExtraArgs.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> params = jnp.array([1.0, 2.0])
    >>> tx = gx.agr_adamw(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(float(jnp.sum(params ** 2)) < 0.5)
    True

  References:
    Jiang et al., 2024, https://arxiv.org/abs/2407.16944
  """
  return optax.chain(
      adaptive_gradient_regularization(),
      optax.adamw(
          learning_rate,
          b1=b1,
          b2=b2,
          eps=eps,
          eps_root=eps_root,
          mu_dtype=mu_dtype,
          weight_decay=weight_decay,
          mask=mask,
          nesterov=nesterov,
      ),
  )


def agr_adan(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.98,
    b2: float = 0.92,
    b3: float = 0.99,
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    mask=None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adan with adaptive gradient regularization in front.

  `optax.chain(adaptive_gradient_regularization(), optax.adan(...))`, with the
  arguments and defaults of `optax.adan`.

  Args:
    learning_rate: a scalar or a schedule.
    b1: decay rate of the gradient moment.
    b2: decay rate of the gradient-difference moment.
    b3: decay rate of the squared-term moment.
    eps: added to the denominator.
    eps_root: added inside the square root.
    weight_decay: decoupled weight decay rate.
    mask: which parameters get weight decay (see `optax.adan`).

  Returns:
    An optax.GradientTransformationExtraArgs.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> params = jnp.array([1.0, 2.0])
    >>> tx = gx.agr_adan(learning_rate=0.1)
    >>> state = tx.init(params)
    >>> for _ in range(50):
    ...   updates, state = tx.update(2 * params, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(float(jnp.sum(params ** 2)) < 0.5)
    True

  References:
    Jiang et al., 2024, https://arxiv.org/abs/2407.16944

    Xie et al., *Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models*, 2022, https://arxiv.org/abs/2208.06677
  """
  return optax.chain(
      adaptive_gradient_regularization(),
      optax.adan(
          learning_rate,
          b1=b1,
          b2=b2,
          b3=b3,
          eps=eps,
          eps_root=eps_root,
          weight_decay=weight_decay,
          mask=mask,
      ),
  )
