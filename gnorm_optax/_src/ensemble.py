"""`jax.vmap` over an ensemble with one shared step count."""

from __future__ import annotations

from typing import Any

import jax
import optax

from gnorm_optax._src.base import SecondGradientState


def ensemble_axes(opt_state: optax.OptState, axis: int = 0) -> Any:
  r"""`in_axes` / `out_axes` for `jax.vmap` over an ensemble that keeps `every_k`.

  With `every_k = k` a second-gradient transform decides on `count % k == 0`
  inside `jax.lax.cond`. Under `jax.vmap` over a batch of optimizer states
  the count is batched, so the predicate is batched and JAX computes both
  branches: the extra gradient runs on every step. The members of an ensemble
  step together, so their counts are equal; mapping the states with the
  count of every `gnorm_optax.SecondGradientState` left unbatched (`None`)
  keeps the predicate a scalar and the `cond` a branch, and the ensemble
  pays `1 + 1/k` gradients a step, as one model does. Every other leaf,
  the per-member fault counters and cached corrections included, is mapped
  over `axis`.

  Args:
    opt_state: the optimizer state, or a tree of the same structure (e.g.
      `jax.eval_shape(tx.init, params)`).
    axis: the ensemble axis of the mapped leaves.

  Returns:
    A tree of the structure of `opt_state` whose leaves are `axis`, or
    `None` for the counts of the second-gradient states: pass it as the
    state's entry of `in_axes` and `out_axes` (and as `out_axes` of
    `jax.vmap(tx.init)`, which then leaves the counts unbatched).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> loss = lambda p, x: jnp.sum((p * x - 1.0) ** 2)
    >>> tx = optax.chain(gx.sam(0.05, every_k=5), optax.sgd(0.1))
    >>> members = jnp.stack([jnp.ones(3), 2 * jnp.ones(3)])    # 2 models
    >>> axes = gx.ensemble_axes(jax.eval_shape(tx.init, members))
    >>> state = jax.vmap(tx.init, out_axes=axes)(members)
    >>> def step(p, s, x):
    ...   g = jax.grad(loss)(p, x)
    ...   u, s = tx.update(g, s, p, grad_fn=lambda q: jax.grad(loss)(q, x))
    ...   return optax.apply_updates(p, u), s
    >>> ensemble_step = jax.jit(
    ...     jax.vmap(step, in_axes=(0, axes, 0), out_axes=(0, axes)))
    >>> x = jnp.ones((2, 3))
    >>> members, state = ensemble_step(members, state, x)
    >>> print(state[0].count.shape, members.round(3))    # one shared count
    () [[1.    1.    1.   ]
     [1.794 1.794 1.794]]

  References:
    Foret et al., ICLR 2021, https://arxiv.org/abs/2010.01412 (SAM);
    `jax.lax.cond` under `jax.vmap`:
    https://docs.jax.dev/en/latest/_autosummary/jax.lax.cond.html
  """
  is_state = lambda x: isinstance(x, SecondGradientState)

  def axes_of(node: Any) -> Any:
    if is_state(node):  # a None subtree stays None under tree.map
      return jax.tree.map(lambda _: axis, node._replace(count=None))
    return axis

  return jax.tree.map(axes_of, opt_state, is_leaf=is_state)
