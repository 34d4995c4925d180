"""Flatness diagnostics against the exact Hessian of a small model."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm_optax as gx

N = 30  # The quadratic test problems share compilations: N parameters, and
KEYS = jax.random.split(jax.random.key(42), 32)  # these 32 start keys.


@functools.cache
def small_model():
  k = jax.random.split(jax.random.key(0), 4)
  params = {
    "w1": jax.random.normal(k[0], (3, 5)),
    "b1": jnp.zeros(5),
    "w2": jax.random.normal(k[1], (5, 2)),
  }
  x = jax.random.normal(k[2], (20, 3))
  y = jax.random.normal(k[3], (20, 2))

  def loss(p):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)

  return loss, params


def dense_hessian(loss, params):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  h = jax.jit(jax.hessian(lambda v: loss(unravel(v))))(flat)
  return np.asarray(h, np.float64), unravel


def rotated(eigenvalues, seed=0):
  """`Q diag(eigenvalues) Q^T` for a random rotation `Q`."""
  n = len(eigenvalues)
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return (q * np.asarray(eigenvalues)) @ q.T


@functools.cache
def lanczos_of_matrix(k, num_iters):
  """Jitted `(A, keys) -> eigenvalue(s), info` for `0.5 p^T A p`, one key a row."""

  def one(a, key):
    grad_fn = jax.grad(lambda p: 0.5 * p @ a @ p)
    if k == 1:
      return gx.hessian_top_eigenvalue(
        grad_fn, jnp.ones(a.shape[0]), key=key, num_iters=num_iters, return_info=True
      )
    return gx.hessian_top_eigenvalues(
      grad_fn, jnp.ones(a.shape[0]), key=key, k=k, num_iters=num_iters, return_info=True
    )

  return jax.jit(jax.vmap(one, in_axes=(None, 0)))


def lanczos(a, *, k=1, num_iters=30):
  return lanczos_of_matrix(k, num_iters)(jnp.asarray(a, jnp.float32), KEYS)


def test_hvp_equals_dense_hessian_times_vector():
  loss, params = small_model()
  h, unravel = dense_hessian(loss, params)
  v = np.random.default_rng(0).normal(size=h.shape[0]).astype(np.float32)
  out = gx.hvp(jax.grad(loss), params, unravel(jnp.asarray(v)))
  np.testing.assert_allclose(
    jax.flatten_util.ravel_pytree(out)[0], h @ v, rtol=1e-4, atol=1e-5
  )


def test_top_eigenvalue_matches_eigvalsh_on_a_pytree_model():
  loss, params = small_model()  # A dict of three arrays, 30 parameters.
  eig = np.linalg.eigvalsh(dense_hessian(loss, params)[0])
  lam, info = jax.jit(
    lambda p, key: gx.hessian_top_eigenvalue(
      jax.grad(loss), p, key=key, return_info=True
    )
  )(params, jax.random.key(1))
  np.testing.assert_allclose(float(lam), eig[-1], rtol=1e-3)  # Largest algebraic.
  assert isinstance(info, gx.EigenInfo)
  assert bool(info.converged) and 1 <= int(info.num_iters) < 30
  assert info.residual.shape == () and float(info.residual) <= 1e-3 * float(lam)


def test_saddle_is_found_whatever_the_key():
  # Power iteration returned 4.95, -1.94, -4.24, 4.91 or 0.81 on +-5, by key.
  a = rotated(np.r_[5.0, -5.0, np.linspace(-4.0, 4.0, N - 2)])
  lam, info = lanczos(a)
  np.testing.assert_allclose(lam, 5.0, rtol=1e-3)
  assert np.all(info.converged)


def test_close_top_eigenvalues():
  a = rotated(np.r_[4.0, 3.9, np.linspace(-1.0, 3.0, N - 2)], seed=1)
  lam, info = lanczos(a)
  np.testing.assert_allclose(lam, 4.0, rtol=1e-3)
  assert np.all(info.converged) and np.all(info.num_iters < N)
  # Too few steps for this spectrum: reported, not hidden.
  lam, info = lanczos(a, num_iters=4)
  assert not np.any(info.converged) and np.all(info.num_iters == 4)
  assert np.all(info.residual > 1e-3 * np.abs(lam))
  assert np.all(lam <= 4.0 + 1e-5)  # A Ritz value is a lower bound.


def test_random_symmetric_matrix_against_dense():
  b = np.random.default_rng(3).normal(size=(N, N))
  a = jnp.asarray((b + b.T) / 2, jnp.float32)
  h = jax.jit(jax.hessian(lambda p: 0.5 * p @ a @ p))(jnp.zeros(N))
  eig = np.linalg.eigvalsh(np.asarray(h, np.float64))[::-1]
  lam, info = lanczos(a)
  np.testing.assert_allclose(lam, eig[0], rtol=1e-3)
  assert np.all(info.converged)
  top, info = lanczos(a, k=3)
  np.testing.assert_allclose(top, np.broadcast_to(eig[:3], (32, 3)), rtol=1e-3)
  assert np.all(info.converged) and np.all(info.num_iters <= N)  # At most n steps.
  assert info.residual.shape == (32, 3)


def test_invariant_subspace_stops_without_nan():
  # 2 x 2 with 50 steps allowed: the Krylov space is the whole space at 2.
  def loss(p):
    return p[0] ** 2 + 3 * p[0] * p[1]  # H = [[2, 3], [3, 0]].

  lam, info = gx.hessian_top_eigenvalue(
    jax.grad(loss), jnp.ones(2), key=jax.random.key(0), num_iters=50, return_info=True
  )
  np.testing.assert_allclose(float(lam), 1 + np.sqrt(10), rtol=1e-5)
  assert bool(info.converged) and int(info.num_iters) == 2
  # Two distinct eigenvalues in N dimensions: the Krylov space closes at 2.
  a = rotated(np.repeat([2.0, -1.0], N // 2), seed=2)
  lam, info = lanczos(a)
  np.testing.assert_allclose(lam, 2.0, rtol=1e-5)
  assert np.all(info.converged) and np.all(info.num_iters == 2)
  assert np.all(np.isfinite(info.residual))
  # Closed before k Ritz values exist: a fresh direction finds a copy of 2.
  top, info = lanczos(a, k=3)
  np.testing.assert_allclose(
    top, np.broadcast_to([2.0, 2.0, -1.0], (32, 3)), rtol=1e-5, atol=1e-5
  )
  assert np.all(info.converged) and np.all(np.isfinite(info.residual))
  # H = 0.
  lam, info = lanczos(np.zeros((N, N)))
  assert np.all(lam == 0.0) and np.all(info.converged) and np.all(info.num_iters == 1)


def test_float64_params():
  with jax.enable_x64(True):
    a = jnp.diag(jnp.array([5.0, -5.0, 1.0, 4.99], jnp.float64))
    lam, info = gx.hessian_top_eigenvalue(
      jax.grad(lambda p: 0.5 * p @ a @ p),
      jnp.ones(4, jnp.float64),
      key=jax.random.key(0),
      tol=1e-10,
      return_info=True,
    )
    assert lam.dtype == jnp.float64 and info.residual.dtype == jnp.float64
    np.testing.assert_allclose(float(lam), 5.0, rtol=1e-10)
    assert bool(info.converged)


def test_complex_params_are_pairs_of_real_parameters():
  c = jnp.array([1.0, 2.0, 0.5])

  def loss(z):  # Curvatures mix the real and imaginary parts.
    x, y = jnp.real(z), jnp.imag(z)
    return jnp.sum(c * x**2 + 3 * x * y - 0.5 * y**2 + 0.1 * (x**2 + y**2) ** 2)

  def real_loss(v):
    return loss(jax.lax.complex(v[:3], v[3:]))

  z = jnp.array([0.3 + 0.1j, -0.2 + 0.4j, 0.5 - 0.3j], jnp.complex64)
  h = np.asarray(jax.jit(jax.hessian(real_loss))(jnp.concatenate([z.real, z.imag])))
  eig = np.linalg.eigvalsh(h.astype(np.float64))

  # optax's convention for complex params, as the transforms take it.
  def conj_grad(f):
    return lambda z: jnp.conj(jax.grad(f)(z))

  lam = gx.hessian_top_eigenvalue(conj_grad(loss), z, key=jax.random.key(0))
  np.testing.assert_allclose(float(lam), eig[-1], rtol=1e-4)

  def diagonal(z):  # Hutchinson is exact for a diagonal Hessian.
    return jnp.sum(c * jnp.real(z) ** 2 + 2 * jnp.imag(z) ** 2)

  tr = gx.hessian_trace(conj_grad(diagonal), z, key=jax.random.key(0), num_samples=2)
  np.testing.assert_allclose(float(tr), 2 * float(jnp.sum(c)) + 12.0, rtol=1e-6)


def test_trace_within_hutchinson_error():
  loss, params = small_model()
  h, _ = dense_hessian(loss, params)
  n = 400
  # Var(z^T H z) for Rademacher z is 2 (||H||_F^2 - sum_i H_ii^2).
  std = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / n)
  est = float(
    gx.hessian_trace(jax.grad(loss), params, key=jax.random.key(2), num_samples=n)
  )
  assert abs(est - np.trace(h)) < 4 * std, (est, np.trace(h), std)
  assert std < 0.2 * abs(np.trace(h))  # the check is not vacuous


def test_diagnostics_reject_bad_arguments():
  loss, params = small_model()
  g = jax.grad(loss)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
    gx.hessian_top_eigenvalue(g, params, key=key, num_iters=0)
  with pytest.raises(ValueError, match="tol must be a finite scalar >= 0"):
    gx.hessian_top_eigenvalue(g, params, key=key, tol=-1.0)
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, 5\], got 6"):
    gx.hessian_top_eigenvalues(g, params, key=key, k=6, num_iters=5)
  with pytest.raises(ValueError, match=r"k must be an integer in \[1, 2\], got 3"):
    gx.hessian_top_eigenvalues(g, jnp.ones(2), key=key, k=3)
  with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
    gx.hessian_trace(g, params, key=key, num_samples=0)


# ----------------------------------------------------------------------------
# Spectral density (SLQ) and loss-landscape slices.
# ----------------------------------------------------------------------------


def test_slq_on_a_small_model_matches_the_dense_spectrum():
  loss, params = small_model()
  h, _ = dense_hessian(loss, params)
  eig = np.linalg.eigvalsh(h)
  n, probes = len(eig), 64
  sd = jax.jit(
    lambda p, key: gx.hessian_spectral_density(
      jax.grad(loss), p, key=key, num_probes=probes, num_iters=n
    )
  )(params, jax.random.key(3))
  nodes, weights = np.asarray(sd.nodes, np.float64), np.asarray(sd.weights, np.float64)
  assert nodes.shape == weights.shape == (probes, n)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  # With n steps the Krylov space is the whole space: every node that carries
  # weight is an eigenvalue of the dense Hessian.
  scale = np.abs(eig).max()
  carried = nodes[weights > 1e-4]
  assert np.abs(carried[:, None] - eig[None, :]).min(axis=1).max() < 1e-3 * scale
  np.testing.assert_allclose(nodes.max(), eig[-1], rtol=1e-3)
  # The moments estimate tr(H^k) / n within Hutchinson's error.
  v = 2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / n**2  # Var(v^T H v)
  assert abs(float(sd.moment(1)) - eig.mean()) < 4 * np.sqrt(v / probes)
  # The smoothed density integrates to 1.
  grid = np.linspace(eig[0] - 1, eig[-1] + 1, 4001)
  density = np.asarray(sd.density(jnp.asarray(grid), sigma=0.05))
  np.testing.assert_allclose(np.sum(density) * (grid[1] - grid[0]), 1.0, rtol=1e-3)


def test_slq_gauss_quadrature_is_exact_to_degree_2m_minus_1():
  # Diagonal H: every normalized Rademacher probe has v^T H^k v = tr(H^k)/n,
  # and an m-node Gauss rule is exact for degrees <= 2m - 1, here 7.
  curvatures = np.linspace(-1.0, 2.0, N)
  sd = gx.hessian_spectral_density(
    jax.grad(lambda p: 0.5 * jnp.sum(jnp.asarray(curvatures, jnp.float32) * p**2)),
    jnp.ones(N),
    key=jax.random.key(0),
    num_probes=2,
    num_iters=4,
  )
  assert sd.nodes.shape == (2, 4)
  for k in range(1, 8):
    np.testing.assert_allclose(
      float(sd.moment(k)), np.mean(curvatures**k), rtol=1e-4, atol=1e-5
    )
  assert np.all(sd.nodes >= -1 - 1e-5) and np.all(sd.nodes <= 2 + 1e-5)


def test_filter_normalization_per_filter_as_li_et_al():
  k = jax.random.split(jax.random.key(0), 3)
  params = {
    "dense": jax.random.normal(k[0], (3, 5)),  # (in, out): a filter is a column
    "conv": jax.random.normal(k[1], (3, 3, 2, 4)),  # HWIO: per output channel
    "bias": jnp.ones(5),
  }
  d = gx.filter_normalized_direction(jax.random.key(1), params)
  np.testing.assert_allclose(
    jnp.linalg.norm(d["dense"], axis=0),
    jnp.linalg.norm(params["dense"], axis=0),
    rtol=1e-5,
  )
  per_channel = lambda x: jnp.sqrt(jnp.sum(x**2, axis=(0, 1, 2)))  # noqa: E731
  np.testing.assert_allclose(
    per_channel(d["conv"]), per_channel(params["conv"]), rtol=1e-5
  )
  assert not np.allclose(d["dense"], params["dense"])  # random, not a copy
  np.testing.assert_array_equal(d["bias"], 0.0)
  kept = gx.filter_normalized_direction(jax.random.key(1), params, ignore_vectors=False)
  np.testing.assert_array_equal(kept["bias"], params["bias"])
  # filter_axis=0: the PyTorch layout (out, in) normalizes rows instead.
  rows = gx.filter_normalized_direction(jax.random.key(1), params, filter_axis=0)
  np.testing.assert_allclose(
    jnp.linalg.norm(rows["dense"], axis=1),
    jnp.linalg.norm(params["dense"], axis=1),
    rtol=1e-5,
  )


def test_loss_landscape_of_a_quadratic_matches_the_hand_formula():
  rng = np.random.default_rng(0)
  a = rotated(np.linspace(0.5, 3.0, 6), seed=4)
  b = rng.normal(size=6)
  theta, d1, d2 = (rng.normal(size=6) for _ in range(3))

  def loss(p):
    return 0.5 * p @ jnp.asarray(a, jnp.float32) @ p + jnp.asarray(b, jnp.float32) @ p

  def hand(s, t):  # L(theta + s d1 + t d2)
    p = theta + s * d1 + t * d2
    return 0.5 * p @ a @ p + b @ p

  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  one = gx.loss_landscape(
    loss, f32(theta), directions=(f32(d1),), num_points=5, span=2.0
  )
  np.testing.assert_allclose(one.coords, [-2, -1, 0, 1, 2])
  np.testing.assert_allclose(
    one.values, [hand(s, 0.0) for s in one.coords], rtol=1e-4, atol=1e-4
  )
  two = gx.loss_landscape(
    loss, f32(theta), directions=(f32(d1), f32(d2)), dims=2, num_points=3
  )
  expected = [[hand(s, t) for t in two.coords] for s in two.coords]
  np.testing.assert_allclose(two.values, expected, rtol=1e-4, atol=1e-4)
  # Random filter-normalized directions from a key, one per dimension.
  rand = gx.loss_landscape(loss, f32(theta), key=jax.random.key(0), num_points=3)
  assert rand.values.shape == (3,) and len(rand.directions) == 1
  np.testing.assert_allclose(rand.values[1], hand(0.0, 0.0), rtol=1e-5)


def test_spectrum_and_landscape_reject_bad_arguments():
  g = jax.grad(lambda p: jnp.sum(p**2))
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_probes must be >= 1, got 0"):
    gx.hessian_spectral_density(g, jnp.ones(3), key=key, num_probes=0)
  with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
    gx.hessian_spectral_density(g, jnp.ones(3), key=key, num_iters=0)
  loss = lambda p: jnp.sum(p**2)  # noqa: E731
  with pytest.raises(ValueError, match="dims must be 1 or 2, got 3"):
    gx.loss_landscape(loss, jnp.ones(2), key=key, dims=3)
  with pytest.raises(ValueError, match="num_points must be an integer >= 2"):
    gx.loss_landscape(loss, jnp.ones(2), key=key, num_points=1)
  with pytest.raises(ValueError, match="key is required"):
    gx.loss_landscape(loss, jnp.ones(2))
  with pytest.raises(ValueError, match="directions must hold dims=2"):
    gx.loss_landscape(loss, jnp.ones(2), directions=(jnp.ones(2),), dims=2)
