"""Reliability: faults, bad input, composition with optax wrappers, and
float64 property tests.

- Faults (every second-gradient case of the conformance list, jitted): a
  non-finite gradient at the perturbed point falls back to the clean gradient
  for that step and is counted; a non-finite clean gradient is passed through
  (NaN in, NaN out) without poisoning the state; `optax.apply_if_finite`
  around the chain skips such steps and leaves the inner state untouched;
  with `on_nonfinite="zero"` such a step returns zeros, with "propagate" it
  is not checked.
  Degenerate steps (a perturbation lost to bfloat16 rounding or to a tiny
  epsilon, or an overflowing norm) are counted, and `perturb_dtype` keeps the
  perturbation. `optax.lookahead`'s pattern.
- Bad input: params of another tree than the state was built for; use inside
  `optax.masked` / `optax.partition`. (String and NaN hyperparameters are in
  test_errors.py.)
- `value_fn` instead of `grad_fn`: the same update, bit for bit, with the
  extra arguments value_fn names.
- Composition: `optax.MultiSteps` (both placements, against a hand
  computation), `optax.clip_by_global_norm` before and after, a backtracking
  line search sharing `value_fn`.
(Checkpoints are in test_checkpoint.py; float64 leaves in the property tests
of test_properties.py.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gnorm_optax as gx

second_gradient_cases = pytest.mark.cases(lambda c: c.needs == "grad_fn")


def leaves_bitwise_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
    np.asarray(x).dtype == np.asarray(y).dtype
    and np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(la, lb, strict=True)
  )


def all_finite(tree) -> bool:
  return all(
    np.all(np.isfinite(np.asarray(x, np.float32))) for x in jax.tree.leaves(tree)
  )


# ----------------------------------------------------------------------------
# Faults.
# ----------------------------------------------------------------------------


def fault_step(case, loss_fn):
  """Jitted `(params, grads, state, factor) -> (updates, state)`; `grad_fn`
  multiplies the gradient of leaf "b" by `factor` (1, NaN or inf)."""
  tx = case.make(**case.hparams)

  def step(params, grads, state, factor):
    def grad_fn(p):
      g = jax.grad(loss_fn)(p)
      return {**g, "b": g["b"] * factor}

    return tx.update(grads, state, params, grad_fn=grad_fn)

  return tx, jax.jit(step)


def run_faults(tx, step, factors, grads_seq, params_seq):
  state = tx.init(params_seq[0])
  outs, states = [], []
  for params, grads, f in zip(params_seq, grads_seq, factors, strict=True):
    u, state = step(params, grads, state, jnp.float32(f))
    outs.append(u)
    states.append(state)
  return outs, states


# AE-SAM's refresh steps follow its statistics, which a fault changes: its
# own test follows.
@pytest.mark.cases(lambda c: c.needs == "grad_fn" and c.id != "sam-ae")
def test_faults_in_jit(case, loss_fn, params_sequence):
  """One jitted step per case, three runs over the same 7 steps:

  - reference: no fault;
  - perturbed: the gradient at the perturbed point is NaN on step 1 and inf
    on step 3: a refresh step then returns the clean gradient exactly and is
    counted; with every_k=3 step 1 reuses the cache (grad_fn does not run) and
    the cache of step 3 is reset to zero (no NaN is cached);
  - clean: the incoming gradient has a NaN on steps 1 and 3: it comes out
    (exactly g on a refresh step, non-finite on a reuse step), is counted on a
    refresh step, and the state stays finite, so later steps are unaffected.
  """
  k = 3 if "every_k=3" in case.id else 1
  n = 7
  seq = params_sequence(n)
  grads = [jax.grad(loss_fn)(p) for p in seq]
  tx, step = fault_step(case, loss_fn)
  refreshed = {t for t in (1, 3) if t % k == 0}
  # With every_k=3 the zero cache of the faulty refresh on step 3 is reused
  # on steps 4 and 5 (its value there is the transform's zero-correction one).
  unaffected = set(range(n)) - {1, 3} - ({4, 5} if k == 3 else set())

  ref, _ = run_faults(tx, step, [1.0] * n, grads, seq)
  for t in range(n):
    assert all_finite(ref[t])
  for t in refreshed:  # the transform changes g, so the fallback is visible
    assert not leaves_bitwise_equal(ref[t], grads[t])

  # Perturbed point not finite.
  factors = [1.0, np.nan, 1.0, np.inf, 1.0, 1.0, 1.0]
  outs, states = run_faults(tx, step, factors, grads, seq)
  for t in range(n):
    assert all_finite(outs[t]), t
    assert all_finite(states[t]), t
    if t in refreshed:
      assert leaves_bitwise_equal(outs[t], grads[t]), t
    elif t in unaffected or t == 1:
      assert leaves_bitwise_equal(outs[t], ref[t]), t
  assert int(states[-1].nonfinite_count) == len(refreshed)
  if k == 3:
    assert all(
      np.all(np.asarray(c) == 0) for c in jax.tree.leaves(states[3].correction)
    )

  # Clean gradient not finite.
  bad = list(grads)
  for t in (1, 3):
    bad[t] = {**grads[t], "w": grads[t]["w"].at[0, 0].set(jnp.nan)}
  outs, states = run_faults(tx, step, [1.0] * n, bad, seq)
  for t in range(n):
    assert all_finite(states[t]), t  # the state is not poisoned
    if t in (1, 3):
      assert np.isnan(outs[t]["w"][0, 0]), t  # NaN in, NaN out
      if t in refreshed:  # passed through unchanged
        jax.tree.map(np.testing.assert_array_equal, outs[t], bad[t])
    elif t in unaffected:
      assert leaves_bitwise_equal(outs[t], ref[t]), t
    else:
      assert all_finite(outs[t]), t
  assert int(states[-1].nonfinite_count) == len(refreshed)


def test_ae_sam_policy_skips_a_nonfinite_gradient(loss_fn, params_sequence):
  """AE-SAM with a NaN in the clean gradient of step 1: NaN in, NaN out,
  grad_fn does not run, and the running statistics (`state.policy`) stay
  those of step 0, so the later steps are those of a run without step 1 (a
  NaN mean would turn every later decision off for good)."""
  seq = params_sequence(4)
  grads = [jax.grad(loss_fn)(p) for p in seq]
  tx = gx.sam(0.05, ae_threshold=0.0)
  runs = []

  def counted_grad_fn(p):
    jax.debug.callback(lambda: runs.append(1))
    return jax.grad(loss_fn)(p)

  step = jax.jit(lambda p, g, s: tx.update(g, s, p, grad_fn=counted_grad_fn))

  def run(steps, bad_step=None):
    state, outs, states = tx.init(seq[0]), [], []
    for t in steps:
      g = grads[t]
      if t == bad_step:
        g = {**g, "w": g["w"].at[0, 0].set(jnp.nan)}
      u, state = step(seq[t], g, state)
      outs.append(u)
      states.append(state)
    jax.effects_barrier()
    return outs, states

  outs, states = run(range(4), bad_step=1)
  assert len(runs) == 3  # steps 0, 2 and 3 (threshold 0: all finite steps)
  assert np.isnan(outs[1]["w"][0, 0])
  assert leaves_bitwise_equal(states[1].policy, states[0].policy)
  assert all(all_finite(s) for s in states)
  without, _ = run([0, 2, 3])
  for got, want in zip(outs[2:], without[1:], strict=True):
    assert leaves_bitwise_equal(got, want)


@second_gradient_cases
@pytest.mark.parametrize("mode", ["zero", "propagate"])
def test_on_nonfinite_zero_and_propagate(case, loss_fn, params_sequence, mode):
  """A refresh step whose extra gradient is NaN (with every_k=3 step 0
  refreshes, step 1 reuses the cache) returns zeros and is counted with
  `on_nonfinite="zero"`, and comes out non-finite, uncounted, with
  `"propagate"`; a reuse step equals the default's with "zero"."""
  seq = params_sequence(2)
  grads = [jax.grad(loss_fn)(p) for p in seq]
  k = 3 if "every_k=3" in case.id else 1
  outs = {}
  for name in ("clean", mode):
    tx = case.make(**case.hparams, on_nonfinite=name)

    def step(params, g, state, factor, tx=tx):
      def grad_fn(p):
        g = jax.grad(loss_fn)(p)
        return {**g, "b": g["b"] * factor}

      return tx.update(g, state, params, grad_fn=grad_fn)

    outs[name] = run_faults(tx, jax.jit(step), [np.nan, np.nan], grads, seq)
  (clean, _), (got, states) = outs["clean"], outs[mode]
  refreshes = [t for t in range(2) if t % k == 0]
  for t in refreshes:
    assert leaves_bitwise_equal(clean[t], grads[t]), t
    if mode == "zero":
      for leaf in jax.tree.leaves(got[t]):
        np.testing.assert_array_equal(leaf, 0)
    else:
      assert not all_finite(got[t]), t
  if mode == "zero" and k == 3:  # a reuse of the (reset) cache
    assert leaves_bitwise_equal(got[1], clean[1])
  counted = len(refreshes) if mode == "zero" else 0
  assert int(states[-1].nonfinite_count) == counted


# ----------------------------------------------------------------------------
# Degenerate steps: a perturbation lost to rounding, an overflowing norm.
# ----------------------------------------------------------------------------


def _order_one_problem(dtype):
  k = jax.random.split(jax.random.key(3), 2)
  params = {"w": (1.0 + 0.5 * jax.random.uniform(k[0], (1024,))).astype(dtype)}
  x = jax.random.normal(k[1], (1024,))

  def loss(p):  # float32 math whatever the params' dtype
    w = p["w"].astype(jnp.float32)
    return jnp.sum(jnp.sin(x * w)) + 0.5 * jnp.sum(w**2)

  def grad_fn(p):  # the gradient in the dtype of its argument
    return jax.tree.map(lambda g, q: g.astype(q.dtype), jax.grad(loss)(p), p)

  return loss, grad_fn, params


def test_bfloat16_perturbation_loss_is_counted_and_perturb_dtype_keeps_it():
  loss, grad_fn, params = _order_one_problem(jnp.bfloat16)
  g = grad_fn(params)
  tx = gx.sam(0.05)
  out, state = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=grad_fn))(
    g, tx.init(params), params
  )
  # Rounding theta + 0.05 g/|g| to bfloat16 misses the point by more than
  # half the step.
  assert float(state.perturbation_error) > 0.5
  assert int(state.degenerate_count) == 1
  assert int(state.nonfinite_count) == 0

  tx32 = gx.sam(0.05, perturb_dtype=jnp.float32)
  out32, state32 = jax.jit(lambda g, s, p: tx32.update(g, s, p, grad_fn=grad_fn))(
    g, tx32.init(params), params
  )
  assert out32["w"].dtype == jnp.bfloat16  # the update keeps the gradient dtype
  assert float(state32.perturbation_error) < 1e-3  # float32 rounding only
  assert int(state32.degenerate_count) == 0
  # It is SAM on the float32 copy of the same params and gradient.
  p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  want, _ = gx.sam(0.05).update(
    jax.tree.map(lambda x: x.astype(jnp.float32), g),
    gx.sam(0.05).init(p32),
    p32,
    grad_fn=grad_fn,
  )
  np.testing.assert_allclose(
    np.asarray(out32["w"], np.float32),
    np.asarray(want["w"].astype(jnp.bfloat16), np.float32),
  )


def test_finite_difference_step_below_rounding_is_counted():
  """At epsilon=1e-12 in float32, theta + epsilon g == theta: the update is g
  exactly, which is a fault, not F-GR; it is counted."""
  loss, grad_fn, params = _order_one_problem(jnp.float32)
  g = grad_fn(params)
  tx = gx.finite_difference_gr(0.1, 1e-12)
  out, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  jax.tree.map(np.testing.assert_array_equal, out, g)
  assert float(state.perturbation_error) == 1.0  # nothing moved
  assert int(state.degenerate_count) == 1
  ok = gx.finite_difference_gr(0.1, 1e-2)
  _, state = ok.update(g, ok.init(params), params, grad_fn=grad_fn)
  assert int(state.degenerate_count) == 0
  assert float(state.perturbation_error) < 0.01


def test_gradient_whose_squares_overflow_is_counted():
  """One entry of 1e20 in float32: |g|^2 overflows, the normalized step is
  zero and SAM takes the gradient at theta (an SGD step): counted, not silent."""
  params = jnp.ones(3, jnp.float32)
  g = jnp.array([1e20, 1.0, -1.0], jnp.float32)
  grad_fn = lambda p: g * p[0]  # g' = g * theta'_0 shows where it was taken
  tx = gx.sam(0.05)
  out, state = tx.update(g, tx.init(params), params, grad_fn=grad_fn)
  np.testing.assert_array_equal(out, g)  # theta' = theta
  assert int(state.nonfinite_count) == 0
  assert int(state.degenerate_count) == 1
  assert float(state.perturbation_error) == 1.0
  # A gradient of ordinary size is not counted.
  _, state = tx.update(g.at[0].set(3.0), tx.init(params), params, grad_fn=grad_fn)
  assert int(state.degenerate_count) == 0


def test_lookahead_around_the_base_optimizer():
  """optax.lookahead passes no extra arguments to its fast optimizer, so
  grad_fn cannot reach a transform inside it. The working pattern: call the
  second-gradient transform first and give its output to lookahead."""
  loss = lambda p: jnp.sum((p - 1.0) ** 4) + jnp.sum(p**2)
  sam, la = gx.sam(0.05), optax.lookahead(optax.sgd(0.05), 3, 0.5)
  plain = optax.chain(gx.sam(0.05), optax.sgd(0.05))
  params = optax.LookaheadParams.init_synced(jnp.array([0.3, -0.2, 2.0]))
  s_sam, s_la = sam.init(params.fast), la.init(params)
  fast, s_plain = params.fast, plain.init(params.fast)

  @jax.jit
  def step(params, s_sam, s_la):
    g = jax.grad(loss)(params.fast)
    g, s_sam = sam.update(g, s_sam, params.fast, grad_fn=jax.grad(loss))
    u, s_la = la.update(g, s_la, params)
    return optax.apply_updates(params, u), s_sam, s_la

  for t in range(6):
    params, s_sam, s_la = step(params, s_sam, s_la)
    if t < 2:  # before the first sync, the fast weights follow chain(sam, sgd)
      u, s_plain = plain.update(
        jax.grad(loss)(fast), s_plain, fast, grad_fn=jax.grad(loss)
      )
      fast = optax.apply_updates(fast, u)
      np.testing.assert_allclose(params.fast, fast, rtol=1e-6)
  assert float(loss(params.slow)) < float(loss(jnp.array([0.3, -0.2, 2.0])))


def test_apply_if_finite_skips_steps_and_keeps_the_inner_state(loss_fn, make_params):
  """`apply_if_finite(chain(sam(every_k=3), sgd))`: a NaN clean gradient gives
  a NaN update, which apply_if_finite rejects: params, the every_k cache, the
  counts and the momentum stay as they were, so the run equals one without
  the bad steps. A NaN at the perturbed point is handled inside (the update is
  finite), so apply_if_finite applies that step."""
  tx = optax.apply_if_finite(
    optax.chain(gx.sam(0.05, every_k=3), optax.sgd(0.05, momentum=0.9)),
    max_consecutive_errors=3,
  )

  @jax.jit
  def step(params, state, clean_factor, perturbed_factor):
    grads = jax.grad(loss_fn)(params)
    grads = {**grads, "b": grads["b"] * clean_factor}

    def grad_fn(p):
      return jax.tree.map(lambda g: g * perturbed_factor, jax.grad(loss_fn)(p))

    updates, state = tx.update(grads, state, params, grad_fn=grad_fn)
    return optax.apply_updates(params, updates), state, updates

  def run(faults):
    params = make_params()
    state = tx.init(params)
    history = []
    for clean, perturbed in faults:
      new_params, new_state, updates = step(params, state, clean, perturbed)
      history.append((params, state, new_params, new_state, updates))
      params, state = new_params, new_state
    return params, state, history

  ok, nan = (1.0, 1.0), (np.nan, 1.0)
  params_a, state_a, hist = run([ok, ok, nan, nan, ok, ok, ok, ok])
  params_b, state_b, _ = run([ok] * 6)
  for t in (2, 3):
    params, state, new_params, new_state, updates = hist[t]
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert leaves_bitwise_equal(new_params, params)
    assert leaves_bitwise_equal(new_state.inner_state, state.inner_state)
    assert int(new_state.notfinite_count) == t - 1
  inner = state_a.inner_state[0]
  assert int(inner.count) == 6 and inner.correction is not None
  assert int(state_a.total_notfinite) == 2
  assert leaves_bitwise_equal(params_a, params_b)
  assert leaves_bitwise_equal(state_a.inner_state, state_b.inner_state)

  # A NaN at the perturbed point (step 3 is a refresh): handled inside.
  _, state_c, hist = run([ok, ok, ok, (1.0, np.nan), ok])
  assert all_finite(hist[3][4])
  assert int(state_c.total_notfinite) == 0
  assert int(state_c.inner_state[0].nonfinite_count) == 1
  assert not leaves_bitwise_equal(hist[3][2], hist[3][0])  # it was applied


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.3)}


def small_loss(p):
  return sum(jnp.sum(x**4 + x**2) for x in jax.tree.leaves(p))


CACHED = [
  lambda: gx.penalized_grad(0.05, 0.8, every_k=3),
  lambda: gx.finite_difference_gr(0.1, 0.01, scheme="central", every_k=2),
  lambda: gx.gradient_regularization(0.1, every_k=2),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize(
  "other,match",
  [
    (
      {**PARAMS, "c": jnp.ones(2)},
      r"(?s)params has another structure than the params the optimizer state "
      r"\(its every_k cache\) was built for:.*re-run tx.init\(params\)",
    ),
    (
      {**PARAMS, "w": jnp.ones(4)},
      r"(?s)params has float32\[4\] at \['w'\], where the optimizer state "
      r"\(its every_k cache\) was built for \[3\].*re-run tx.init\(params\)",
    ),
  ],
  ids=["structure", "shape"],
)
@pytest.mark.parametrize("make", CACHED)
def test_params_of_another_tree_than_the_state(make, other, match, jit):
  tx = make()
  state = tx.init(PARAMS)  # built for PARAMS, used with `other`

  def update(g, s, p):
    return tx.update(g, s, p, grad_fn=jax.grad(small_loss))

  update = jax.jit(update) if jit else update
  with pytest.raises(ValueError, match=match) as err:
    update(jax.grad(small_loss)(other), state, other)
  assert "params" in str(err.value)


def test_params_dtype_other_than_the_state_under_x64():
  tx = gx.sam(0.05, every_k=2)
  state = tx.init(PARAMS)  # float32 cache
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: x.astype(jnp.float64), PARAMS)
    with pytest.raises(
      ValueError,
      match=r"float64\[\] at \['b'\].*compute "
      r"dtype float32; re-run tx.init\(params\)",
    ):
      tx.update(jax.grad(small_loss)(p64), state, p64, grad_fn=jax.grad(small_loss))


def test_x64_keeps_float32_math_float32(case, loss_fn, make_params, update_kwargs):
  """With `jax_enable_x64` on, Python-number hyperparameters (`rho=0.05`)
  must not promote the math on float32 params to float64: the compiled
  update holds no float64 arithmetic on arrays, only scalar constants."""
  with jax.enable_x64(True):
    params = make_params(jnp.float32)
    tx = case.make(**case.hparams)
    kwargs = update_kwargs(case, loss_fn, loss_fn(params))

    def update(p):
      return tx.update(jax.grad(loss_fn)(p), tx.init(p), p, **kwargs)[0]

    hlo = jax.jit(update).lower(params).as_text()
    # Rank-0 f64 constants (converted once) may appear; f64 arrays may not.
    wide = [line for line in hlo.splitlines() if "xf64>" in line]
    assert not wide, wide
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(update(params)))


def test_every_k_one_checks_grads_against_params_and_keeps_no_tree():
  """With every_k=1 the state holds no tree: grads that differ from params
  are caught by the grads-vs-params check, and a state built for other
  params works (and equals a fresh one) when grads and params agree."""
  tx = gx.sam(0.05)
  state = tx.init(PARAMS)
  other = {**PARAMS, "c": jnp.array([0.5, -1.0])}
  with pytest.raises(
    ValueError,
    match=r"(?s)updates returned a tree of another "
    r"structure than params.*must have the tree of params",
  ):
    tx.update(jax.grad(small_loss)(PARAMS), state, other, grad_fn=jax.grad(small_loss))
  g = jax.grad(small_loss)(other)
  a, _ = tx.update(g, state, other, grad_fn=jax.grad(small_loss))
  b, _ = tx.update(g, tx.init(other), other, grad_fn=jax.grad(small_loss))
  assert leaves_bitwise_equal(a, b)


MASKED_MATCH = (
  r"(?s)needs the full parameter tree, but its params has optax.MaskedNode "
  r"leaves at \['b'\]: it is inside optax.masked or optax.partition.*Put "
  r"\w+ outside, first in the chain, and mask the base optimizer instead"
)


@pytest.mark.parametrize(
  "wrap",
  [
    lambda tx: optax.masked(tx, {"w": True, "b": False}),
    lambda tx: optax.partition(
      {"a": tx, "f": optax.set_to_zero()}, {"w": "a", "b": "f"}
    ),
  ],
  ids=["masked", "partition"],
)
@pytest.mark.parametrize("make", CACHED + [lambda: gx.sam(0.05)])
def test_inside_masked_or_partition_fails_with_the_fix(make, wrap):
  with pytest.raises(ValueError, match=MASKED_MATCH):
    wrap(make()).init(PARAMS)


def test_masked_tree_in_update_fails_with_the_fix():
  """The check is in update too (for a state not made by the wrapper)."""
  tx = gx.sam(0.05)
  mask = {"w": True, "b": False}

  def masked(t):
    return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask, t)

  with pytest.raises(ValueError, match=MASKED_MATCH):
    tx.update(
      masked(jax.grad(small_loss)(PARAMS)),
      tx.init(PARAMS),
      masked(PARAMS),
      grad_fn=jax.grad(small_loss),
    )


def test_the_fix_for_masked_works():
  """The documented alternative: the transform first, on the full tree, and
  the base optimizer partitioned (here: "b" frozen)."""
  tx = optax.chain(
    gx.sam(0.05),
    optax.partition(
      {"a": optax.sgd(0.1), "f": optax.set_to_zero()}, {"w": "a", "b": "f"}
    ),
  )
  g = jax.grad(small_loss)(PARAMS)
  u, _ = tx.update(g, tx.init(PARAMS), PARAMS, grad_fn=jax.grad(small_loss))
  sam_out, _ = gx.sam(0.05).update(
    g, gx.sam(0.05).init(PARAMS), PARAMS, grad_fn=jax.grad(small_loss)
  )
  assert float(u["b"]) == 0.0
  np.testing.assert_allclose(u["w"], -0.1 * sam_out["w"], rtol=1e-6)
  assert not np.allclose(sam_out["w"], g["w"])


def data_loss(p, x, y):
  return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - y) ** 2) + 0.01 * jnp.sum(
    p["w"] ** 2
  )


DATA = (
  jax.random.normal(jax.random.key(0), (16, 3)),
  jax.random.normal(jax.random.key(1), (16,)),
)


@pytest.mark.parametrize(
  "make",
  CACHED
  + [
    lambda: gx.sam(0.05),
    lambda: gx.penalized_grad(0.05, 0.8, adaptive=True),
    lambda: gx.finite_difference_gr(0.1, 0.01),
    lambda: gx.gradient_regularization(0.1),
  ],
)
def test_value_fn_equals_grad_fn_and_gets_the_extra_args_it_names(make):
  """`value_fn=fn` instead of `grad_fn` gives the same update bit for bit;
  with optax's line-search convention, `value_fn=fn, x=x, y=y` evaluates
  `fn(params, x=x, y=y)`; arguments that fn does not name are ignored."""
  x, y = DATA
  tx = make()
  g = jax.grad(data_loss)(PARAMS, x, y)
  a, _ = tx.update(
    g,
    tx.init(PARAMS),
    PARAMS,
    value_fn=data_loss,
    x=x,
    y=y,
    value=data_loss(PARAMS, x, y),
    grad=g,
    unused=1,
  )
  b, _ = tx.update(
    g, tx.init(PARAMS), PARAMS, grad_fn=lambda p: jax.grad(data_loss)(p, x, y)
  )
  assert leaves_bitwise_equal(a, b)
  assert not leaves_bitwise_equal(a, g)


# ----------------------------------------------------------------------------
# Composition.
# ----------------------------------------------------------------------------


def shifted_loss(p, x):
  return small_loss(jax.tree.map(lambda a: a - x, p))


def sam_by_hand(direction, p, x, rho):
  """The gradient of `shifted_loss(., x)` at `p + rho * direction / |direction|`."""
  norm = optax.tree.norm(direction)
  return jax.grad(shifted_loss)(
    jax.tree.map(lambda a, d: a + rho * d / norm, p, direction), x
  )


def micro_stepper(tx):
  """Jitted `(params, state, x) -> (updates, state)` on micro-batch `x`."""

  @jax.jit
  def step(p, state, x):
    return tx.update(
      jax.grad(shifted_loss)(p, x),
      state,
      p,
      grad_fn=lambda q: jax.grad(shifted_loss)(q, x),
    )

  return step


MICRO_BATCHES = [0.2, -0.3, 0.1, 0.4]  # two updates of k=2 micro-batches


def test_multisteps_around_the_chain():
  """`MultiSteps(chain(sam, sgd), k)`: the inner chain sees the running mean
  of the micro-batch gradients; on the k-th micro-step its update is kept:
  SAM perturbs along the mean gradient of the k micro-batches, and takes g'
  from that last call's grad_fn (the last micro-batch)."""
  rho, lr = 0.1, 0.05
  tx = optax.MultiSteps(optax.chain(gx.sam(rho), optax.sgd(lr)), every_k_schedule=2)
  step = micro_stepper(tx)
  p, state = PARAMS, tx.init(PARAMS)
  for n in range(2):
    x0, x1 = MICRO_BATCHES[2 * n : 2 * n + 2]
    u0, state = step(p, state, jnp.float32(x0))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(u0))
    u1, state = step(p, state, jnp.float32(x1))
    gs = [jax.grad(shifted_loss)(p, jnp.float32(x)) for x in (x0, x1)]
    mean = jax.tree.map(lambda a, b: (a + b) / 2, *gs)
    want = jax.tree.map(lambda g: -lr * g, sam_by_hand(mean, p, jnp.float32(x1), rho))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u1, want)
    assert int(state.inner_opt_state[0].count) == n + 1  # one per k micro-steps
    p = optax.apply_updates(p, u1)


def test_multisteps_after_the_transform():
  """`chain(sam, MultiSteps(sgd, k))`: every micro-step perturbs with its own
  micro-batch's gradient and grad_fn; the mean of the k SAM gradients is
  applied on the k-th micro-step."""
  rho, lr = 0.1, 0.05
  tx = optax.chain(
    gx.sam(rho), optax.MultiSteps(optax.sgd(lr), 2).gradient_transformation()
  )
  step = micro_stepper(tx)
  p, state = PARAMS, tx.init(PARAMS)
  for n in range(2):
    xs = [jnp.float32(x) for x in MICRO_BATCHES[2 * n : 2 * n + 2]]
    u0, state = step(p, state, xs[0])
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(u0))
    u1, state = step(p, state, xs[1])
    per_batch = [sam_by_hand(jax.grad(shifted_loss)(p, x), p, x, rho) for x in xs]
    want = jax.tree.map(lambda a, b: -lr * (a + b) / 2, *per_batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u1, want)
    assert int(state[0].count) == 2 * (n + 1)  # one per micro-step
    p = optax.apply_updates(p, u1)


BIG = jax.tree.map(lambda x: 3.0 * x, PARAMS)  # |grad| ~ 440: clipping acts


def test_clip_before_clips_the_gradient_that_defines_the_perturbation():
  """`chain(clip_by_global_norm(1), finite_difference_gr, ...)`: the
  perturbation steps along the clipped g; the gradient that grad_fn returns
  at the perturbed point is not clipped."""
  gamma, eps, max_norm = 0.1, 0.01, 1.0
  points = []

  def grad_fn(p):  # eager: records where it is evaluated
    points.append(p)
    return jax.grad(small_loss)(p)

  tx = optax.chain(
    optax.clip_by_global_norm(max_norm), gx.finite_difference_gr(gamma, eps)
  )
  g = jax.grad(small_loss)(BIG)
  assert float(optax.tree.norm(g)) > 10 * max_norm
  u, _ = tx.update(g, tx.init(BIG), BIG, grad_fn=grad_fn)
  gc = jax.tree.map(lambda x: x * max_norm / optax.tree.norm(g), g)
  want_point = jax.tree.map(lambda p, d: p + eps * d, BIG, gc)
  (point,) = points
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), point, want_point
  )
  g_at = jax.grad(small_loss)(want_point)  # not clipped
  assert float(optax.tree.norm(g_at)) > 10 * max_norm
  want = jax.tree.map(lambda c, h: c + gamma / eps * (h - c), gc, g_at)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), u, want)

  # SAM's perturbation is normalized: clipping g first does not move it, and
  # the SAM gradient itself is not clipped.
  sam_clipped = optax.chain(optax.clip_by_global_norm(max_norm), gx.sam(0.05))
  u, _ = sam_clipped.update(g, sam_clipped.init(BIG), BIG, grad_fn=jax.grad(small_loss))
  want = sam_by_hand(g, BIG, 0.0, 0.05)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u, want)
  assert float(optax.tree.norm(u)) > 10 * max_norm


def test_clip_before_one_sided_differences_mix_clipped_and_unclipped():
  """Why the transform goes first: with clipping active before it, the
  one-sided schemes difference the clipped g against an unclipped gradient,
  which is no estimate of H g; the central scheme (two perturbed gradients)
  still is."""
  gamma, eps, max_norm = 0.01, 1e-3, 1.0
  g = jax.grad(small_loss)(BIG)
  gc = jax.tree.map(lambda x: x * max_norm / optax.tree.norm(g), g)
  _, hgc = jax.jvp(jax.grad(small_loss), (BIG,), (gc,))
  exact = jax.tree.map(lambda c, h: c + gamma * h, gc, hgc)
  err = {}
  for scheme in ("forward", "central"):
    tx = optax.chain(
      optax.clip_by_global_norm(max_norm),
      gx.finite_difference_gr(gamma, eps, scheme=scheme),
    )
    u, _ = tx.update(g, tx.init(BIG), BIG, grad_fn=jax.grad(small_loss))
    diff = jax.tree.map(jnp.subtract, u, exact)
    err[scheme] = float(optax.tree.norm(diff) / optax.tree.norm(exact))
  assert err["central"] < 1e-2, err
  assert err["forward"] > 10, err


@pytest.mark.parametrize(
  "make",
  [
    lambda: gx.penalized_grad(0.05, 0.8),
    lambda: gx.sam(0.05, every_k=2),
    lambda: gx.finite_difference_gr(0.01, 0.001, scheme="backward"),
    lambda: gx.gradient_regularization(0.01),
  ],
)
def test_clip_before_and_after_give_finite_results(make):
  max_norm = 1.0
  before = optax.chain(optax.clip_by_global_norm(max_norm), make(), optax.sgd(1e-3))
  after = optax.chain(make(), optax.clip_by_global_norm(max_norm), optax.sgd(1.0))
  g = jax.grad(small_loss)(BIG)
  u, _ = before.update(g, before.init(BIG), BIG, grad_fn=jax.grad(small_loss))
  assert all_finite(u)
  p, state = BIG, after.init(BIG)
  for _ in range(3):
    u, state = after.update(
      jax.grad(small_loss)(p), state, p, grad_fn=jax.grad(small_loss)
    )
    assert all_finite(u)
    # sgd(1.0) after the clip: |update| <= max_norm.
    assert float(optax.tree.norm(u)) <= max_norm * (1 + 1e-5)
    p = optax.apply_updates(p, u)
  assert float(small_loss(p)) < 0.5 * float(small_loss(BIG))


def test_backtracking_linesearch_shares_value_fn():
  """`chain(sam, sgd(1), scale_by_backtracking_linesearch)` with optax's
  calling convention (`value`, `grad`, `value_fn`, and the batch as keyword
  arguments of value_fn): SAM differentiates value_fn at the perturbed point,
  the line search evaluates it along the SAM direction; the loss decreases on
  every step."""
  x, y = DATA
  tx = optax.chain(
    gx.sam(0.05),
    optax.sgd(1.0),
    optax.scale_by_backtracking_linesearch(max_backtracking_steps=15),
  )

  @jax.jit
  def step(p, state):
    value, grad = jax.value_and_grad(data_loss)(p, x, y)
    u, state = tx.update(
      grad, state, p, value=value, grad=grad, value_fn=data_loss, x=x, y=y
    )
    return optax.apply_updates(p, u), state, value

  p, state = PARAMS, tx.init(PARAMS)
  values = []
  for _ in range(10):
    p, state, value = step(p, state)
    values.append(float(value))
  values.append(float(data_loss(p, x, y)))
  assert all(b < a for a, b in zip(values, values[1:], strict=False)), values
  assert values[-1] < 0.75 * values[0], values
  assert int(state[0].count) == 10

  # The line search rejects keyword arguments that its value_fn does not take,
  # grad_fn included: with a line search, pass value_fn, not grad_fn.
  grad = jax.grad(data_loss)(p, x, y)
  with pytest.raises(TypeError, match=r"not consumed by `value_fn`: \['grad_fn'\]"):
    tx.update(
      grad,
      state,
      p,
      value=data_loss(p, x, y),
      grad=grad,
      value_fn=data_loss,
      x=x,
      y=y,
      grad_fn=lambda q: jax.grad(data_loss)(q, x, y),
    )
