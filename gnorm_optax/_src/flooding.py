"""Flooding: keep the training loss near a flood level."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnorm_optax._src import base
from gnorm_optax._src import checks
from gnorm_optax._src.tree_math import compute_dtype


class FloodingState(NamedTuple):
  """State of `flooding`: the int32 step count that indexes the schedule."""

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def flooding(level: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  r"""Flooding: the gradient of `|L - b| + b` for flood level `b`.

  .. math::
    \nabla (|L - b| + b) = \mathrm{sign}(L - b)\, g.

  Above the flood level this is plain descent; below it the gradient flips and
  the step ascends, so the loss floats around `b`. Karakida et al. show that a
  descent step followed by an ascent step performs forward finite-difference
  gradient regularization implicitly. The loss comes from the `value=` extra
  argument: `tx.update(grads, state, params, value=loss)`.

  Args:
    level: the flood level `b` (>= 0), a scalar or a schedule.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> tx = gx.flooding(level=0.1)
    >>> g = jnp.array([1.0, -2.0])
    >>> print(tx.update(g, tx.init(g), value=jnp.array(0.05))[0])
    [-1.  2.]

  References:
    Ishida et al., *Do We Need Zero Training Loss After Achieving Zero Training
    Error?*, ICML 2020, https://arxiv.org/abs/2002.08709

    Karakida, Takase, Hayase, Osawa, ICML 2023, https://arxiv.org/abs/2210.02720
  """
  checks.check_scalar("level", level, minimum=0.0)

  def init_fn(params):
    del params
    return FloodingState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, value=None, **extra_args):
    del params, extra_args
    if value is None:
      raise ValueError(
        "flooding needs the loss: pass tx.update(grads, state, params, value=loss)"
      )
    value = jnp.asarray(value)
    if value.ndim != 0:
      raise ValueError(f"value must be the scalar loss, got shape {value.shape}")
    b = base.evaluate({"level": level}, state.count)["level"]
    sign = jnp.sign(value.astype(compute_dtype(value.dtype)) - b)
    # +-1 or 0 is exact in every dtype: multiply in the gradient's own dtype.
    updates = jax.tree.map(lambda g: sign.astype(g.dtype) * g, updates)
    return updates, FloodingState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
