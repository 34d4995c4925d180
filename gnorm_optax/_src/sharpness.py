"""Diagnostics of flatness: Hessian-vector products, top eigenvalues, trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gnorm_optax._src import base
from gnorm_optax._src import canonical_conv
from gnorm_optax._src import checks
from gnorm_optax._src.tree_math import match_varying
from gnorm_optax._src.tree_math import upcast


def hvp(
  grad_fn: Callable[[base.Params], base.Updates],
  params: base.Params,
  vector: base.Updates,
) -> base.Updates:
  r"""Hessian-vector product `H v` of the loss whose gradient is `grad_fn`.

  .. math::
    H v = \frac{\partial}{\partial t} \nabla L(\theta + t v) \Big|_{t=0},

  computed exactly by forward-over-reverse differentiation (`jax.jvp` of
  `grad_fn`): about the cost of two gradients, no Hessian is formed. For
  complex params, `grad_fn` follows optax's convention, as every transform of
  the library takes it: `conj(jax.grad(loss))`, the gradient over the
  (real, imaginary) pairs; `H v` is then that problem's Hessian-vector product.

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
  checks.check_same_tree(
    "vector", vector, params, "vector must be shaped like params", dtypes=False
  )
  # Inside shard_map the tangent must vary over the axes params vary over.
  tangent = match_varying(optax.tree.cast_like(vector, params), params)
  return jax.jvp(grad_fn, (params,), (tangent,))[1]


def _vdot(a: base.Updates, b: base.Updates) -> jax.Array:
  """Real inner product `sum(real(conj(a) * b))` over the leaves, >= float32.

  A complex leaf counts as its real and imaginary parts, two real coordinates.
  """
  return jnp.real(optax.tree.vdot(upcast(a), upcast(b)))


def _hessian_operator(
  grad_fn: Callable[[base.Params], base.Updates], params: base.Params
) -> Callable[[base.Updates], base.Updates]:
  """`v -> H v` in compute dtypes, `H` the real Hessian (complex leaves: 2 coords).

  `grad_fn` follows optax's convention, the one every transform of the
  library takes: for a complex leaf it returns `df/dx + i df/dy`, the
  conjugate of what `jax.grad` gives. Its derivative along `v` is then `H v`
  written as a complex number, symmetric for the real inner product `_vdot`.
  """

  def matvec(v):
    return upcast(hvp(grad_fn, params, v))

  return matvec


def _rademacher(key: jax.Array, shape, dtype, *, out_sharding=None):
  """Random signs in float32; a complex dtype gets signs in both parts."""
  del out_sharding  # The probes are small diagnostic vectors.
  if not jnp.issubdtype(dtype, jnp.complexfloating):
    return jax.random.rademacher(key, shape, jnp.float32)
  k_re, k_im = jax.random.split(key)
  return jax.lax.complex(
    jax.random.rademacher(k_re, shape, jnp.float32),
    jax.random.rademacher(k_im, shape, jnp.float32),
  )


def _rademacher_like(key: jax.Array, params: base.Params) -> base.Updates:
  """Random signs shaped like `params` (complex leaves: signs in both parts)."""
  return optax.tree.random_like(key, params, sampler=_rademacher)


class EigenInfo(NamedTuple):
  """How a Lanczos eigenvalue estimate ended (returned with `return_info=True`).

  Attributes:
    converged: bool scalar. True when every returned Ritz value `theta_i` meets
      the residual bound `|beta_m s_{m,i}| <= tol * |theta_i|`, or when the
      Krylov space closed (an invariant subspace, `beta_m ~ 0`: the Ritz values
      are then eigenvalues up to rounding). False when `num_iters` steps ran
      out first: the value is the best estimate so far, a lower bound in exact
      arithmetic.
    residual: the residual bound `|beta_m s_{m,i}|` of each returned value, an
      upper bound on its distance to an eigenvalue of the Hessian; shaped like
      the returned eigenvalue(s).
    num_iters: int32 scalar, the number of Lanczos steps taken, i.e. of
      Hessian-vector products.
  """

  converged: jax.Array
  residual: jax.Array
  num_iters: jax.Array


def _check_lanczos_args(num_iters: int, tol: float) -> int:
  if int(num_iters) != num_iters or int(num_iters) < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  if not isinstance(tol, jax.core.Tracer) and not (
    np.ndim(tol) == 0 and np.isfinite(tol) and tol >= 0
  ):
    raise ValueError(f"tol must be a finite scalar >= 0, got {tol}")
  return int(num_iters)


def _lanczos_top(
  grad_fn: Callable[[base.Params], base.Updates],
  params: base.Params,
  key: jax.Array,
  k: int,
  num_iters: int,
  tol: float,
) -> tuple[jax.Array, EigenInfo]:
  """Top-`k` Ritz values (descending) of the Hessian by Lanczos, and the info.

  Full reorthogonalization (classical Gram-Schmidt, twice) against the stored
  basis `V`, one leaf of shape `(m, *leaf.shape)` per parameter leaf in its
  compute dtype. Step `j` (0-based) applies `H` to `v_j`, stores `alpha_j`,
  `beta_j = ||w||` and `v_{j+1} = w / beta_j`, and computes the Ritz values of
  the `(j+1) x (j+1)` tridiagonal matrix with `eigh` on an `m x m` padding
  whose inactive diagonal lies below every active eigenvalue (Gershgorin).
  """
  leaves = jax.tree.leaves(params)
  dim = sum(int(np.size(x)) * (2 if jnp.iscomplexobj(x) else 1) for x in leaves)
  if dim == 0:
    raise ValueError("params has no entries: the Hessian is empty")
  if int(k) != k or not 1 <= k <= min(num_iters, dim):
    raise ValueError(
      f"k must be an integer in [1, {min(num_iters, dim)}], got {k}: at most "
      f"num_iters = {num_iters} and the {dim} real parameters"
    )
  m = min(num_iters, dim)  # A Krylov space has at most `dim` dimensions.
  like = upcast(params)
  real_dtype = jnp.result_type(
    *[jnp.finfo(x.dtype).dtype for x in jax.tree.leaves(like)]
  )
  eps = jnp.finfo(real_dtype).eps
  hi = jax.lax.Precision.HIGHEST
  matvec = _hessian_operator(grad_fn, params)

  def coefficients(basis, w):  # <V_i, w> for every row i, shape (m,).
    return sum(
      jnp.real(jnp.tensordot(jnp.conj(b), x, axes=x.ndim, precision=hi)).astype(
        real_dtype
      )
      for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w), strict=True)
    )

  def orthogonalize(basis, w):  # Twice is enough (Giraud et al., 2005).
    total = jnp.zeros((m,), real_dtype)
    for _ in range(2):
      c = coefficients(basis, w)
      w = jax.tree.map(
        lambda x, b, c=c: x - jnp.tensordot(c.astype(b.dtype), b, axes=1, precision=hi),
        w,
        basis,
      )
      total = total + c
    return w, total

  def normalized(w):
    n = jnp.sqrt(jnp.maximum(_vdot(w, w), 0.0))
    return jax.tree.map(lambda x: x / jnp.where(n > 0, n, 1.0).astype(x.dtype), w)

  def ritz(alpha, beta, d):  # Top-k Ritz values and residual bounds of T_d.
    idx = jnp.arange(m)
    active = idx < d
    off = jnp.where(idx[:-1] < d - 1, beta[:-1], 0.0)
    lowest = jnp.min(jnp.where(active, alpha, jnp.inf)) - 2 * jnp.max(
      jnp.abs(off), initial=0.0
    )
    diag = jnp.where(active, alpha, lowest - 1 - jnp.abs(lowest))
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, s = jnp.linalg.eigh(t)  # Ascending; the padding comes first.
    top = theta[::-1][:k]
    last = s[d - 1, ::-1][:k]  # Last active component of each Ritz vector.
    return top, jnp.abs(beta[d - 1] * last)

  def body(state):
    j, basis, alpha, beta, _, _, _, _ = state
    d = j + 1
    w = matvec(jax.tree.map(lambda b: b[j], basis))
    w, c = orthogonalize(basis, w)  # Rows of the basis past j are zero.
    alpha = alpha.at[j].set(c[j])  # v_j^T H v_j.
    norm = jnp.sqrt(jnp.maximum(_vdot(w, w), 0.0)).astype(real_dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(alpha)), jnp.maximum(jnp.max(beta), norm))
    closed = norm <= m * eps * scale  # Invariant subspace (or H = 0).
    restart = closed & (d < k)  # Fewer than k Ritz values: need a new direction.
    beta = beta.at[j].set(jnp.where(restart, 0.0, norm))
    top, residual = ritz(alpha, beta, d)
    converged = (d >= k) & (closed | jnp.all(residual <= tol * jnp.abs(top)))

    def fresh(_):
      r = optax.tree.random_like(jax.random.fold_in(key, d), like)
      return normalized(orthogonalize(basis, r)[0])

    # With k = 1 there is always a Ritz value: no restart (and no branch).
    nxt = jax.lax.cond(restart, fresh, normalized, w) if k > 1 else normalized(w)
    basis = jax.tree.map(lambda b, x: b.at[d].set(x, mode="drop"), basis, nxt)
    done = converged | (d >= m)
    return d, basis, alpha, beta, top, residual, converged, done

  v0 = normalized(optax.tree.random_like(key, like))
  basis = jax.tree.map(lambda x: jnp.zeros((m, *x.shape), x.dtype).at[0].set(x), v0)
  zeros = jnp.zeros((m,), real_dtype)
  init = (
    jnp.zeros((), jnp.int32),
    basis,
    zeros,
    zeros,
    jnp.zeros((k,), real_dtype),
    jnp.zeros((k,), real_dtype),
    jnp.asarray(False),
    jnp.asarray(False),
  )
  # Loop bodies are nested computations: keep their convolutions fast on CPU.
  steps, _, _, _, top, residual, converged, _ = jax.lax.while_loop(
    lambda state: ~state[-1], canonical_conv.for_xla_cpu(body), init
  )
  return top, EigenInfo(converged=converged, residual=residual, num_iters=steps)


def hessian_top_eigenvalue(
  grad_fn: Callable[[base.Params], base.Updates],
  params: base.Params,
  *,
  key: jax.Array,
  num_iters: int = 30,
  tol: float = 1e-3,
  return_info: bool = False,
) -> jax.Array | tuple[jax.Array, EigenInfo]:
  r"""Largest (most positive) eigenvalue of the Hessian, by Lanczos.

  The sharpness `lambda_max(H)` of the loss at `params` is the usual measure of
  how flat a minimum is: SAM and the gradient-norm penalty aim to lower it.
  "Top" means the largest *algebraic* eigenvalue, the most positive one, not
  the one of largest magnitude: at a saddle with curvatures 5 and -5 it is 5.
  The answer is negative only when every eigenvalue is.

  The Lanczos algorithm, on exact Hessian-vector products (`hvp`), builds an
  orthonormal basis `V_m = [v_1, ..., v_m]` of the Krylov space
  `span{v_1, H v_1, ..., H^{m-1} v_1}` from a random unit `v_1`, in which `H`
  is tridiagonal:

  .. math::
    H V_m = V_m T_m + \beta_m v_{m+1} e_m^\top,\qquad
    T_m = \begin{pmatrix} \alpha_1 & \beta_1 & & \\
                          \beta_1 & \alpha_2 & \ddots & \\
                          & \ddots & \ddots & \beta_{m-1} \\
                          & & \beta_{m-1} & \alpha_m \end{pmatrix},

  with `alpha_j = v_j^T H v_j` and `beta_j = ||H v_j - alpha_j v_j -
  beta_{j-1} v_{j-1}||`. The eigenvalues `theta_i` of `T_m = S Theta S^T`
  (`jnp.linalg.eigh`) are the Ritz values; each Ritz pair
  `(theta_i, V_m s_i)` has residual

  .. math::
    \| H V_m s_i - \theta_i V_m s_i \| = |\beta_m s_{m,i}|,

  so an eigenvalue of `H` lies within `|beta_m s_{m,i}|` of `theta_i`. The
  iteration stops as soon as the top Ritz value `theta` has
  `|beta_m s_m| <= tol * |theta|`, when the Krylov space closes (`beta_m ~ 0`,
  an invariant subspace: `theta` is then exact up to rounding, e.g. a 2 x 2
  Hessian after 2 steps), or after `num_iters` steps. The top Ritz value never
  exceeds `lambda_max` and grows with `m`; the extreme eigenvalues converge
  first, at a rate set by the gap to the next one relative to the spread of the
  spectrum, much faster than power iteration, whose vector `H^{m-1} v_1` lies
  in the same Krylov space (so Lanczos is never worse) and which converges to
  the eigenvalue of largest magnitude instead. Each new vector is
  reorthogonalized against the whole stored basis (full reorthogonalization,
  Gram-Schmidt twice), which keeps `V_m` orthonormal in floating point and the
  Ritz values free of spurious copies.

  Determinism: the random start vector (from `key`) only changes the path;
  once converged the value agrees across keys to within `tol` (relative), and
  usually far closer, since the error of a Ritz value is about the square of
  its residual over the gap to the next eigenvalue. Only a start vector with
  almost no component along the top eigenvector, which has probability close
  to 0, could make a smaller eigenvalue look converged.

  Cost: one Hessian-vector product (about two gradients) per step, at most
  `num_iters` of them, plus `O(m * n)` flops of reorthogonalization for `n`
  parameters, and an `m x m` `eigh` per step. Memory: the basis is stored, one
  array of shape `(m, *leaf.shape)` per parameter leaf in its compute dtype (at
  least float32), so `O(m * n)`: about `num_iters` copies of the parameters; lower
  `num_iters` for a very large model. Runs inside `jax.jit` (a
  `lax.while_loop`). A complex leaf counts as two real parameters (its real and
  imaginary parts): the Hessian is that of the loss over the reals, with
  `grad_fn` in optax's convention, as the transforms take it
  (`conj(jax.grad(loss))` for complex params; `jax.grad(loss)` for real ones).

  Args:
    grad_fn: `params -> gradient of the loss`, e.g. `jax.grad(loss)`.
    params: the point where the Hessian is taken, any pytree of arrays.
    key: a `jax.random` key for the start vector.
    num_iters: the most Lanczos steps (Hessian-vector products), a static
      Python int >= 1, capped at the number of real parameters. The basis is
      allocated for all of them whatever the early stop, so this also sets the
      memory. The default 30 leaves a margin over what was measured at
      `tol = 1e-3`: 8-10 steps for the 30-parameter tanh MLP of the tests (a
      well-separated top eigenvalue, typical of neural-network Hessians), 14 for
      a top 2.5 % above the next on a spectrum in `[-1, 4]`, 24-27 for a top 3 %
      above the next on `[-1, 1]`. A spectrum that reaches much further below
      zero than the top reaches above it converges more slowly (45-58 steps
      when it reaches -9 times the top): check `info.converged`.
    tol: relative tolerance of the residual bound, `>= 0`.
    return_info: also return an `EigenInfo` (converged, residual, steps).

  Returns:
    A scalar in the real compute dtype of the parameters (float32 unless they
    are float64): the top Ritz value, a lower bound on the largest eigenvalue
    that is within `info.residual` of an eigenvalue. With `return_info=True`,
    the pair `(eigenvalue, info)`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> # Curvatures 5, -5 and 1: power iteration oscillates between +-5.
    >>> loss = lambda p: 0.5 * (5.0 * p[0] ** 2 - 5.0 * p[1] ** 2 + p[2] ** 2)
    >>> lam, info = gx.hessian_top_eigenvalue(jax.grad(loss), jnp.ones(3),
    ...                                       key=jax.random.key(0),
    ...                                       return_info=True)
    >>> print(round(float(lam), 3), bool(info.converged), int(info.num_iters))
    5.0 True 3

  References:
    Lanczos, *An iteration method for the solution of the eigenvalue problem
    of linear differential and integral operators*, J. Res. Nat. Bur.
    Standards 45, 1950; Golub & Van Loan, *Matrix Computations*, 4th ed. 2013,
    ch. 10 (the Lanczos process, reorthogonalization, the residual bound);
    Yao et al., *PyHessian: Neural Networks Through the Lens of the Hessian*,
    2020, https://arxiv.org/abs/1912.07145 ; Ghorbani et al., *An
    Investigation into Neural Net Optimization via Hessian Eigenvalue
    Density*, ICML 2019, https://arxiv.org/abs/1901.10159 ; Foret et al.,
    ICLR 2021, https://arxiv.org/abs/2010.01412 (sharpness and
    generalization).
  """
  num_iters = _check_lanczos_args(num_iters, tol)
  top, info = _lanczos_top(grad_fn, params, key, 1, num_iters, tol)
  info = info._replace(residual=info.residual[0])
  return (top[0], info) if return_info else top[0]


def hessian_top_eigenvalues(
  grad_fn: Callable[[base.Params], base.Updates],
  params: base.Params,
  *,
  key: jax.Array,
  k: int,
  num_iters: int = 50,
  tol: float = 1e-3,
  return_info: bool = False,
) -> jax.Array | tuple[jax.Array, EigenInfo]:
  r"""The `k` largest (most positive) eigenvalues of the Hessian, by Lanczos.

  The same Lanczos iteration as `hessian_top_eigenvalue` (see there for the
  math, the cost and the memory), returning the `k` largest Ritz values
  `theta_1 >= ... >= theta_k` of the tridiagonal `T_m`. It stops when every one
  of them has the residual bound `|beta_m s_{m,i}| <= tol * |theta_i|`, when
  the Krylov space closes with at least `k` Ritz values, or after `num_iters`
  steps. The next eigenvalues converge more slowly than the top one (on the
  30-parameter MLP of the tests: about 20 steps for the top 4, against 8-10 for
  the top 1), hence the larger default `num_iters = 50`, at 50 copies of the
  parameters in memory.

  Multiplicity: from one start vector Lanczos sees one direction of each
  eigenspace, so a repeated eigenvalue (exactly repeated, as in a symmetric
  toy problem) is found once and the next distinct eigenvalue takes its second
  slot. When the Krylov space closes before `k` Ritz values exist, the
  iteration goes on from a fresh random vector orthogonal to the basis, which
  finds further copies.

  Args:
    grad_fn: `params -> gradient of the loss`, e.g. `jax.grad(loss)`.
    params: the point where the Hessian is taken, any pytree of arrays.
    key: a `jax.random` key for the start vector.
    k: how many eigenvalues, `1 <= k <= min(num_iters, number of real
      parameters)`.
    num_iters: the most Lanczos steps (Hessian-vector products), a Python int
      (capped at the number of real parameters).
    tol: relative tolerance of the residual bounds, `>= 0`.
    return_info: also return an `EigenInfo` whose `residual` has shape `(k,)`.

  Returns:
    An array of shape `(k,)`, descending, in the real compute dtype of the
    parameters; with `return_info=True`, the pair `(eigenvalues, info)`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> curvatures = jnp.array([5.0, -5.0, 3.0, 1.0, 0.5])
    >>> loss = lambda p: 0.5 * jnp.sum(curvatures * p ** 2)
    >>> top = gx.hessian_top_eigenvalues(jax.grad(loss), jnp.ones(5),
    ...                                  key=jax.random.key(0), k=3)
    >>> print([round(float(x), 3) for x in top])
    [5.0, 3.0, 1.0]

  References:
    Lanczos 1950; Golub & Van Loan, *Matrix Computations*, 4th ed. 2013,
    ch. 10; Ghorbani et al., ICML 2019, https://arxiv.org/abs/1901.10159 ;
    Yao et al., PyHessian, 2020, https://arxiv.org/abs/1912.07145 (top-k
    eigenvalues of neural-network Hessians).
  """
  num_iters = _check_lanczos_args(num_iters, tol)
  top, info = _lanczos_top(grad_fn, params, key, k, num_iters, tol)
  return (top, info) if return_info else top


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
  The trace (the sum of the curvatures) is a second measure of flatness. A
  complex leaf counts as two real parameters (its probe has random signs in
  both parts), so the trace is that of the Hessian over the reals.

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

  matvec = _hessian_operator(grad_fn, params)

  def sample(k):
    z = _rademacher_like(k, params)
    return _vdot(z, matvec(z))

  keys = jax.random.split(key, int(num_samples))
  return jnp.mean(jax.lax.map(canonical_conv.for_xla_cpu(sample), keys))
