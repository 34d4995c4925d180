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
    H v = \partial_t \nabla L(\theta + t v) |_{t=0},

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
    \mathrm{tr}\, H = E_z[z^T H z], \quad z_i \in \{-1, +1\} \text{ uniformly},

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


def _lanczos_tridiagonal(
  matvec: Callable[[base.Updates], base.Updates],
  v0: base.Updates,
  num_steps: int,
) -> tuple[jax.Array, jax.Array]:
  """`num_steps` Lanczos steps from the unit vector `v0`: `(alpha, beta)` of T.

  Full reorthogonalization (Gram-Schmidt twice) against the stored basis. When
  the Krylov space closes (`beta_j ~ 0`), `beta_j` is set to 0 and the later
  basis vectors to zero, so the rest of `T` is a zero block decoupled from the
  first one (its eigenvectors have no first component: weight 0).
  """
  real_dtype = jnp.result_type(*[jnp.finfo(x.dtype).dtype for x in jax.tree.leaves(v0)])
  eps = jnp.finfo(real_dtype).eps
  hi = jax.lax.Precision.HIGHEST
  m = num_steps

  def coefficients(basis, w):
    return sum(
      jnp.real(jnp.tensordot(jnp.conj(b), x, axes=x.ndim, precision=hi)).astype(
        real_dtype
      )
      for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w), strict=True)
    )

  def orthogonalize(basis, w):
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

  def body(j, state):
    basis, alpha, beta = state
    w = matvec(jax.tree.map(lambda b: b[j], basis))
    w, c = orthogonalize(basis, w)
    alpha = alpha.at[j].set(c[j])
    norm = jnp.sqrt(jnp.maximum(_vdot(w, w), 0.0)).astype(real_dtype)
    scale = jnp.maximum(jnp.max(jnp.abs(alpha)), jnp.max(beta))
    closed = norm <= m * eps * jnp.maximum(scale, norm)
    beta = beta.at[j].set(jnp.where(closed, 0.0, norm))
    inv = jnp.where(closed, 0.0, 1.0 / jnp.where(closed, 1.0, norm))
    basis = jax.tree.map(
      lambda b, x: b.at[j + 1].set(x * inv.astype(x.dtype), mode="drop"), basis, w
    )
    return basis, alpha, beta

  basis = jax.tree.map(lambda x: jnp.zeros((m, *x.shape), x.dtype).at[0].set(x), v0)
  zeros = jnp.zeros((m,), real_dtype)
  _, alpha, beta = jax.lax.fori_loop(
    0, m, canonical_conv.for_xla_cpu(body), (basis, zeros, zeros)
  )
  return alpha, beta


class SpectralDensity(NamedTuple):
  r"""A spectral density estimate: Gauss quadrature nodes and weights per probe.

  Returned by `hessian_spectral_density`. Probe `p` gives the quadrature rule
  `sum_i weights[p, i] f(nodes[p, i]) ~ v_p^T f(H) v_p`, and the estimate of
  the density `phi(t) = (1/n) sum_j delta(t - lambda_j)` of the `n`
  eigenvalues is the average of the probes' rules.

  Attributes:
    nodes: `(num_probes, num_iters)` Ritz values (eigenvalues of the Lanczos
      tridiagonal matrices), ascending per probe.
    weights: `(num_probes, num_iters)` squared first components of the Ritz
      vectors; each row sums to 1.
  """

  nodes: jax.Array
  weights: jax.Array

  def density(self, grid: jax.Array, sigma: float) -> jax.Array:
    r"""The density smoothed by a Gaussian of width `sigma`, at `grid`.

    .. math::
      \hat\phi(t) = \frac{1}{P} \sum_{p=1}^{P} \sum_{i=1}^{m} w_{p,i}\,
      \frac{1}{\sigma\sqrt{2\pi}}
      \exp\Big(-\frac{(t - \theta_{p,i})^2}{2\sigma^2}\Big),

    which integrates to 1 over the real line.

    Args:
      grid: points `t` where to evaluate the density, any shape.
      sigma: the kernel's standard deviation, `> 0`.

    Returns:
      An array shaped like `grid`.
    """
    t = jnp.asarray(grid)[..., None, None]
    z = (t - self.nodes) / sigma
    kernel = jnp.exp(-0.5 * z**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(self.weights * kernel, axis=-1), axis=-1)

  def moment(self, k: int) -> jax.Array:
    r"""The `k`-th spectral moment estimate `mean_p sum_i w_{p,i} theta_{p,i}^k`.

    It estimates `tr(H^k) / n`, exactly per probe (`= v_p^T H^k v_p`) for
    `k <= 2 num_iters - 1`, since an `m`-node Gauss rule is exact for
    polynomials of degree up to `2m - 1`.
    """
    return jnp.mean(jnp.sum(self.weights * self.nodes**k, axis=-1))


def hessian_spectral_density(
  grad_fn: Callable[[base.Params], base.Updates],
  params: base.Params,
  *,
  key: jax.Array,
  num_probes: int = 4,
  num_iters: int = 30,
) -> SpectralDensity:
  r"""Hessian eigenvalue density by stochastic Lanczos quadrature (SLQ).

  The spectral density of the `n x n` Hessian is
  `phi(t) = (1/n) sum_j delta(t - lambda_j)`. For a random unit vector `v`
  with `E[v v^T] = I / n` (a Rademacher vector over `sqrt(n)`),
  `E[v^T f(H) v] = (1/n) sum_j f(lambda_j) = integral f(t) phi(t) dt`. Lanczos
  from `v` (`m = num_iters` steps, exact Hessian-vector products, full
  reorthogonalization) gives the tridiagonal `T_m = S Theta S^T`, and

  .. math::
    v^\top f(H)\, v \approx \sum_{i=1}^{m} w_i f(\theta_i),\qquad
    w_i = s_{1,i}^2,

  the `m`-point Gauss quadrature of the measure `sum_j (u_j^T v)^2
  delta(t - lambda_j)`, exact for every polynomial `f` of degree
  `<= 2m - 1`. Averaging over `num_probes` probes estimates `phi` as a sum of
  weighted point masses at the Ritz values; `SpectralDensity.density` smooths
  them with a Gaussian, as PyHessian does. The extreme Ritz values converge to
  the extreme eigenvalues first, so the support of the estimate shows the
  outliers (the top eigenvalues) and the bulk near zero.

  Cost: `num_probes * num_iters` Hessian-vector products; memory: a basis of
  `num_iters` parameter copies (one probe at a time, `lax.map`). Runs inside
  `jax.jit`. A complex leaf counts as two real parameters.

  Args:
    grad_fn: `params -> gradient of the loss`, e.g. `jax.grad(loss)`.
    params: the point where the Hessian is taken, any pytree of arrays.
    key: a `jax.random` key for the probe vectors.
    num_probes: number of random probes (>= 1).
    num_iters: Lanczos steps per probe, a Python int >= 1, capped at the
      number of real parameters.

  Returns:
    A `SpectralDensity` of nodes and weights, each
    `(num_probes, min(num_iters, n))`, in the real compute dtype (at least
    float32).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> curvatures = jnp.array([4.0, 1.0, 1.0, 0.0])
    >>> loss = lambda p: 0.5 * jnp.sum(curvatures * p ** 2)
    >>> sd = gx.hessian_spectral_density(jax.grad(loss), jnp.ones(4),
    ...                                  key=jax.random.key(0), num_probes=2)
    >>> print(round(float(sd.moment(1)), 3), round(float(sd.moment(2)), 3))
    1.5 4.5
    >>> print(sorted({round(float(x), 3) for x in sd.nodes[0]}))
    [0.0, 1.0, 4.0]

  References:
    Lin, Saad, Yang, *Approximating Spectral Densities of Large Matrices*,
    SIAM Review 2016, https://arxiv.org/abs/1308.5467 ; Ghorbani, Krishnan,
    Xiao, *An Investigation into Neural Net Optimization via Hessian
    Eigenvalue Density*, ICML 2019, https://arxiv.org/abs/1901.10159 ; Yao et
    al., *PyHessian: Neural Networks Through the Lens of the Hessian*, 2020,
    https://arxiv.org/abs/1912.07145
  """
  if int(num_probes) != num_probes or int(num_probes) < 1:
    raise ValueError(f"num_probes must be >= 1, got {num_probes}")
  if int(num_iters) != num_iters or int(num_iters) < 1:
    raise ValueError(f"num_iters must be >= 1, got {num_iters}")
  leaves = jax.tree.leaves(params)
  dim = sum(int(np.size(x)) * (2 if jnp.iscomplexobj(x) else 1) for x in leaves)
  if dim == 0:
    raise ValueError("params has no entries: the Hessian is empty")
  m = min(int(num_iters), dim)
  matvec = _hessian_operator(grad_fn, params)
  like = upcast(params)

  def probe(k):
    v = optax.tree.cast_like(_rademacher_like(k, params), like)
    norm = jnp.sqrt(_vdot(v, v))
    v = jax.tree.map(lambda x: x / norm.astype(x.dtype), v)
    alpha, beta = _lanczos_tridiagonal(matvec, v, m)
    off = beta[:-1]
    t = jnp.diag(alpha) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, s = jnp.linalg.eigh(t)
    return theta, s[0] ** 2

  keys = jax.random.split(key, int(num_probes))
  nodes, weights = jax.lax.map(probe, keys)
  return SpectralDensity(nodes=nodes, weights=weights)


def filter_normalized_direction(
  key: jax.Array,
  params: base.Params,
  *,
  filter_axis: int = -1,
  ignore_vectors: bool = True,
) -> base.Updates:
  r"""A random direction scaled filter by filter to the norms of `params`.

  Li et al.'s filter normalization makes loss-landscape plots comparable
  across networks whose weights have different scales (ReLU nets are
  invariant to rescaling a filter and the next layer): draw
  `d ~ N(0, I)` shaped like `params`, then for every filter `j` of every
  weight array

  .. math::
    d_j \leftarrow \frac{d_j}{\|d_j\|}\,\|\theta_j\|,

  where a filter is the slice of the array at one index of `filter_axis`: the
  weights that make one output channel or neuron (in Flax/Haiku layouts,
  `(..., in, out)`, the last axis, the default). Arrays of rank <= 1 (biases,
  normalization scales) get a zero direction (Li et al.'s default), or with
  `ignore_vectors=False` a direction equal to the parameter itself (their
  code's other option).

  Args:
    key: a `jax.random` key.
    params: the point, any pytree of real arrays.
    filter_axis: the output axis of every array of rank >= 2.
    ignore_vectors: zero direction on arrays of rank <= 1.

  Returns:
    A pytree shaped like `params`, in their dtypes.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> params = {"w": jnp.array([[3.0, 0.0], [4.0, 1.0]]), "b": jnp.ones(2)}
    >>> d = gx.filter_normalized_direction(jax.random.key(0), params)
    >>> print(jnp.round(jnp.linalg.norm(d["w"], axis=0), 3), d["b"])
    [5. 1.] [0. 0.]

  References:
    Li, Xu, Taylor, Studer, Goldstein, *Visualizing the Loss Landscape of
    Neural Nets*, NeurIPS 2018, https://arxiv.org/abs/1712.09913
  """

  def one(k, x):
    x = jnp.asarray(x)
    if x.ndim <= 1:
      return jnp.zeros_like(x) if ignore_vectors else x
    d = jax.random.normal(k, x.shape, jnp.float32)
    axes = tuple(a for a in range(x.ndim) if a != filter_axis % x.ndim)
    norm = lambda y: jnp.sqrt(jnp.sum(jnp.square(y), axis=axes, keepdims=True))  # noqa: E731
    d_norm = norm(d)
    scale = norm(x.astype(jnp.float32)) / jnp.where(d_norm > 0, d_norm, 1.0)
    return (d * scale).astype(x.dtype)

  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(
    treedef, [one(k, x) for k, x in zip(keys, leaves, strict=False)]
  )


class LossLandscape(NamedTuple):
  """A 1-D or 2-D slice of the loss (returned by `loss_landscape`).

  Attributes:
    coords: `(num_points,)` step sizes along each direction.
    values: the loss, `(num_points,)` for one direction, or
      `(num_points, num_points)` with `values[i, j]` at
      `params + coords[i] d_1 + coords[j] d_2` for two.
    directions: the directions `d_1` (and `d_2`), a tuple of pytrees.
  """

  coords: jax.Array
  values: jax.Array
  directions: tuple[base.Updates, ...]


def loss_landscape(
  value_fn: Callable[[base.Params], jax.Array],
  params: base.Params,
  *,
  key: jax.Array | None = None,
  directions: tuple[base.Updates, ...] | None = None,
  dims: int = 1,
  num_points: int = 21,
  span: float = 1.0,
  filter_axis: int = -1,
) -> LossLandscape:
  r"""The loss along one or two directions from `params` (Li et al., 2018).

  .. math::
    f(a) = L(\theta + a\, d_1),\qquad
    f(a, b) = L(\theta + a\, d_1 + b\, d_2),

  on a grid of `num_points` values of `a` (and `b`) evenly spaced in
  `[-span, span]`. The directions are random and filter-normalized
  (`filter_normalized_direction`, one key each) unless given, so a step of 1
  moves every filter by its own norm, and slices of different networks can be
  compared: a flat minimum stays low over a wider `a`. One loss evaluation per
  grid point (`lax.map`, in order); runs inside `jax.jit`.

  Args:
    value_fn: `params -> scalar loss` (the full-batch loss, deterministic).
    params: the centre of the slice.
    key: a `jax.random` key for the random directions (when `directions` is
      None).
    directions: `dims` pytrees shaped like `params`; None draws them.
    dims: 1 or 2.
    num_points: grid points per direction, >= 2.
    span: the largest step, `> 0`.
    filter_axis: the output axis of the weights, for the random directions.

  Returns:
    A `LossLandscape` `(coords, values, directions)`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import gnorm_optax as gx
    >>> loss = lambda p: jnp.sum(p ** 2)   # along d: |p + a d|^2
    >>> ls = gx.loss_landscape(loss, jnp.ones(2), num_points=3,
    ...                        directions=(jnp.array([1.0, 0.0]),))
    >>> print(ls.coords, ls.values)
    [-1.  0.  1.] [1. 2. 5.]

  References:
    Li, Xu, Taylor, Studer, Goldstein, *Visualizing the Loss Landscape of
    Neural Nets*, NeurIPS 2018, https://arxiv.org/abs/1712.09913
  """
  if dims not in (1, 2):
    raise ValueError(f"dims must be 1 or 2, got {dims}")
  if int(num_points) != num_points or int(num_points) < 2:
    raise ValueError(f"num_points must be an integer >= 2, got {num_points}")
  if not (np.ndim(span) == 0 and np.isfinite(span) and span > 0):
    raise ValueError(f"span must be a finite number > 0, got {span}")
  if directions is None:
    if key is None:
      raise ValueError(
        "key is required when directions is not given: pass "
        "key=jax.random.key(0), or directions=(d1,) / (d1, d2)"
      )
    directions = tuple(
      filter_normalized_direction(k, params, filter_axis=filter_axis)
      for k in jax.random.split(key, dims)
    )
  directions = tuple(directions)
  if len(directions) != dims:
    raise ValueError(f"directions must hold dims={dims} pytrees, got {len(directions)}")
  for d in directions:
    checks.check_same_tree(
      "directions", d, params, "each direction must be shaped like params", dtypes=False
    )
  coords = jnp.linspace(-span, span, int(num_points), dtype=jnp.float32)
  grid = jnp.stack(jnp.meshgrid(*([coords] * dims), indexing="ij"), -1)

  def at(ab):
    point = params
    for i, d in enumerate(directions):
      point = jax.tree.map(lambda p, x, i=i: p + (ab[i] * x).astype(p.dtype), point, d)
    return value_fn(point)

  values = jax.lax.map(canonical_conv.for_xla_cpu(at), grid.reshape(-1, dims))
  return LossLandscape(
    coords=coords, values=values.reshape(grid.shape[:-1]), directions=directions
  )
