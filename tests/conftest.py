"""Shared test cases and fixtures.

The cases: one per public transformation (and variant), as the conformance
suite calls them; see `Case`. A test that takes a `case` argument runs once
per case (`pytest_generate_tests` below), or once per case that the test's
`@pytest.mark.cases(predicate)` selects.

The problem: a small nested pytree (`make_params`) and a smooth non-quadratic
loss with its minimum at 0 (`loss_fn`), shared by the conformance,
reliability, property and checkpoint tests; each piece is also a fixture.

Fixtures: `cases` (the list), `make_params`, `loss_fn`, `params_sequence`,
`update_kwargs`, `in_front_of`, `strict_rank_promotion` (modules opt in with
`pytestmark = pytest.mark.usefixtures("strict_rank_promotion")`) and `x64`.

`tests/checkpoint_resume.py` also runs as a script in a new process, so it
imports this module's plain functions directly; test modules get them from
the fixtures.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import settings

import gnorm_optax as gx

# Hypothesis: no deadline (the first example of a tree compiles its kernels).
settings.register_profile("gnorm_optax", deadline=None)
settings.load_profile("gnorm_optax")


# ----------------------------------------------------------------------------
# The cases.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One public transformation, as the conformance tests call it.

  Attributes:
    id: test id.
    make: factory; its numeric hyperparameters are keyword arguments (so they
      can be schedules, and so `optax.inject_hyperparams` can wrap it).
    hparams: the hyperparameters used by default (each may be a schedule).
    alt: other values for some hyperparameters, far enough from `hparams` to
      change the update; used by the schedule and inject_hyperparams tests.
    needs: what `update` needs: "grad_fn" (second-gradient transforms),
      "value" (flooding) or "nothing" (AGR and the AGR optimizers).
    optimizer: the case is a whole optimizer (it has its own learning rate),
      so it is run alone instead of in front of sgd / adam.
    quad: hyperparameters for the convex quadratic.
    rosen: hyperparameters for Rosenbrock.
    stalls: (problem, base) pairs on which the method provably stalls (see
      `test_conformance.test_convergence`); the test then checks the stall.
    grad_fn_runs: with `needs="grad_fn"`, how many times `grad_fn` runs on
      open-loop steps whose clean gradients are `grads` (flat float64
      arrays), worked out by hand from the method's definition.
  """

  id: str
  make: Callable[..., Any]
  hparams: Mapping[str, Any]
  alt: Mapping[str, float]
  needs: str
  optimizer: bool = False
  quad: Mapping[str, Any] | None = None
  rosen: Mapping[str, Any] | None = None
  stalls: frozenset = frozenset()
  grad_fn_runs: Callable[[list[np.ndarray]], int] | None = None

  def __str__(self):
    return self.id


def _every_step(grads, per_step=1):
  """One extra gradient (`per_step` for the central difference) a step."""
  return per_step * len(grads)


def _every_third_step(runs):
  """every_k=3: the runs of steps 0, 3, 6, ... only."""
  return lambda grads: runs(grads[::3])


# AE-SAM's case: its threshold, and its policy written out (Jiang et al.
# 2023, Algorithm 1): running mean and variance of ||g||^2 (decay 0.9),
# updated by the step's own before it is compared.
AE_THRESHOLD = 0.5


def _ae_sam_runs(grads, threshold=AE_THRESHOLD, decay=0.9):
  mean = var = 0.0
  taken = []
  for g in grads:
    sq = float(g @ g)
    mean = decay * mean + (1 - decay) * sq
    var = decay * var + (1 - decay) * (sq - mean) ** 2
    taken.append(sq >= mean + threshold * np.sqrt(var))
  # The case tells something only if the policy both takes and skips.
  assert 0 < sum(taken) < len(taken), taken
  return sum(taken)


def _second_gradient_cases() -> list[Case]:
  pen = dict(rho=0.05, alpha=0.8)
  pen_alt = dict(rho=0.2, alpha=0.5)
  gr = dict(gamma=0.1, epsilon=0.01)
  # Convergence settings: rho and gamma are smaller on Rosenbrock, whose
  # curvature reaches ~1300 at the start (gamma * lambda must stay O(1)), and
  # the finite-difference step epsilon * |g| must stay small there (|g| ~ 200).
  base = [
    Case(
      "penalized_grad",
      gx.penalized_grad,
      pen,
      pen_alt,
      "grad_fn",
      quad=dict(rho=0.01, alpha=0.8),
      rosen=dict(rho=0.003, alpha=0.8),
      grad_fn_runs=_every_step,
    ),
    Case(
      "penalized_grad-normalize_clean",
      functools.partial(gx.penalized_grad, normalize_clean=True),
      pen,
      pen_alt,
      "grad_fn",
      quad=dict(rho=0.01, alpha=0.8),
      rosen=dict(rho=0.003, alpha=0.8),
      grad_fn_runs=_every_step,
    ),
    Case(
      "sam",
      gx.sam,
      dict(rho=0.05),
      dict(rho=0.2),
      "grad_fn",
      quad=dict(rho=0.01),
      rosen=dict(rho=0.003),
      grad_fn_runs=_every_step,
    ),
    Case(
      "sam-adaptive",
      functools.partial(gx.sam, adaptive=True),
      dict(rho=0.05),
      dict(rho=0.2),
      "grad_fn",
      quad=dict(rho=0.01),
      rosen=dict(rho=0.003),
      grad_fn_runs=_every_step,
    ),
    Case(
      "gsam",
      gx.gsam,
      dict(rho=0.05, alpha=0.1),
      dict(rho=0.2, alpha=0.3),
      "grad_fn",
      quad=dict(rho=0.01, alpha=0.1),
      rosen=dict(rho=0.003, alpha=0.1),
      grad_fn_runs=_every_step,
    ),
  ]
  for scheme in ("forward", "backward", "central"):
    base.append(
      Case(
        f"finite_difference_gr-{scheme}",
        functools.partial(gx.finite_difference_gr, scheme=scheme),
        gr,
        dict(gamma=0.3, epsilon=0.02),
        "grad_fn",
        quad=dict(gamma=0.05, epsilon=0.01),
        rosen=dict(gamma=2e-4, epsilon=1e-4),
        grad_fn_runs=functools.partial(
          _every_step, per_step=2 if scheme == "central" else 1
        ),
      )
    )
  base.append(
    Case(
      "gradient_regularization",
      gx.gradient_regularization,
      dict(gamma=0.1),
      dict(gamma=0.3),
      "grad_fn",
      quad=dict(gamma=0.05),
      rosen=dict(gamma=2e-4),
      grad_fn_runs=_every_step,  # one jvp of grad_fn
    )
  )
  every_3 = [
    dataclasses.replace(
      c,
      id=f"{c.id}-every_k=3",
      make=functools.partial(c.make, every_k=3),
      grad_fn_runs=_every_third_step(c.grad_fn_runs),
    )
    for c in base
  ]
  # The other policies for the steps between refreshes: LookSAM's reuse and
  # AE-SAM's adaptive choice of the steps that refresh.
  looksam = Case(
    "sam-looksam-every_k=3",
    functools.partial(gx.sam, reuse="looksam", every_k=3),
    dict(rho=0.05, looksam_alpha=0.7),
    dict(rho=0.2, looksam_alpha=0.3),
    "grad_fn",
    quad=dict(rho=0.01),
    rosen=dict(rho=0.003),
    grad_fn_runs=_every_third_step(_every_step),
  )
  ae = dict(ae_threshold=AE_THRESHOLD)
  ae_sam = Case(
    "sam-ae",
    gx.sam,
    dict(rho=0.05, **ae),
    # threshold 0 takes the extra gradient on the step the test changes it
    dict(rho=0.2, ae_threshold=0.0),
    "grad_fn",
    quad=dict(rho=0.01, **ae),
    rosen=dict(rho=0.003, **ae),
    grad_fn_runs=_ae_sam_runs,
  )
  return base + every_3 + [looksam, ae_sam]


CASES: list[Case] = _second_gradient_cases() + [
  # Level 0 in the convergence tests: sign(L - 0) = 1 while L > 0, so
  # flooding is plain descent there (a flood level b > 0 stops at L ~ b).
  Case(
    "flooding",
    gx.flooding,
    dict(level=0.5),
    dict(level=1e3),
    "value",
    quad=dict(level=0.0),
    rosen=dict(level=0.0),
  ),
  # AGR: g_i <- g_i (1 - |g_i| / sum_j |g_j|) per tensor. The factor
  # vanishes when one entry carries all of its tensor's gradient mass, so
  # plain descent stalls where every tensor's gradient has a single nonzero
  # entry (always for a size-1 tensor; for Rosenbrock's 2-vector on the
  # valley floor, where dL/dy = 0). Adam's normalisation rescues the
  # quadratic, not Rosenbrock. These stalls are the published formula
  # (hjiang24/AGR-method, AGR.py), not a library fault: see test_convergence.
  Case(
    "adaptive_gradient_regularization",
    gx.adaptive_gradient_regularization,
    {},
    {},
    "nothing",
    quad={},
    rosen={},
    stalls=frozenset(
      {("quadratic", "sgd"), ("rosenbrock", "sgd"), ("rosenbrock", "adam")}
    ),
  ),
  Case(
    "agr_adamw",
    gx.agr_adamw,
    dict(learning_rate=0.1),
    dict(learning_rate=0.3),
    "nothing",
    optimizer=True,
    quad=dict(learning_rate=0.05),
    rosen=dict(learning_rate=0.02),
    stalls=frozenset({("rosenbrock", "alone")}),
  ),
  Case(
    "agr_adan",
    gx.agr_adan,
    dict(learning_rate=0.1),
    dict(learning_rate=0.3),
    "nothing",
    optimizer=True,
    quad=dict(learning_rate=0.1),
    rosen=dict(learning_rate=0.02),
  ),
  Case(
    "adan",
    gx.adan,
    dict(learning_rate=0.1),
    dict(learning_rate=0.3),
    "nothing",
    optimizer=True,
    quad=dict(learning_rate=0.1),
    rosen=dict(learning_rate=0.02),
  ),
]

CASES_BY_ID: dict[str, Case] = {case.id: case for case in CASES}


def pytest_configure(config):
  config.addinivalue_line(
    "markers",
    "cases(predicate): run the test only for the cases (of conftest.CASES) "
    "for which predicate(case) is true",
  )


def pytest_generate_tests(metafunc):
  """A test taking `case` (and not parametrizing it itself) runs per case."""
  if "case" not in metafunc.fixturenames:
    return
  if any("case" in m.args[0] for m in metafunc.definition.iter_markers("parametrize")):
    return
  marker = metafunc.definition.get_closest_marker("cases")
  selected = [c for c in CASES if marker is None or marker.args[0](c)]
  assert selected, f"{metafunc.function.__name__}: no case selected"
  metafunc.parametrize("case", selected, ids=str)


# ----------------------------------------------------------------------------
# The problem: a dict with a matrix, a vector and a tuple (with a scalar).
# ----------------------------------------------------------------------------


def make_params(dtype=jnp.float32, scale=1.0):
  return {
    "w": jnp.asarray([[0.5, -1.0], [1.5, 0.3], [-0.7, 0.9]], dtype) * scale,
    "b": jnp.asarray([0.2, -0.4], dtype) * scale,
    "t": (
      jnp.asarray([1.1, -0.6, 0.4], dtype) * scale,
      jnp.asarray(-0.8, dtype) * scale,
    ),
  }


def loss_fn(params):
  """A smooth, non-quadratic loss with its minimum at 0, computed in f32."""
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(params)]
  quad = sum(jnp.sum((1.0 + i) * 0.5 * x**2) for i, x in enumerate(leaves))
  quartic = sum(jnp.sum(0.25 * x**4) for x in leaves)
  coupling = 0.1 * sum(jnp.sum(x) for x in leaves) ** 2
  return quad + quartic + coupling


def params_sequence(n, dtype=jnp.float32):
  """Open-loop parameters: the same inputs for every run that is compared."""
  p0 = make_params(dtype)

  def shift(x, t):
    return (x * (1.0 - 0.15 * t) + 0.05 * t).astype(x.dtype)

  return [jax.tree.map(lambda x, t=t: shift(x, t), p0) for t in range(n)]


def update_kwargs(case: Case, loss, value) -> dict[str, Any]:
  """What `case`'s update needs: `grad_fn` (of `loss`), `value`, or nothing."""
  if case.needs == "grad_fn":
    return {"grad_fn": jax.grad(loss)}
  if case.needs == "value":
    return {"value": value}
  return {}


def in_front_of(case: Case, tx, base):
  """The case chained in front of a base optimizer (an optimizer alone)."""
  return tx if case.optimizer else optax.chain(tx, base)


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cases() -> list[Case]:
  return CASES


@pytest.fixture(scope="session", name="make_params")
def _make_params_fixture():
  return make_params


@pytest.fixture(scope="session", name="loss_fn")
def _loss_fn_fixture():
  return loss_fn


@pytest.fixture(scope="session", name="params_sequence")
def _params_sequence_fixture():
  return params_sequence


@pytest.fixture(scope="session", name="update_kwargs")
def _update_kwargs_fixture():
  return update_kwargs


@pytest.fixture(scope="session", name="in_front_of")
def _in_front_of_fixture():
  return in_front_of


@pytest.fixture
def strict_rank_promotion():
  """`jax_numpy_rank_promotion="raise"`: no implicit rank broadcasting."""
  with jax.numpy_rank_promotion("raise"):
    yield


@pytest.fixture
def x64():
  """`jax_enable_x64` on for the test."""
  with jax.enable_x64(True):
    yield
