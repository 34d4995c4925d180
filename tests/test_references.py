"""Each formula against an independent reference.

(The limits `alpha=0`, `rho=0`, `gamma=0` and AGR's scale equivariance are
property tests in test_properties.py; zero gradients are the conformance
suite's.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_optax as gx


def mlp_problem(seed=0, dtype=jnp.float32):
  """A small tanh MLP regression loss with data baked in; returns (loss, params)."""
  k = jax.random.split(jax.random.key(seed), 6)
  params = {
    "w1": jax.random.normal(k[0], (4, 8), dtype) * 0.7,
    "b1": jax.random.normal(k[1], (8,), dtype) * 0.1,
    "w2": jax.random.normal(k[2], (8, 3), dtype) * 0.7,
    "b2": jnp.zeros((3,), dtype),
  }
  x = jax.random.normal(k[3], (32, 4), dtype)
  y = jax.random.normal(k[4], (32, 3), dtype)

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.mean((h @ p["w2"] + p["b2"] - y) ** 2)

  return loss, params


def flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def run_update(tx, loss, params, **kwargs):
  g = jax.grad(loss)(params)
  out, state = tx.update(g, tx.init(params), params, grad_fn=jax.grad(loss), **kwargs)
  return g, out, state


def assert_tree_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


# ----------------------------------------------------------------------------
# SAM against optax.contrib.sam.
# ----------------------------------------------------------------------------


def test_sam_follows_optax_contrib_sam_step_for_step():
  loss, params = mlp_problem()
  rho, lr = 0.05, 0.1
  ours = optax.chain(gx.sam(rho), optax.sgd(lr))
  ref = optax.contrib.sam(
    optax.sgd(lr),
    optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
    sync_period=2,
    opaque_mode=True,
  )
  p_ours, p_ref = params, params
  s_ours, s_ref = ours.init(params), ref.init(params)
  for _ in range(10):
    u, s_ours = ours.update(
      jax.grad(loss)(p_ours), s_ours, p_ours, grad_fn=jax.grad(loss)
    )
    p_ours = optax.apply_updates(p_ours, u)
    u, s_ref = ref.update(
      jax.grad(loss)(p_ref), s_ref, p_ref, grad_fn=lambda p, _: jax.grad(loss)(p)
    )
    p_ref = optax.apply_updates(p_ref, u)
    assert_tree_close(p_ours, p_ref, rtol=1e-5, atol=1e-6)
  assert float(loss(p_ours)) < float(loss(params))


# ----------------------------------------------------------------------------
# GNP against the hand-written formula.
# ----------------------------------------------------------------------------


def gnp_reference(
  loss,
  params,
  rho,
  alpha,
  *,
  adaptive=False,
  eta=0.01,
  normalize_clean=False,
  adaptive_leaves=None,
):
  """The paper's formula written with flat numpy vectors (in float64).

  `adaptive_leaves`: names of the leaves ASAM's `T` applies to (the others
  keep `T = 1`, as the official ASAM code does for non-`weight` params).
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  unflat = lambda v: jax.tree.unflatten(
    treedef,
    [
      jnp.asarray(c.reshape(x.shape), x.dtype)
      for c, x in zip(np.split(v, np.cumsum(sizes)[:-1]), leaves, strict=True)
    ],
  )
  theta = np.asarray(flat(params), np.float64)
  g = np.asarray(flat(jax.grad(loss)(params)), np.float64)
  if adaptive:
    t = np.abs(theta) + eta
    if adaptive_leaves is not None:
      names = [
        jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(params)
      ]
      keep = np.concatenate(
        [
          np.full(x.size, n in adaptive_leaves)
          for n, x in zip(names, leaves, strict=True)
        ]
      )
      t = np.where(keep, t, 1.0)
    step = rho * t * t * g / np.linalg.norm(t * g)
  else:
    step = rho * g / np.linalg.norm(g)
  g_adv = np.asarray(flat(jax.grad(loss)(unflat(theta + step))), np.float64)
  clean = g / np.linalg.norm(g) if normalize_clean else g
  return (1 - alpha) * clean + alpha * g_adv


@pytest.mark.parametrize("rho", [0.01, 0.05, 0.3])
@pytest.mark.parametrize("alpha", [0.2, 0.8, 1.0, 1.5])
def test_penalized_grad_matches_formula(rho, alpha):
  loss, params = mlp_problem(seed=1)
  _, out, _ = run_update(gx.penalized_grad(rho, alpha), loss, params)
  np.testing.assert_allclose(
    flat(out), gnp_reference(loss, params, rho, alpha), rtol=1e-5, atol=1e-6
  )


def test_adaptive_penalized_grad_matches_asam_formula():
  loss, params = mlp_problem(seed=2)
  _, out, _ = run_update(
    gx.penalized_grad(0.5, 0.7, adaptive=True, eta=0.02), loss, params
  )
  expected = gnp_reference(loss, params, 0.5, 0.7, adaptive=True, eta=0.02)
  np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-6)


def test_normalize_clean_mixes_normalized_gradient():
  loss, params = mlp_problem(seed=3)
  _, out, _ = run_update(
    gx.penalized_grad(0.1, 0.6, normalize_clean=True), loss, params
  )
  expected = gnp_reference(loss, params, 0.1, 0.6, normalize_clean=True)
  np.testing.assert_allclose(flat(out), expected, rtol=1e-5, atol=1e-6)


def test_sam_is_alpha_one():
  loss, params = mlp_problem(seed=4)
  _, a, _ = run_update(gx.sam(0.07), loss, params)
  _, b, _ = run_update(gx.penalized_grad(0.07, 1.0), loss, params)
  assert_tree_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# GSAM against its formula and big_vision's gsam_gradient.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_matches_formula(adaptive):
  loss, params = mlp_problem(seed=5)
  rho, alpha = 0.2, 0.4
  _, out, _ = run_update(gx.gsam(rho, alpha, adaptive=adaptive), loss, params)
  g = np.asarray(flat(jax.grad(loss)(params)), np.float64)
  # SAM's (or ASAM's) gradient g' is penalized_grad's at alpha = 1.
  g_adv = gnp_reference(loss, params, rho, 1.0, adaptive=adaptive)
  orth = g - (g @ g_adv) / (g_adv @ g_adv) * g_adv
  np.testing.assert_allclose(flat(out), g_adv - alpha * orth, rtol=1e-5, atol=1e-6)
  # alpha = 0 is SAM.
  _, sam_out, _ = run_update(gx.gsam(rho, 0.0, adaptive=adaptive), loss, params)
  _, ref, _ = run_update(gx.sam(rho, adaptive=adaptive), loss, params)
  assert_tree_close(sam_out, ref, rtol=1e-6, atol=1e-7)


def big_vision_gsam_gradient(loss, params, rho_max, rho_min, alpha, lr, lr_max, lr_min):
  """A transcription of big_vision's `gsam_gradient` (trainers/proj/gsam/
  gsam.py; SAM's perturbation, `minimize_fp=True`), for one loss."""
  norm = lambda t: jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))
  g_clean = jax.grad(loss)(params)
  g_len = norm(g_clean)
  rho = rho_min + (rho_max - rho_min) * (lr - lr_min) / (lr_max - lr_min)
  point = jax.tree.map(lambda a, b: a + rho * b / (g_len + 1e-12), params, g_clean)
  g_robust = jax.grad(loss)(point)
  unit = jax.tree.map(lambda x: x / norm(g_robust), g_robust)
  along = sum(
    jnp.vdot(u, c)
    for u, c in zip(jax.tree.leaves(unit), jax.tree.leaves(g_clean), strict=True)
  )
  residual = jax.tree.map(lambda c, u: c - along * u, g_clean, unit)
  return jax.tree.map(lambda r, v: r - v * alpha, g_robust, residual)


def test_gsam_follows_big_vision_step_for_step():
  """Ten SGD steps on a cosine learning-rate schedule with rho tied to it as
  the docstring says, against big_vision's gradient fed to the same SGD."""
  loss, params = mlp_problem(seed=6)
  lr_max, lr_min, rho_max, rho_min, alpha, n = 0.3, 0.0, 0.2, 0.02, 0.3, 10
  lr = optax.cosine_decay_schedule(lr_max, n)
  rho = lambda t: rho_min + (rho_max - rho_min) * (lr(t) - lr_min) / (lr_max - lr_min)
  tx = optax.chain(gx.gsam(rho, alpha), optax.sgd(lr))
  ours, ref, state = params, params, tx.init(params)
  for t in range(n):
    u, state = tx.update(jax.grad(loss)(ours), state, ours, grad_fn=jax.grad(loss))
    ours = optax.apply_updates(ours, u)
    g = big_vision_gsam_gradient(
      loss, ref, rho_max, rho_min, alpha, lr(t), lr_max, lr_min
    )
    ref = jax.tree.map(lambda p, gi, t=t: p - lr(t) * gi, ref, g)
  assert_tree_close(ours, ref, rtol=1e-5, atol=1e-6)
  assert not np.allclose(flat(ours), flat(params))


# ----------------------------------------------------------------------------
# Gradient regularization against the exact Hessian.
# ----------------------------------------------------------------------------


def exact_gr_reference(loss, params, gamma):
  """`g + gamma * H g` with H the dense Hessian of the flattened loss."""
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]

  def flat_loss(v):
    parts = jnp.split(v, np.cumsum(sizes)[:-1])
    return loss(
      jax.tree.unflatten(
        treedef, [c.reshape(x.shape) for c, x in zip(parts, leaves, strict=True)]
      )
    )

  theta = flat(params)
  g = jax.grad(flat_loss)(theta)
  h = jax.hessian(flat_loss)(theta)
  return g + gamma * h @ g


def test_gradient_regularization_equals_g_plus_gamma_hg():
  loss, params = mlp_problem(seed=6)
  _, out, _ = run_update(gx.gradient_regularization(0.3), loss, params)
  np.testing.assert_allclose(
    flat(out), exact_gr_reference(loss, params, 0.3), rtol=1e-5, atol=1e-6
  )


def fd_error(scheme, epsilon, loss, params, exact):
  _, out, _ = run_update(
    gx.finite_difference_gr(1.0, epsilon, scheme=scheme), loss, params
  )
  return float(jnp.linalg.norm(flat(out) - exact))


@pytest.mark.parametrize(
  "scheme,order", [("forward", 1), ("backward", 1), ("central", 2)]
)
def test_finite_difference_error_shrinks_with_epsilon(scheme, order):
  with jax.enable_x64(True):
    loss, params = mlp_problem(seed=7, dtype=jnp.float64)
    _, exact, _ = run_update(gx.gradient_regularization(1.0), loss, params)
    exact = flat(exact)
    errors = [fd_error(scheme, eps, loss, params, exact) for eps in (1e-2, 1e-3)]
  ratio = errors[0] / errors[1]
  # Error O(eps) shrinks 10x per decade, O(eps^2) 100x.
  assert 0.7 * 10**order < ratio < 1.3 * 10**order, (errors, ratio)


def test_forward_and_backward_bracket_exact_on_cubic():
  # For a cubic loss the forward and backward errors are equal and opposite,
  # so their mean is the central difference.
  loss = lambda p: jnp.sum(p**3) / 3 + jnp.sum(p**2)
  params = jnp.array([0.5, -1.0, 2.0])
  outs = {
    s: run_update(gx.finite_difference_gr(0.2, 0.05, scheme=s), loss, params)[1]
    for s in ("forward", "backward", "central")
  }
  np.testing.assert_allclose(
    (outs["forward"] + outs["backward"]) / 2, outs["central"], rtol=1e-5
  )
  assert not np.allclose(outs["forward"], outs["backward"])


def test_finite_difference_is_exact_on_a_quadratic():
  a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
  loss = lambda p: 0.5 * p @ a @ p
  params = jnp.array([1.0, -2.0])
  g = a @ params
  for scheme in ("forward", "backward", "central"):
    _, out, _ = run_update(
      gx.finite_difference_gr(0.1, 0.01, scheme=scheme), loss, params
    )
    np.testing.assert_allclose(out, g + 0.1 * a @ g, rtol=1e-4)


# ----------------------------------------------------------------------------
# AGR and flooding.
# ----------------------------------------------------------------------------


def test_agr_matches_per_tensor_formula():
  rng = np.random.default_rng(0)
  g = {
    "a": rng.normal(size=(5, 4)).astype(np.float32),
    "b": rng.normal(size=(7,)).astype(np.float32),
    "z": np.zeros((3,), np.float32),
  }
  tx = gx.adaptive_gradient_regularization()
  out, _ = tx.update(jax.tree.map(jnp.asarray, g), tx.init(g))
  for name in ("a", "b"):
    x = g[name].astype(np.float64)
    np.testing.assert_allclose(
      out[name], x - x * np.abs(x) / np.abs(x).sum(), rtol=1e-6
    )
  np.testing.assert_array_equal(out["z"], 0.0)


def test_agr_adamw_is_chain_of_agr_and_adamw():
  loss, params = mlp_problem(seed=8)
  a = gx.agr_adamw(1e-2, weight_decay=1e-3)
  b = optax.chain(
    gx.adaptive_gradient_regularization(), optax.adamw(1e-2, weight_decay=1e-3)
  )
  plain = optax.adamw(1e-2, weight_decay=1e-3)
  sa, sb, sp = a.init(params), b.init(params), plain.init(params)
  g = jax.grad(loss)(params)
  ua, _ = a.update(g, sa, params)
  ub, _ = b.update(g, sb, params)
  up, _ = plain.update(
    jax.tree.map(lambda x: x - x * jnp.abs(x) / jnp.abs(x).sum(), g), sp, params
  )
  assert_tree_close(ua, ub, rtol=0, atol=0)
  assert_tree_close(ua, up, rtol=1e-6, atol=1e-8)


def test_flooding_flips_sign_below_level():
  tx = gx.flooding(0.5)
  g = {"w": jnp.array([1.0, -2.0])}
  above, _ = tx.update(g, tx.init(g), value=jnp.asarray(0.7))
  below, _ = tx.update(g, tx.init(g), value=jnp.asarray(0.3))
  np.testing.assert_array_equal(above["w"], g["w"])
  np.testing.assert_array_equal(below["w"], -g["w"])


def test_agr_adamw_has_optax_adamw_signature_and_defaults():
  """(agr_adan's signature, optax.adan's plus its own options, is checked in
  tests/test_adan.py.)"""
  import inspect

  def params(fn):
    return [
      (p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()
    ]

  assert params(gx.agr_adamw) == params(optax.adamw)
