"""The conformance suite: every public transformation joins every test here.

The cases (`conftest.CASES`; a test taking `case` runs once per case): each
is a factory that takes its numeric hyperparameters as keywords (so
they can be schedules, and so `optax.inject_hyperparams` can wrap it) plus what
its `update` needs: `grad_fn=` (second-gradient transforms), `value=`
(flooding) or nothing (AGR and the AGR optimizers).

Tests, each over all cases: jit with the params and the state donated
(plain and under `inject_hyperparams`) without retracing; update dtype == gradient
dtype and shapes kept (float32, bfloat16); schedules honoured and
`inject_hyperparams` hyperparameters changeable (every case that has
hyperparameters: all but adaptive_gradient_regularization);
`grad_fn` runs counted against each method's own count; `inject_hyperparams`
equivalence; unknown extra arguments ignored (bare and
chained); convergence on a convex quadratic and on Rosenbrock with sgd and
adam; zero gradients give finite (zero) updates. (Tree, shape and dtype
preservation over random pytrees is in test_properties.py.)
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gnorm_optax as gx

pytestmark = pytest.mark.usefixtures("strict_rank_promotion")


def test_every_public_transform_is_a_case(cases):
  made = set()
  for case in cases:
    fn = case.make
    while isinstance(fn, functools.partial):
      fn = fn.func
    made.add(fn.__name__)
  transforms = {
    "adan",
    "adaptive_gradient_regularization",
    "agr_adamw",
    "agr_adan",
    "finite_difference_gr",
    "flooding",
    "gradient_regularization",
    "gsam",
    "penalized_grad",
    "sam",
  }
  assert transforms <= set(gx.__all__)
  assert made == transforms


# ----------------------------------------------------------------------------
# Running a case on the shared problem (conftest.py): the open-loop parameter
# sequence, `grad_fn` the gradient of `loss_fn`, `value` its value.
# ----------------------------------------------------------------------------


class Runner:
  """Jitted steps of the cases on the shared problem.

  Compiling dominates the run time on CPU, so the transform made from the
  default (`plain`), the alternative (`alt`) and the injected (`inject`)
  hyperparameters are built and compiled once per case and shared by the
  tests of this module (`cached`).
  """

  def __init__(self, loss_fn, update_kwargs):
    self.loss_fn = loss_fn
    self.update_kwargs = update_kwargs
    self.value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
    self._cache: dict[tuple[str, str], tuple[Any, Any]] = {}

  def make_step(self, case, tx, **extra):
    """Jitted `(params, grads, value, state) -> (updates, state)`.

    `step.traces()` counts how many times the step was traced.
    """

    def step(params, grads, value, state):
      step.traces += 1
      return tx.update(
        grads, state, params, **self.update_kwargs(case, self.loss_fn, value), **extra
      )

    step.traces = 0
    jitted = jax.jit(step)
    jitted.traces = lambda: step.traces
    return jitted

  def cached(self, case, variant: str):
    """Returns `(tx, step)` for `variant` in {"plain", "alt", "inject"}."""
    key = (case.id, variant)
    if key not in self._cache:
      if variant == "plain":
        tx = case.make(**case.hparams)
      elif variant == "alt":
        tx = case.make(**{**case.hparams, **case.alt})
      else:
        tx = optax.inject_hyperparams(case.make)(**case.hparams)
      self._cache[key] = (tx, self.make_step(case, tx))
    return self._cache[key]

  def open_loop(self, tx, step, seq, state=None):
    """Runs `step` over the fixed parameter sequence; returns updates, state."""
    state = tx.init(seq[0]) if state is None else state
    outs = []
    for params in seq:
      value, grads = self.value_and_grad(params)
      u, state = step(params, grads, value, state)
      outs.append(u)
    return outs, state


@pytest.fixture(scope="module")
def run(loss_fn, update_kwargs):
  return Runner(loss_fn, update_kwargs)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=atol
    )


def trees_differ(a, b, rtol=1e-3):
  return any(
    not np.allclose(
      np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol, atol=1e-6
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


# ----------------------------------------------------------------------------
# jit and retracing.
# ----------------------------------------------------------------------------


# Under inject_hyperparams, one case per kind of inner state (the wrapper
# adds the same hyperparameter dict to each): compiles are the suite's cost.
_INJECT_DONATION = (
  "sam",
  "finite_difference_gr-central",
  "gradient_regularization",
  "flooding",
  "agr_adamw",
  "adan",
)


def check_donation(case, make, make_params, loss_fn, update_kwargs, in_front_of):
  """The standard Flax / big_vision step: params and state donated, straight
  from `tx.init` (no two state leaves may share a buffer), one trace."""
  tx = in_front_of(case, make(**case.hparams), optax.sgd(0.05))
  traces = 0

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state):
    nonlocal traces
    traces += 1
    value, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(
      grads, opt_state, params, **update_kwargs(case, loss_fn, value)
    )
    return optax.apply_updates(params, updates), opt_state, value

  params = make_params()
  opt_state = tx.init(params)
  first = jax.tree.leaves((params, opt_state))
  losses = []
  for _ in range(4):
    params, opt_state, value = train_step(params, opt_state)
    losses.append(float(value))
  assert traces == 1
  # Really donated (jit prunes the inputs a step never reads, such as a
  # field it only overwrites; those are not donated).
  assert sum(x.is_deleted() for x in first) >= len(jax.tree.leaves(params))
  assert len(set(losses)) == 4  # new values on every step
  assert all(np.isfinite(losses))


def test_jit_with_donated_state_traces_once(
  case, make_params, loss_fn, update_kwargs, in_front_of
):
  check_donation(case, case.make, make_params, loss_fn, update_kwargs, in_front_of)


@pytest.mark.cases(lambda c: c.id in _INJECT_DONATION)
def test_jit_with_donated_injected_state_traces_once(
  case, make_params, loss_fn, update_kwargs, in_front_of
):
  check_donation(
    case,
    optax.inject_hyperparams(case.make),
    make_params,
    loss_fn,
    update_kwargs,
    in_front_of,
  )


# ----------------------------------------------------------------------------
# dtypes and shapes.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_update_dtype_and_shape(case, dtype, run, params_sequence):
  tx, step = run.cached(case, "plain")
  seq = params_sequence(4, dtype)
  state0 = tx.init(seq[0])
  outs, state = run.open_loop(tx, step, seq, state0)
  for params, updates in zip(seq, outs, strict=True):
    _, grads = run.value_and_grad(params)
    assert jax.tree.structure(updates) == jax.tree.structure(grads)
    for u, g in zip(jax.tree.leaves(updates), jax.tree.leaves(grads), strict=True):
      assert u.dtype == g.dtype == dtype
      assert u.shape == g.shape
      assert np.all(np.isfinite(np.asarray(u, np.float32)))

  # The state keeps its structure, shapes and dtypes from step to step.
  def spec(s):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), s)

  assert spec(state) == spec(state0)


# ----------------------------------------------------------------------------
# Schedules.
# ----------------------------------------------------------------------------


@pytest.mark.cases(lambda c: c.alt)
def test_step_schedule_matches_constant_of_each_step(case, run, params_sequence):
  """A schedule that switches from `hparams` to `alt` after step 1 gives, on
  every step, the update of the constant it evaluates to on that step."""

  def switch(a, b):  # a on steps 0 and 1, b from step 2 on
    return optax.join_schedules(
      [optax.constant_schedule(a), optax.constant_schedule(b)], [2]
    )

  sched = {k: switch(case.hparams[k], v) for k, v in case.alt.items()}
  tx_s = case.make(**{**case.hparams, **sched})
  step_s = run.make_step(case, tx_s)
  tx_before, step_before = run.cached(case, "plain")
  tx_after, step_after = run.cached(case, "alt")
  seq = params_sequence(5)

  state_s = tx_s.init(seq[0])
  # Second-gradient and flooding states do not depend on how the
  # hyperparameters were given: the constant transforms then take the schedule
  # run's own state, so that a reused every_k correction is the same one. An
  # optimizer's state differs (optax keeps a schedule count): the constant
  # runs then go on their own, which is the same thing here because the
  # learning rate only scales the output.
  shared = jax.tree.structure(state_s) == jax.tree.structure(tx_before.init(seq[0]))
  own = {"before": tx_before.init(seq[0]), "after": tx_after.init(seq[0])}
  differs = []
  for t, params in enumerate(seq):
    value, grads = run.value_and_grad(params)
    u_s, new_state_s = step_s(params, grads, value, state_s)
    if shared:
      u_before, _ = step_before(params, grads, value, state_s)
      u_after, _ = step_after(params, grads, value, state_s)
    else:
      u_before, own["before"] = step_before(params, grads, value, own["before"])
      u_after, own["after"] = step_after(params, grads, value, own["after"])
    assert_trees_close(u_s, u_before if t < 2 else u_after)
    differs.append(trees_differ(u_before, u_after))
    state_s = new_state_s
  # The switch is visible (on a reuse step of every_k=3, SAM's cached
  # correction does not depend on rho, so not necessarily on every step).
  assert any(differs[2:]), "alt must change the update"
  assert step_s.traces() == 1


# ----------------------------------------------------------------------------
# The cost: how many times grad_fn runs.
# ----------------------------------------------------------------------------


@pytest.mark.cases(lambda c: c.needs == "grad_fn")
def test_grad_fn_runs_as_often_as_the_method_says(case, run, params_sequence):
  """Executions of `grad_fn` in the jitted step (counted by a host callback,
  so a skipped `lax.cond` branch does not count) against the case's own
  count: every step, every third with every_k=3 (LookSAM's reuse included),
  the steps that AE-SAM's policy picks, twice a step for the central
  difference."""
  runs = []
  grad = jax.grad(run.loss_fn)

  def counted_grad_fn(p):
    jax.debug.callback(lambda: runs.append(1))
    return grad(p)

  tx = case.make(**case.hparams)
  step = jax.jit(lambda p, g, s: tx.update(g, s, p, grad_fn=counted_grad_fn))
  seq = params_sequence(10)
  state = tx.init(seq[0])
  grads = []
  for params in seq:
    g = grad(params)
    _, state = step(params, g, state)
    grads.append(np.asarray(ravel_pytree(g)[0], np.float64))
  jax.effects_barrier()
  assert len(runs) == case.grad_fn_runs(grads)


# ----------------------------------------------------------------------------
# optax.inject_hyperparams.
# ----------------------------------------------------------------------------


def test_inject_hyperparams_equals_plain(case, run, params_sequence):
  seq = params_sequence(5)
  want, _ = run.open_loop(*run.cached(case, "plain"), seq)
  tx, step = run.cached(case, "inject")
  got, state = run.open_loop(tx, step, seq)
  for g, w in zip(got, want, strict=True):
    assert_trees_close(g, w)
  for name, value in case.hparams.items():
    np.testing.assert_allclose(state.hyperparams[name], value, rtol=1e-6)
  assert step.traces() == 1  # no retracing of the injected state either


@pytest.mark.cases(lambda c: c.alt)
def test_changing_injected_hyperparams_changes_update(case, run, params_sequence):
  seq = params_sequence(4)
  tx, step = run.cached(case, "inject")
  state = tx.init(seq[0])
  for params in seq[:3]:
    value, grads = run.value_and_grad(params)
    _, state = step(params, grads, value, state)
  changed = state._replace(
    hyperparams={
      **state.hyperparams,
      **{k: jnp.asarray(v, jnp.float32) for k, v in case.alt.items()},
    }
  )
  value, grads = run.value_and_grad(seq[3])
  u_same, _ = step(seq[3], grads, value, state)
  u_changed, new_state = step(seq[3], grads, value, changed)
  assert trees_differ(u_same, u_changed)
  for name, v in case.alt.items():
    np.testing.assert_allclose(new_state.hyperparams[name], v, rtol=1e-6)
  # The changed update is the plain factory's with the new constants (where
  # the inner state can be handed over: not for an optimizer whose schedule
  # state differs).
  if jax.tree.structure(state.inner_state) == jax.tree.structure(
    run.cached(case, "alt")[0].init(seq[0])
  ):
    u_plain, _ = run.cached(case, "alt")[1](seq[3], grads, value, state.inner_state)
    assert_trees_close(u_changed, u_plain)


# ----------------------------------------------------------------------------
# Unknown extra arguments.
# ----------------------------------------------------------------------------


def test_unknown_extra_args_ignored_bare(case, run, params_sequence):
  tx, step = run.cached(case, "plain")
  step_unknown = run.make_step(case, tx, some_unknown=1, other=jnp.ones(3))
  seq = params_sequence(4)
  state_a = state_b = tx.init(seq[0])
  for params in seq:
    value, grads = run.value_and_grad(params)
    u_a, state_a = step(params, grads, value, state_a)
    u_b, state_b = step_unknown(params, grads, value, state_b)
    assert_trees_close(u_a, u_b, rtol=0, atol=0)
  assert_trees_close(state_a, state_b, rtol=0, atol=0)


def test_unknown_extra_args_ignored_in_chain(case, run, params_sequence):
  """`chain(transform, sgd)` with unknown arguments == the transform (without
  them) followed by sgd."""
  tx, step = run.cached(case, "plain")
  sgd = optax.sgd(0.1, momentum=0.9)
  chained = optax.chain(case.make(**case.hparams), sgd)
  step_chained = run.make_step(case, chained, some_unknown=1, other=jnp.ones(3))
  seq = params_sequence(4)
  state, sgd_state = tx.init(seq[0]), sgd.init(seq[0])
  chained_state = chained.init(seq[0])
  for params in seq:
    value, grads = run.value_and_grad(params)
    u, state = step(params, grads, value, state)
    u, sgd_state = sgd.update(u, sgd_state, params)
    u_chained, chained_state = step_chained(params, grads, value, chained_state)
    assert_trees_close(u_chained, u)
  assert_trees_close(chained_state, (state, sgd_state))


# ----------------------------------------------------------------------------
# Convergence with sgd and adam.
# ----------------------------------------------------------------------------


_Q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(9, 9)))
_A = jnp.asarray((_Q * np.linspace(0.5, 4.0, 9)) @ _Q.T, jnp.float32)


def quadratic(params):
  """`0.5 v^T A v` with a dense SPD A (eigenvalues 0.5..4) over all leaves."""
  v = ravel_pytree(params)[0]
  return 0.5 * v @ _A @ v


def rosenbrock(xy):
  x, y = xy[0], xy[1]
  return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


PROBLEMS = {
  # name: (loss, start, steps, bases, final/initial needed)
  "quadratic": (
    quadratic,
    {
      "w": jnp.array([[1.0, -2.0, 1.5], [0.5, 2.0, -1.0]]),
      "b": jnp.array([1.0, -1.0, 2.0]),
    },
    300,
    {"sgd": optax.sgd(0.1), "adam": optax.adam(0.05)},
    1e-3,
  ),
  "rosenbrock": (
    rosenbrock,
    jnp.array([-1.2, 1.0]),
    3000,
    {"sgd": optax.sgd(2e-4, momentum=0.9), "adam": optax.adam(0.02)},
    1 / 50,
  ),
}


def minimize(case, txs, loss, start, steps, update_kwargs):
  """Final parameters of `steps` steps of each transform in `txs` (one jit)."""

  def run(tx, params):
    def body(_, carry):
      params, state = carry
      value, grads = jax.value_and_grad(loss)(params)
      updates, state = tx.update(
        grads, state, params, **update_kwargs(case, loss, value)
      )
      return optax.apply_updates(params, updates), state

    return jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))[0]

  return jax.jit(lambda p: [run(tx, p) for tx in txs])(start)


@functools.cache
def loss_grad_and_agr(problem):
  """Jitted `params -> (loss, |grad|, |AGR(grad)|)` for `problem`."""
  loss = PROBLEMS[problem][0]
  agr = gx.adaptive_gradient_regularization()

  def fn(params):
    value, g = jax.value_and_grad(loss)(params)
    g_agr, _ = agr.update(g, agr.init(g))
    return value, optax.tree.norm(g), optax.tree.norm(g_agr)

  return jax.jit(fn)


@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_convergence(case, problem, update_kwargs, in_front_of):
  loss, start, steps, bases, ratio = PROBLEMS[problem]
  hparams = case.quad if problem == "quadratic" else case.rosen
  evaluate = loss_grad_and_agr(problem)
  initial = float(evaluate(start)[0])
  if case.optimizer:
    bases = {"alone": None}
  txs = [in_front_of(case, case.make(**hparams), b) for b in bases.values()]
  finals = minimize(case, txs, loss, start, steps, update_kwargs)
  for base_name, final_params in zip(bases, finals, strict=True):
    final, g_norm, g_agr_norm = map(float, evaluate(final_params))
    where = f"{case.id} + {base_name} on {problem}: {initial:.3g} -> {final:.3g}"
    assert np.isfinite(final), where
    if (problem, base_name) not in case.stalls:
      assert final < ratio * initial, where
      continue
    # AGR's stall (see CASES): the loss fell well below its start, the
    # gradient is not zero, but AGR maps it to (nearly) zero, because one
    # entry of each tensor carries (nearly) all of the tensor's gradient mass.
    assert final < initial / 4, where
    assert g_norm > 1e-2, where
    assert g_agr_norm < 0.05 * g_norm, where


# ----------------------------------------------------------------------------
# Zero gradients.
# ----------------------------------------------------------------------------


def test_zero_gradients_give_finite_updates(case, run, make_params):
  """Zero gradients, at the minimum (params = 0, where grad_fn is zero too:
  every update is exactly zero) and at params that are not a minimum (zero
  incoming gradient, grad_fn not zero): a zero ascent direction must not
  divide 0 by 0. Four steps: with every_k=3 refresh, reuse, reuse, refresh."""
  tx, step = run.cached(case, "plain")
  params = make_params(scale=0.0)
  value, grads = run.value_and_grad(params)
  assert all(np.all(g == 0) for g in jax.tree.leaves(grads))
  state = tx.init(params)
  for _ in range(4):
    updates, state = step(params, grads, value, state)
    for u in jax.tree.leaves(updates):
      np.testing.assert_array_equal(u, np.zeros_like(u))
  if isinstance(state, gx.SecondGradientState):
    assert int(state.nonfinite_count) == 0

  params = make_params()
  value, _ = run.value_and_grad(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  state = tx.init(params)
  for _ in range(4):
    updates, state = step(params, zeros, value, state)
    for u in jax.tree.leaves(updates):
      assert np.all(np.isfinite(u)), case.id
  for leaf in jax.tree.leaves(state):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  if isinstance(state, gx.SecondGradientState):
    assert int(state.nonfinite_count) == 0
