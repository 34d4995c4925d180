"""Diagnostics of flatness: Hessian-vector products, top eigenvalue, trace."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from gnorm_optax._src import base
from gnorm_optax._src import canonical_conv


def hvp(
    grad_fn: Callable[[base.Params], base.Updates],
    params: base.Params,
    vector: base.Updates,
) -> base.Updates:
  r"""Hessian-vector product `H v` of the loss whose gradient is `grad_fn`.

  .. math::
    H v = \frac{\partial}{\partial t} \nabla L(\theta + t v) \Big|_{t=0},

  computed exactly by forward-over-reverse differentiation (`jax.jvp` of
  `grad_fn`): about the cost of two gradients, no Hessian is formed.

  Args:
    grad_fn: `params -> gradient of the loss`, e.g. `jax.grad(loss)`.
    params: the point `theta`, any pytree of arrays.
    vector: the direction `v`, a pytree shaped like `params`.

  Returns:
    `H v`, a pytree shaped like `params`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> loss = lambda p: p[0] ** 2 + 3 * p[0] * p[1]   # H = [[2, 3], [3, 0]]
    >>> print(gx.hvp(jax.grad(loss), jnp.ones(2), jnp.array([1.0, 0.0])))
    [2. 3.]

  References:
    Pearlmutter, *Fast Exact Multiplication by the Hessian*, Neural
    Computation 1994. Used by Karakida et al., ICML 2023,
    https://arxiv.org/abs/2210.02720 as the exact gradient-regularization term.
  """
  base.check_same_tree("vector", vector, params, "vector must be shaped like params",
                       dtypes=False)
  # Inside shard_map the tangent must vary over the axes params vary over.
  tangent = base.match_varying(base.cast_like(vector, params), params)
  return jax.jvp(grad_fn, (params,), (tangent,))[1]


def _vdot(a: base.Updates, b: base.Updates) -> jax.Array:
  return sum(
      jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _random_like(key: jax.Array, params: base.Params, rademacher: bool) -> base.Updates:
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  draw = jax.random.rademacher if rademacher else jax.random.normal
  return jax.tree.unflatten(
      treedef,
      [draw(k, x.shape, jnp.float32) for k, x in zip(keys, leaves)],
  )


def hessian_top_eigenvalue(
    grad_fn: Callable[[base.Params], base.Updates],
    params: base.Params,
    *,
    key: jax.Array,
    num_iters: int = 20,
) -> jax.Array:
  r"""Largest-magnitude eigenvalue of the Hessian by power iteration.

  Starting from a random unit vector `v_0`, iterate
  `v_{i+1} = H v_i / ||H v_i||` with exact Hessian-vector products; the
  estimate is the Rayleigh quotient `v^T H v`. The largest eigenvalue
  (sharpness) is the usual measure of how flat a minimum is: SAM and the
  gradient-norm penalty aim to lower it. Power iteration converges to the
  eigenvalue of largest magnitude, at a rate set by the gap to the next one.

  Args:
    grad_fn: `params -> gradient of the loss`, e.g. `jax.grad(loss)`.
    params: the point where the Hessian is taken.
    key: a `jax.random` key for the start vector.
    num_iters: number of Hessian-vector products (>= 1).

  Returns:
    A float32 scalar: the estimated top eigenvalue.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> loss = lambda p: 0.5 * (5.0 * p[0] ** 2 + p[1] ** 2)   # eigenvalues 5, 1
    >>> lam = gx.hessian_top_eigenvalue(jax.grad(loss), jnp.ones(2),
    ...                                 key=jax.random.key(0), num_iters=50)
    >>> print(round(float(lam), 3))
    5.0

  References:
    Yao et al., *PyHessian: Neural Networks Through the Lens of the Hessian*,
    2020, https://arxiv.org/abs/1912.07145 ; Foret et al., ICLR 2021,
    https://arxiv.org/abs/2010.01412 (sharpness and generalization).
  """
  if int(num_iters) < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")

  def normalize(v):
    n = jnp.sqrt(_vdot(v, v))
    return jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1.0), v)

  def body(_, v):
    return normalize(base.upcast(hvp(grad_fn, params, v)))

  v0 = normalize(_random_like(key, params, rademacher=False))
  # Loop bodies are nested computations: keep their convolutions fast on CPU.
  v = jax.lax.fori_loop(0, int(num_iters) - 1, canonical_conv.for_xla_cpu(body), v0)
  return _vdot(v, base.upcast(hvp(grad_fn, params, v)))


def hessian_trace(
    grad_fn: Callable[[base.Params], base.Updates],
    params: base.Params,
    *,
    key: jax.Array,
    num_samples: int = 32,
) -> jax.Array:
  r"""Hutchinson's estimate of the Hessian trace.

  .. math::
    \operatorname{tr} H = \mathbb{E}_z\big[z^\top H z\big],\qquad
    z_i \in \{-1, +1\} \text{ uniformly},

  averaged over `num_samples` Rademacher vectors, one Hessian-vector product
  each. The estimate is unbiased; its spread shrinks like `1/sqrt(num_samples)`.
  The trace (the sum of the curvatures) is a second measure of flatness.

  Args:
    grad_fn: `params -> gradient of the loss`, e.g. `jax.grad(loss)`.
    params: the point where the Hessian is taken.
    key: a `jax.random` key for the probe vectors.
    num_samples: number of probe vectors (>= 1).

  Returns:
    A float32 scalar: the estimated trace.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> loss = lambda p: jnp.sum(jnp.array([1.0, 2.0, 3.0]) * p ** 2)  # tr H = 12
    >>> tr = gx.hessian_trace(jax.grad(loss), jnp.zeros(3),
    ...                       key=jax.random.key(0), num_samples=4)
    >>> print(round(float(tr), 3))   # exact here: H is diagonal
    12.0

  References:
    Hutchinson, *A stochastic estimator of the trace of the influence matrix
    for Laplacian smoothing splines*, 1990; Yao et al., PyHessian, 2020,
    https://arxiv.org/abs/1912.07145
  """
  if int(num_samples) < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")

  def sample(k):
    z = _random_like(k, params, rademacher=True)
    return _vdot(z, base.upcast(hvp(grad_fn, params, z)))

  keys = jax.random.split(key, int(num_samples))
  return jnp.mean(jax.lax.map(canonical_conv.for_xla_cpu(sample), keys))
