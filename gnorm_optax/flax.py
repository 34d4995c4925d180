"""Flax NNX integration: `grad_fn` / `value_fn` built from a model and a loss.

`nnx.Optimizer.update(model, grads, **kwargs)` forwards keyword arguments to
`tx.update`, and hands the transformation plain arrays (`nnx.as_pure` of the
`wrt` state). The functions here build the matching `grad_fn(params)` and
`value_fn(params)`: they run the loss on a *copy* of the model (`nnx.merge` of
its graph, the given parameters and a snapshot of its other state), so the
extra forward/backward passes never change BatchNorm running statistics,
dropout RNG counters or any other mutable state of `model`.

Build them *before* the clean pass: the snapshot then holds the RNG state the
clean pass starts from, so the perturbed pass draws the same dropout masks (the
finite differences of gradients are only meaningful with the same masks), and
only the clean pass's state updates are kept:

    @nnx.jit
    def train_step(model, optimizer, x, y):
      grad_fn = gnorm_optax.flax.nnx_grad_fn(model, loss_fn, x, y)
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
      return loss
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def nnx_value_fn(
    model: nnx.Module,
    loss_fn: Callable[..., jax.Array],
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> Callable[[Any], jax.Array]:
  r"""The loss as a pure function of the parameters, for `value_fn=`.

  .. math::
    \text{value\_fn}(\theta) = \text{loss\_fn}(\text{model with } \theta,
    \text{*args}, \text{**kwargs})

  evaluated on a copy of `model` whose non-`wrt` state (BatchNorm statistics,
  RNG counters, ...) is the snapshot taken when `nnx_value_fn` is called;
  whatever the loss writes goes to the copy and is discarded.

  Args:
    model: the NNX model; its structure and state are read, never written.
    loss_fn: `loss_fn(model, *args, **kwargs) -> scalar loss`.
    *args: the batch and any other positional arguments of `loss_fn`.
    wrt: the filter of the differentiated state, as in
      `nnx.Optimizer(model, tx, wrt=...)`.
    **kwargs: keyword arguments of `loss_fn`.

  Returns:
    `value_fn(params) -> scalar`, where `params` has the structure of
    `nnx.as_pure(nnx.state(model, wrt))` (what `nnx.Optimizer` passes on).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gnorm_optax.flax import nnx_value_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> value_fn = nnx_value_fn(model, loss_fn, jnp.ones((4, 2)))
    >>> params = nnx.as_pure(nnx.state(model, nnx.Param))
    >>> bool(jnp.allclose(value_fn(params), loss_fn(model, jnp.ones((4, 2)))))
    True

  References:
    Zhao, Zhang, Hu, ICML 2022, https://arxiv.org/abs/2202.03599 and Foret
    et al., ICLR 2021, https://arxiv.org/abs/2010.01412 (the perturbed pass
    this function serves).
  """
  graphdef, _, rest = nnx.split(model, wrt, ...)
  # A snapshot of plain arrays, not the model's Variables: the copy's writes
  # cannot reach `model` (and writing to them under jax.grad would fail).
  rest = nnx.as_pure(rest)

  def value_fn(params: Any) -> jax.Array:
    return loss_fn(nnx.merge(graphdef, params, rest), *args, **kwargs)

  return value_fn


def nnx_grad_fn(
    model: nnx.Module,
    loss_fn: Callable[..., jax.Array],
    *args: Any,
    wrt: Any = nnx.Param,
    **kwargs: Any,
) -> Callable[[Any], Any]:
  r"""The gradient of the loss as a pure function of the parameters: `grad_fn=`.

  .. math::
    \text{grad\_fn}(\theta) = \nabla_\theta\, \text{loss\_fn}(\text{model with }
    \theta, \text{*args}, \text{**kwargs})

  This is `jax.grad(nnx_value_fn(model, loss_fn, *args, wrt=wrt, **kwargs))`:
  side-effect free, with the tree of `nnx.as_pure(nnx.state(model, wrt))`, so
  it plugs into `optimizer.update(model, grads, grad_fn=...)` for every
  second-gradient transform of gnorm_optax.

  Args:
    model: the NNX model; its structure and state are read, never written.
    loss_fn: `loss_fn(model, *args, **kwargs) -> scalar loss`.
    *args: the batch and any other positional arguments of `loss_fn`.
    wrt: the filter of the differentiated state (default `nnx.Param`).
    **kwargs: keyword arguments of `loss_fn`.

  Returns:
    `grad_fn(params) -> grads`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import gnorm_optax as gx
    >>> from gnorm_optax.flax import nnx_grad_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(gx.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> grad_fn = nnx_grad_fn(model, loss_fn, x, y)
    >>> loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
    >>> bool(loss_fn(model, x, y) < loss)
    True

  References:
    Zhao, Zhang, Hu, ICML 2022, https://arxiv.org/abs/2202.03599 ; Karakida
    et al., ICML 2023, https://arxiv.org/abs/2210.02720
  """
  return jax.grad(nnx_value_fn(model, loss_fn, *args, wrt=wrt, **kwargs))
