"""`agr_adan` is Adan as in its paper (Xie et al. 2022, Algorithm 1) and its
official code (sail-sg/Adan, `adan.py`), with AGR in front as the AGR paper ran
it (hjiang24/AGR-method, `Adan_AGR.py`), and not optax 0.2.8's `adan`.

The reference below is written in NumPy, in float64, in the loop form of the
official PyTorch code (`_single_tensor_adan`); it shares no code with the
library. The gradients come from a NumPy function of each run's own params.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_optax as gx

STEPS = 25


# ----------------------------------------------------------------------------
# The problem: a small nested pytree with a non-quadratic loss, so that the
# gradient differences g_k - g_{k-1} do not vanish.
# ----------------------------------------------------------------------------


def start_params() -> dict:
  rng = np.random.default_rng(0)
  return {
    "w": rng.normal(size=(3, 2)),
    "b": rng.normal(size=(3,)),
    "z": (rng.normal(size=(2,)), rng.normal(size=(2, 2))),
  }


TARGET = np.array([0.3, -0.7, 1.1])


def grad_np(p: dict) -> dict:
  """Gradient of sum(cos w) + sum((b - t)^2) + sum(z0^4)/4 + sum(sin z1)."""
  return {
    "w": -np.sin(p["w"]),
    "b": 2.0 * (p["b"] - TARGET),
    "z": (p["z"][0] ** 3, np.cos(p["z"][1])),
  }


def to_np(tree):
  return jax.tree.map(lambda x: np.array(x, np.float64), tree)


def to_jnp(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


# ----------------------------------------------------------------------------
# The NumPy reference: official Adan with AGR applied to each gradient first.
# ----------------------------------------------------------------------------


def agr_np(g: np.ndarray) -> np.ndarray:
  """`Adan_AGR.py`: p.grad = grad - grad * |grad| / sum|grad| (per tensor)."""
  return g - g * np.abs(g) / np.abs(g).sum()


def reference(
  params: dict,
  steps: int,
  lr,
  betas=(0.98, 0.92, 0.99),
  eps=1e-8,
  weight_decay=0.0,
  no_prox=False,
  decay_mask=None,
  diff_coef=None,
) -> list[dict]:
  """Params after each step of official Adan (+AGR), in float64.

  `lr` is a function of the 0-based step. `decay_mask` is a function of the
  leaf's path giving whether it decays. `diff_coef` replaces `beta2` as the
  coefficient of the difference in the squared term and in the update (the
  paper's and official code's value is `beta2`; optax.adan uses `1 - beta2`).
  """
  beta1, beta2, beta3 = betas
  coef = beta2 if diff_coef is None else diff_coef
  leaves, treedef = jax.tree.flatten(params)
  paths = [
    jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]
  p = [np.array(x, np.float64) for x in leaves]
  exp_avg = [np.zeros_like(x) for x in p]
  exp_avg_sq = [np.zeros_like(x) for x in p]
  exp_avg_diff = [np.zeros_like(x) for x in p]
  neg_pre_grad = [None] * len(p)
  history = []
  for step in range(1, steps + 1):
    lr_k = float(lr(step - 1))
    bias_correction1 = 1.0 - beta1**step
    bias_correction2 = 1.0 - beta2**step
    bias_correction3 = 1.0 - beta3**step
    grads = treedef.flatten_up_to(grad_np(treedef.unflatten(p)))
    for i in range(len(p)):
      grad = agr_np(grads[i])
      if step == 1:
        neg_pre_grad[i] = -grad
      wd = weight_decay if decay_mask is None or decay_mask(paths[i]) else 0.0
      diff = neg_pre_grad[i] + grad
      exp_avg[i] = exp_avg[i] * beta1 + (1 - beta1) * grad
      exp_avg_diff[i] = exp_avg_diff[i] * beta2 + (1 - beta2) * diff
      nesterov = diff * coef + grad
      exp_avg_sq[i] = exp_avg_sq[i] * beta3 + (1 - beta3) * nesterov * nesterov
      denom = np.sqrt(exp_avg_sq[i]) / math.sqrt(bias_correction3) + eps
      step_size_diff = lr_k * coef / bias_correction2
      step_size = lr_k / bias_correction1
      if no_prox:
        p[i] = p[i] * (1 - lr_k * wd)
        p[i] = p[i] - step_size * exp_avg[i] / denom
        p[i] = p[i] - step_size_diff * exp_avg_diff[i] / denom
      else:
        p[i] = p[i] - step_size * exp_avg[i] / denom
        p[i] = p[i] - step_size_diff * exp_avg_diff[i] / denom
        p[i] = p[i] / (1 + lr_k * wd)
      neg_pre_grad[i] = -grad
    history.append(treedef.unflatten([x.copy() for x in p]))
  return history


def run(tx, params: dict, steps: int) -> list[dict]:
  """Params after each step of `tx` (eager), gradients from `grad_np`."""
  params = to_jnp(params)
  state = tx.init(params)
  history = []
  for _ in range(steps):
    grads = to_jnp(grad_np(to_np(params)))
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    history.append(to_np(params))
  return history


def max_abs_diff(a, b) -> float:
  return max(
    float(np.max(np.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def schedule(count):
  """A decaying learning rate, usable on ints and on traced counts."""
  return 0.05 / (1.0 + 0.1 * count)


def constant(count):
  del count
  return 0.05


CASES = {
  "plain": (dict(learning_rate=0.05), dict(lr=constant)),
  "schedule": (dict(learning_rate=schedule), dict(lr=schedule)),
  "prox_decay": (
    dict(learning_rate=schedule, weight_decay=0.3),
    dict(lr=schedule, weight_decay=0.3),
  ),
  "decoupled_decay": (
    dict(learning_rate=schedule, weight_decay=0.3, proximal=False),
    dict(lr=schedule, weight_decay=0.3, no_prox=True),
  ),
  "masked_decay": (
    dict(learning_rate=0.05, weight_decay=0.3, mask={"w": True, "b": False, "z": True}),
    dict(
      lr=constant,
      weight_decay=0.3,
      decay_mask=lambda path: not path.startswith("['b']"),
    ),
  ),
  "callable_mask": (
    dict(
      learning_rate=schedule,
      weight_decay=0.3,
      mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p),
    ),
    dict(
      lr=schedule,
      weight_decay=0.3,
      decay_mask=lambda path: path in ("['w']", "['z'][1]"),
    ),
  ),
  "other_betas": (
    dict(learning_rate=schedule, b1=0.9, b2=0.7, b3=0.95, eps=1e-3, weight_decay=0.1),
    dict(lr=schedule, betas=(0.9, 0.7, 0.95), eps=1e-3, weight_decay=0.1),
  ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_official_adan_with_agr_step_by_step(x64, name):
  ours, theirs = CASES[name]
  p0 = start_params()
  got = run(gx.agr_adan(**ours), p0, STEPS)
  want = reference(p0, STEPS, **theirs)
  for k, (g, w) in enumerate(zip(got, want, strict=True)):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      np.testing.assert_allclose(
        a, b, rtol=0, atol=1e-12, err_msg=f"{name}, step {k + 1}"
      )
  # The run moved: the comparison is not between two stalled trajectories.
  assert max_abs_diff(want[-1], p0) > 0.1


def test_first_step_is_the_sign_of_the_agr_gradient(x64):
  """Step 1: the difference is zero and the bias-corrected moments are
  m = g, v = 0, n = g^2, so u = g / (|g| + eps)."""
  p0 = to_jnp(start_params())
  tx = gx.agr_adan(learning_rate=0.1)
  grads = to_jnp(grad_np(to_np(p0)))
  updates, state = tx.update(grads, tx.init(p0), p0)
  g = jax.tree.map(agr_np, to_np(grads))
  want = jax.tree.map(lambda x: -0.1 * x / (np.abs(x) + 1e-8), g)
  assert max_abs_diff(to_np(updates), want) < 1e-14
  adan_state = state[1][0]
  assert int(adan_state.count) == 1
  assert max_abs_diff(to_np(adan_state.v), jax.tree.map(np.zeros_like, g)) == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
def test_optax_adan_is_the_reference_with_coefficient_one_minus_b2(x64, weight_decay):
  """What optax.adan computes: the same recursion with `1 - b2` instead of
  `b2` in the squared term and the update, and decoupled weight decay."""
  p0 = start_params()
  tx = optax.chain(
    gx.adaptive_gradient_regularization(),
    optax.adan(0.05, eps_root=0.0, weight_decay=weight_decay),
  )
  got = run(tx, p0, STEPS)
  want = reference(
    p0, STEPS, lr=constant, weight_decay=weight_decay, no_prox=True, diff_coef=1 - 0.92
  )
  assert max_abs_diff(got[-1], want[-1]) < 1e-12


def test_optax_adan_differs_from_the_paper(x64):
  """Why agr_adan does not wrap optax.adan: with the same hyperparameters, no
  weight decay and no eps_root, optax.adan leaves Adan after 20 steps."""
  p0 = start_params()
  ours = run(gx.agr_adan(0.05), p0, 20)
  via_optax = run(
    optax.chain(gx.adaptive_gradient_regularization(), optax.adan(0.05, eps_root=0.0)),
    p0,
    20,
  )
  want = reference(p0, 20, lr=constant)
  assert max_abs_diff(ours[-1], want[-1]) < 1e-12
  assert max_abs_diff(via_optax[-1], want[-1]) > 1e-4


def test_eps_root_goes_inside_the_root(x64):
  p0 = to_jnp(start_params())
  grads = to_jnp(grad_np(to_np(p0)))
  tx = gx.agr_adan(learning_rate=1.0, eps=0.0, eps_root=0.25)
  updates, _ = tx.update(grads, tx.init(p0), p0)
  g = jax.tree.map(agr_np, to_np(grads))
  want = jax.tree.map(lambda x: -x / np.sqrt(x * x + 0.25), g)
  assert max_abs_diff(to_np(updates), want) < 1e-14


def test_signature_is_optax_adan_plus_keyword_only_options():
  ours = list(inspect.signature(gx.agr_adan).parameters.values())
  theirs = list(inspect.signature(optax.adan).parameters.values())
  assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
  assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in ours[: len(theirs)])
  for a, b in zip(ours[: len(theirs)], theirs, strict=True):
    if a.name != "eps_root":  # 0 as in the official code; optax has 1e-8
      assert a.default == b.default, a.name
  assert inspect.signature(gx.agr_adan).parameters["eps_root"].default == 0.0
  assert {p.name: (p.kind, p.default) for p in ours[len(theirs) :]} == {
    "proximal": (inspect.Parameter.KEYWORD_ONLY, True),
    "mu_dtype": (inspect.Parameter.KEYWORD_ONLY, None),
  }


# ----------------------------------------------------------------------------
# jit, dtypes, params.
# ----------------------------------------------------------------------------


def loss_fn(p):
  return (
    jnp.sum(jnp.cos(p["w"]))
    + jnp.sum((p["b"] - 0.5) ** 2)
    + jnp.sum(p["z"][0] ** 4) / 4
    + jnp.sum(jnp.sin(p["z"][1]))
  )


def f32_params():
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start_params())


def test_jitted_steps_match_the_reference(x64):
  """(One trace, donation and inject_hyperparams are the conformance suite's,
  where gx.adan and gx.agr_adan are cases.)"""
  tx = gx.agr_adan(schedule, weight_decay=0.3)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  p0 = start_params()
  params = to_jnp(p0)
  state = tx.init(params)
  for _ in range(STEPS):
    params, state = step(params, state, to_jnp(grad_np(to_np(params))))
  assert int(state[1][0].count) == STEPS and int(state[1][1].count) == STEPS
  want = reference(p0, STEPS, lr=schedule, weight_decay=0.3)[-1]
  assert max_abs_diff(to_np(params), want) < 1e-12


@pytest.mark.parametrize("mu_dtype", [None, jnp.float32])
def test_bfloat16_params(mu_dtype):
  tx = gx.agr_adan(0.05, weight_decay=0.1, mu_dtype=mu_dtype)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), f32_params())
  state0 = state = tx.init(params)
  update = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
  for _ in range(3):
    updates, state = update(params, state)
    params = optax.apply_updates(params, updates)
    for u in jax.tree.leaves(updates):
      assert u.dtype == jnp.bfloat16
      assert np.all(np.isfinite(np.asarray(u, np.float32)))

  def spec(s):
    return jax.tree.map(lambda x: (x.shape, x.dtype), s)

  assert spec(state) == spec(state0)
  want = mu_dtype or jnp.bfloat16
  assert all(x.dtype == want for x in jax.tree.leaves(state[1][0].m))
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state[1][0].n))


def test_complex_params_keep_a_real_second_moment():
  tx = gx.agr_adan(0.05)
  params = {"c": jnp.array([1 + 2j, -0.5 + 1j, 3 - 1j], jnp.complex64)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for k in range(3):
    grads = jax.tree.map(lambda x, k=k: x * (1 + 0.1 * k), params)
    updates, state = update(grads, state, params)
  assert updates["c"].dtype == jnp.complex64
  assert state[1][0].n["c"].dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(updates["c"])))


def test_params_needed_only_for_weight_decay():
  params = f32_params()
  grads = jax.grad(loss_fn)(params)
  tx = gx.agr_adan(0.05)
  update = jax.jit(tx.update)
  updates, _ = update(grads, tx.init(params))  # no params: fine
  with_params, _ = update(grads, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(with_params), strict=True):
    np.testing.assert_array_equal(a, b)
  tx = gx.agr_adan(0.05, weight_decay=0.1)
  with pytest.raises(ValueError, match="params"):
    jax.jit(tx.update)(grads, tx.init(params))
