"""Adaptive gradient regularization (AGR) and its AdamW / Adan aliases."""

from __future__ import annotations

import numbers
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gnorm_optax._src import base
from gnorm_optax._src.tree_math import abs_sq
from gnorm_optax._src.tree_math import compute_dtype


def _agr_leaf(g: jax.Array) -> jax.Array:
  """`g - g * |g| / sum|g|` for one tensor; an all-zero tensor stays zero."""
  x = g.astype(compute_dtype(g.dtype))
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
    \alpha = |g| / \sum |g|, \quad
    g \leftarrow g - \alpha \odot g = g \odot (1 - |g| / \sum |g|).

  The coefficient `alpha` is in `[0, 1]`, so each entry keeps its sign and the
  entries that dominate the tensor are damped most. An all-zero tensor stays
  zero (never NaN). The map is scale-equivariant: `AGR(c g) = c AGR(g)`. Put it
  in front of the optimizer, as `agr_adamw` and `agr_adan` do.

  A tensor whose gradient has a single nonzero entry gets `alpha = 1` there
  and maps to zero: this is the published formula (hjiang24/AGR-method,
  `AGR.py`), not a fault. A tensor with a single entry is always in that case:
  its gradient is zeroed on every step, so a scalar parameter (a learned
  temperature, a gate) does not train under AGR; leave such leaves out with
  `optax.masked` or `optax.partition`. Large tensors are barely touched (each entry is a small
  share of the sum); the factor bites on small ones such as biases.

  Returns:
    An `optax.GradientTransformationExtraArgs` (stateless; extra arguments such
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
    An `optax.GradientTransformationExtraArgs`.

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


# ----------------------------------------------------------------------------
# Adan as in the paper (Xie et al., Algorithm 1) and its official code.
# ----------------------------------------------------------------------------


class _ScaleByAdanPaperState(NamedTuple):
  """State of `_scale_by_adan_paper`.

  Attributes:
    count: number of updates done so far (int32).
    m: moving average of the gradient.
    v: moving average of the gradient difference `g_k - g_{k-1}`.
    n: moving average of `|g_k + b2 (g_k - g_{k-1})|^2` (real dtype).
    prev_grad: the gradient of the previous step (unused on the first one).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax
  m: optax.Updates
  v: optax.Updates
  n: optax.Updates
  prev_grad: optax.Updates


def _real_dtype(dtype) -> jnp.dtype:
  """The real counterpart of `dtype` (`complex64 -> float32`)."""
  return jnp.zeros((), dtype).real.dtype


def _scale_by_adan_paper(
  b1: float = 0.98,
  b2: float = 0.92,
  b3: float = 0.99,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  mu_dtype: Any = None,
) -> optax.GradientTransformation:
  r"""The Adan direction of the official code (sail-sg/Adan, `adan.py`).

  In optax's decay convention (`b_i = 1 - beta_i` of the paper), with
  `d_k = g_k - g_{k-1}` and `d_1 = 0`:

  .. math::
    m_k = b_1 m_{k-1} + (1 - b_1) g_k,\quad
    v_k = b_2 v_{k-1} + (1 - b_2) d_k,\quad
    n_k = b_3 n_{k-1} + (1 - b_3) |g_k + b_2 d_k|^2,

    u_k = \frac{m_k / (1 - b_1^k) + b_2\, v_k / (1 - b_2^k)}
              {\sqrt{n_k / (1 - b_3^k) + \epsilon_{root}} + \epsilon}.

  The moments start at zero; `m`, `v` are kept in `mu_dtype` (default: the
  params' dtype), `n` in the params' real dtype, the math runs in at least
  float32 and `u` has the dtype of the incoming gradient.

  Args:
    b1: decay rate of the gradient moment.
    b2: decay rate of the gradient-difference moment.
    b3: decay rate of the squared-term moment.
    eps: added to the root of the bias-corrected `n`.
    eps_root: added to the bias-corrected `n` inside the root.
    mu_dtype: dtype of `m` and `v`.

  Returns:
    An optax.GradientTransformation.

  References:
    Xie et al., 2022, https://arxiv.org/abs/2208.06677
  """
  if mu_dtype is not None:
    mu_dtype = jax.dtypes.canonicalize_dtype(mu_dtype)

  def init_fn(params):
    def zeros(p, dtype):  # a fresh buffer for every leaf and field
      return jnp.zeros(jnp.shape(p), dtype)

    def mu(p):
      return zeros(p, jnp.result_type(p) if mu_dtype is None else mu_dtype)

    return _ScaleByAdanPaperState(
      count=jnp.zeros([], jnp.int32),
      m=jax.tree.map(mu, params),
      v=jax.tree.map(mu, params),
      n=jax.tree.map(lambda p: zeros(p, _real_dtype(jnp.result_type(p))), params),
      prev_grad=jax.tree.map(lambda p: zeros(p, jnp.result_type(p)), params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    first = state.count == 0

    def leaf(g, m, v, n, prev):
      cdt = compute_dtype(g.dtype)
      rdt = _real_dtype(cdt)
      c1, c2, c3, e, er = (
        jnp.asarray(x).astype(rdt) for x in (b1, b2, b3, eps, eps_root)
      )
      k = count.astype(rdt)
      gc = g.astype(cdt)
      d = jnp.where(first, jnp.zeros_like(gc), gc - prev.astype(cdt))
      m = c1 * m.astype(cdt) + (1 - c1) * gc
      v = c2 * v.astype(cdt) + (1 - c2) * d
      n = c3 * n.astype(rdt) + (1 - c3) * abs_sq(gc + c2 * d)
      m_hat = m / (1 - c1**k)
      v_hat = v / (1 - c2**k)
      n_hat = n / (1 - c3**k)
      u = (m_hat + c2 * v_hat) / (jnp.sqrt(n_hat + er) + e)
      return u.astype(g.dtype), m, v, n, gc

    grads, treedef = jax.tree.flatten(updates)
    fields = (state.m, state.v, state.n, state.prev_grad)
    outs = [
      leaf(*args)
      for args in zip(grads, *(jax.tree.leaves(f) for f in fields), strict=True)
    ]
    u, m, v, n, g = (
      jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(5)
    )
    new_state = _ScaleByAdanPaperState(
      count=count,
      m=optax.tree.cast_like(m, state.m),
      v=optax.tree.cast_like(v, state.v),
      n=optax.tree.cast_like(n, state.n),
      prev_grad=optax.tree.cast_like(g, state.prev_grad),
    )
    return u, new_state

  return optax.GradientTransformation(init_fn, update_fn)


class _ProximalStepState(NamedTuple):
  """State of `_proximal_step`.

  Attributes:
    count: number of updates done so far (int32); schedules are evaluated at it.
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as in optax


def _is_zero_constant(x: Any) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool) and x == 0


def _decay_flags(mask: Any, params: Any) -> Any:
  """A bool for every leaf of `params`: does it get weight decay?"""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  tree = mask(params) if callable(mask) else mask
  return jax.tree.map(
    lambda flag, sub: jax.tree.map(lambda _: bool(flag), sub), tree, params
  )


def _proximal_step(
  learning_rate: optax.ScalarOrSchedule,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
  *,
  proximal: bool = True,
) -> optax.GradientTransformation:
  r"""The learning-rate step and the weight decay of official Adan.

  With `eta = learning_rate(k)` and `lambda = weight_decay(k)` (counted from 0),
  the returned updates `U` give, through `optax.apply_updates`,

  .. math::
    \theta + U = \frac{\theta - \eta u}{1 + \eta \lambda}
    \quad\text{(proximal)},\qquad
    \theta + U = (1 - \eta \lambda)\, \theta - \eta u
    \quad\text{(not proximal)},

  i.e. `U = -eta (u + lambda theta) / (1 + eta lambda)` or
  `U = -eta (u + lambda theta)`. Leaves that `mask` leaves out get `U = -eta u`.

  Args:
    learning_rate: a scalar or a schedule.
    weight_decay: a scalar or a schedule.
    mask: a tree of bools (a prefix of the params) or a callable returning one.
    proximal: the proximal step (default) rather than the decoupled one.

  Returns:
    An optax.GradientTransformation.

  References:
    Xie et al., 2022, https://arxiv.org/abs/2208.06677
  """
  no_decay = _is_zero_constant(weight_decay)

  def init_fn(params):
    del params
    return _ProximalStepState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    hp = base.evaluate(
      {"learning_rate": learning_rate, "weight_decay": weight_decay}, state.count
    )
    lr, wd = hp["learning_rate"], hp["weight_decay"]
    new_state = _ProximalStepState(count=optax.safe_increment(state.count))
    if no_decay:
      return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates), new_state
    if params is None:
      raise ValueError(
        "adan with weight_decay needs the current params: call "
        "tx.update(grads, state, params)"
      )

    def leaf(u, p, flag):
      cdt = compute_dtype(u.dtype)
      rdt = _real_dtype(cdt)
      eta = lr.astype(rdt)
      if not flag:
        return (-eta * u.astype(cdt)).astype(u.dtype)
      lam = wd.astype(rdt)
      step = -eta * (u.astype(cdt) + lam * p.astype(cdt))
      if proximal:
        step = step / (1 + eta * lam)
      return step.astype(u.dtype)

    return jax.tree.map(leaf, updates, params, _decay_flags(mask, params)), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adan(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.98,
  b2: float = 0.92,
  b3: float = 0.99,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask: Any = None,
  *,
  proximal: bool = True,
  mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adan as in its paper (Algorithm 1) and official code, not `optax.adan`.

  With the gradient `g_k`, `d_k = g_k - g_{k-1}` (`d_1 = 0`), moments starting
  at zero, a learning rate `eta_k` and a weight decay `lambda_k` (both may be
  schedules of the step `k - 1 = 0, 1, ...`):

  .. math::
    m_k &= b_1 m_{k-1} + (1 - b_1) g_k, \\
    v_k &= b_2 v_{k-1} + (1 - b_2) d_k, \\
    n_k &= b_3 n_{k-1} + (1 - b_3) (g_k + b_2 d_k)^2, \\
    u_k &= (m_k / (1 - b_1^k) + b_2 v_k / (1 - b_2^k))
           / (\sqrt{n_k / (1 - b_3^k) + \mathrm{eps}_\mathrm{root}} + \mathrm{eps}), \\
    \theta_{k+1} &= (\theta_k - \eta_k u_k) / (1 + \eta_k \lambda_k)
    \quad \text{(proximal, the default), or} \\
    \theta_{k+1} &= (1 - \eta_k \lambda_k) \theta_k - \eta_k u_k
    \quad \text{(decoupled, proximal=False)}.

  (For complex parameters the square is `|.|^2`; `n` is kept real.)

  This is Algorithm 1 of Xie et al. in optax's decay convention: the paper's
  `(beta_1, beta_2, beta_3) = (0.02, 0.08, 0.01)` weight the *new* term, so
  `b_i = 1 - beta_i`, i.e. `(b1, b2, b3) = (0.98, 0.92, 0.99)`, and the
  paper's coefficient `1 - beta_2` of the difference in `n` and in the update
  is `b2 = 0.92`. Bias correction, `eps` outside the root and the proximal
  weight decay (`no_prox=False`) are those of the official PyTorch code
  (sail-sg/Adan), which the AGR paper used (hjiang24/AGR-method,
  `Adan_AGR.py`). The paper itself writes no bias correction and
  `eta / sqrt(n_k + eps)`.

  It differs from `optax.adan` (optax 0.2.8, an open upstream discrepancy;
  fixed here and tested against a NumPy transcription of the official code in
  `tests/test_adan.py`) in:

  - the coefficient of `d_k` in `n` and of `v` in the update: `b2` here, as in
    the paper; `optax.adan` uses `1 - b2` (0.08 instead of 0.92);
  - weight decay: proximal here by default, decoupled in `optax.adan`
    (`proximal=False` gives optax's `(1 - eta lambda) theta - eta u`);
  - the default `eps_root`: 0 here (the official code has none), `1e-8` in
    `optax.adan`. `eps` is outside the root in both.

  Args:
    learning_rate: a scalar or a schedule.
    b1: decay rate of the gradient moment (`1 - beta_1` of the paper).
    b2: decay rate of the gradient-difference moment (`1 - beta_2`).
    b3: decay rate of the squared-term moment (`1 - beta_3`).
    eps: added to the root of the bias-corrected `n`.
    eps_root: added to the bias-corrected `n` inside the root.
    weight_decay: weight decay rate `lambda` (a scalar or a schedule).
    mask: which parameters get weight decay: a tree of bools (a prefix of the
      params) or a callable returning one, as in `optax.adan`.
    proximal: proximal weight decay `(theta - eta u) / (1 + eta lambda)` as in
      the paper (default); `False` is the official code's `no_prox=True`.
    mu_dtype: dtype of the moments `m` and `v` (default: the params' dtype).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import gnorm_optax as gx
    >>> params = jnp.array([1.0, -2.0])
    >>> tx = gx.adan(learning_rate=0.1)
    >>> updates, state = tx.update(2 * params, tx.init(params), params)
    >>> print(updates)   # first step: -lr * g / (|g| + eps), entry by entry
    [-0.1  0.1]

  References:
    Xie et al., *Adan: Adaptive Nesterov Momentum Algorithm for Faster
    Optimizing Deep Models*, 2022, https://arxiv.org/abs/2208.06677
  """
  return optax.chain(
    _scale_by_adan_paper(
      b1=b1, b2=b2, b3=b3, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype
    ),
    _proximal_step(learning_rate, weight_decay, mask, proximal=proximal),
  )


def agr_adan(
  learning_rate: optax.ScalarOrSchedule,
  b1: float = 0.98,
  b2: float = 0.92,
  b3: float = 0.99,
  eps: float = 1e-8,
  eps_root: float = 0.0,
  weight_decay: optax.ScalarOrSchedule = 0.0,
  mask=None,
  *,
  proximal: bool = True,
  mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adan (as in its paper and official code) with AGR in front.

  `optax.chain(adaptive_gradient_regularization(), gx.adan(...))`: each
  tensor's gradient is first rescaled by AGR,

  .. math::
    g \leftarrow g \odot (1 - |g| / \sum |g|),

  then `gnorm_optax.adan` takes the step: Algorithm 1 of the Adan paper as
  its official code implements it, which is what the AGR paper used
  (hjiang24/AGR-method, `Adan_AGR.py`). It is *not* `optax.adan`, which
  weights the gradient difference by `1 - b2` where the paper uses `b2`, and
  whose weight decay is decoupled rather than proximal; see `adan` for the
  math and every difference. Arguments are those of `adan`.

  Args:
    learning_rate: a scalar or a schedule.
    b1: decay rate of the gradient moment (`1 - beta_1` of the paper).
    b2: decay rate of the gradient-difference moment (`1 - beta_2`).
    b3: decay rate of the squared-term moment (`1 - beta_3`).
    eps: added to the root of the bias-corrected `n`.
    eps_root: added to the bias-corrected `n` inside the root.
    weight_decay: weight decay rate `lambda` (a scalar or a schedule).
    mask: which parameters get weight decay (see `adan`).
    proximal: proximal weight decay as in the paper (default); `False` is
      the decoupled one.
    mu_dtype: dtype of the moments `m` and `v` (default: the params' dtype).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

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
    adan(
      learning_rate,
      b1=b1,
      b2=b2,
      b3=b3,
      eps=eps,
      eps_root=eps_root,
      weight_decay=weight_decay,
      mask=mask,
      proximal=proximal,
      mu_dtype=mu_dtype,
    ),
  )
