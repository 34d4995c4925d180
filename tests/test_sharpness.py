"""Flatness diagnostics against the exact Hessian of a small model."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import gnorm_optax as gx


def small_model():
  k = jax.random.split(jax.random.key(0), 4)
  params = {"w1": jax.random.normal(k[0], (3, 5)), "b1": jnp.zeros(5),
            "w2": jax.random.normal(k[1], (5, 2))}
  x = jax.random.normal(k[2], (20, 3))
  y = jax.random.normal(k[3], (20, 2))
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] - y) ** 2)
  return loss, params


def dense_hessian(loss, params):
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  return np.asarray(jax.hessian(lambda v: loss(unravel(v)))(flat), np.float64), unravel


def test_hvp_equals_dense_hessian_times_vector():
  loss, params = small_model()
  h, unravel = dense_hessian(loss, params)
  v = np.random.default_rng(0).normal(size=h.shape[0]).astype(np.float32)
  out = gx.hvp(jax.grad(loss), params, unravel(jnp.asarray(v)))
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(out)[0], h @ v,
                             rtol=1e-4, atol=1e-5)


def test_top_eigenvalue_matches_eigvalsh():
  loss, params = small_model()
  h, _ = dense_hessian(loss, params)
  eig = np.linalg.eigvalsh(h)
  top = eig[np.argmax(np.abs(eig))]
  est = gx.hessian_top_eigenvalue(jax.grad(loss), params, key=jax.random.key(1),
                                  num_iters=200)
  np.testing.assert_allclose(float(est), top, rtol=1e-3)


def test_trace_within_hutchinson_error():
  loss, params = small_model()
  h, _ = dense_hessian(loss, params)
  n = 400
  # Var(z^T H z) for Rademacher z is 2 (||H||_F^2 - sum_i H_ii^2).
  std = np.sqrt(2 * (np.sum(h**2) - np.sum(np.diag(h) ** 2)) / n)
  est = float(gx.hessian_trace(jax.grad(loss), params, key=jax.random.key(2),
                               num_samples=n))
  assert abs(est - np.trace(h)) < 4 * std, (est, np.trace(h), std)
  assert std < 0.2 * abs(np.trace(h))  # the check is not vacuous


def test_diagnostics_jit_and_reject_bad_counts():
  loss, params = small_model()
  f = jax.jit(lambda p, k: gx.hessian_top_eigenvalue(jax.grad(loss), p, key=k,
                                                     num_iters=5))
  assert np.isfinite(float(f(params, jax.random.key(0))))
  with pytest.raises(ValueError, match="num_iters must be >= 1, got 0"):
    gx.hessian_top_eigenvalue(jax.grad(loss), params, key=jax.random.key(0),
                              num_iters=0)
  with pytest.raises(ValueError, match="num_samples must be >= 1, got 0"):
    gx.hessian_trace(jax.grad(loss), params, key=jax.random.key(0), num_samples=0)
