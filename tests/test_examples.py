"""Tests of the digits example: data, models, NNX train step and CLI."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gnorm_optax.examples import data, models, train

N_SAMPLES = 1797  # size of scikit-learn's digits data set


def _batch(n: int = 32) -> tuple[jax.Array, jax.Array]:
  digits = data.load_digits(seed=0)
  return jnp.asarray(digits.x_train[:n]), jnp.asarray(digits.y_train[:n])


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def test_load_digits_shapes_dtypes_and_range():
  digits = data.load_digits(test_fraction=0.25)
  n_test = round(0.25 * N_SAMPLES)
  assert digits.x_train.shape == (N_SAMPLES - n_test, 8, 8, 1)
  assert digits.x_test.shape == (n_test, 8, 8, 1)
  assert digits.y_train.shape == (N_SAMPLES - n_test,)
  assert digits.y_test.shape == (n_test,)
  assert digits.x_train.dtype == digits.x_test.dtype == np.float32
  assert digits.y_train.dtype == digits.y_test.dtype == np.int32
  for x in (digits.x_train, digits.x_test):
    assert x.min() == 0.0 and x.max() == 1.0
  assert set(np.unique(digits.y_test)) == set(range(data.NUM_CLASSES))


def test_load_digits_is_deterministic_given_seed():
  a, b = data.load_digits(label_noise=0.3, seed=7), data.load_digits(
      label_noise=0.3, seed=7
  )
  for left, right in zip(a, b):
    np.testing.assert_array_equal(left, right)
  c = data.load_digits(label_noise=0.3, seed=8)
  assert not np.array_equal(a.x_test, c.x_test)


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.2, 0.5, 1.0])
def test_label_noise_corrupts_exactly_the_fraction_of_train_labels(noise):
  clean = data.load_digits(label_noise=0.0, seed=3)
  noisy = data.load_digits(label_noise=noise, seed=3)
  # Same split whatever the noise; test set untouched.
  np.testing.assert_array_equal(noisy.x_train, clean.x_train)
  np.testing.assert_array_equal(noisy.x_test, clean.x_test)
  np.testing.assert_array_equal(noisy.y_test, clean.y_test)
  changed = noisy.y_train != clean.y_train
  assert changed.sum() == round(noise * len(clean.y_train))
  assert noisy.y_train.min() >= 0 and noisy.y_train.max() < data.NUM_CLASSES


def test_corrupt_labels_is_symmetric_over_the_other_classes():
  labels = np.zeros(9000, np.int32)
  noisy = data.corrupt_labels(labels, 1.0, np.random.default_rng(0))
  counts = np.bincount(noisy, minlength=data.NUM_CLASSES)
  assert counts[0] == 0
  np.testing.assert_allclose(counts[1:] / 1000, 1.0, atol=0.15)


@pytest.mark.parametrize(
    "kwargs", [dict(test_fraction=0.0), dict(test_fraction=1.0), dict(label_noise=1.5)]
)
def test_load_digits_rejects_bad_fractions(kwargs):
  with pytest.raises(ValueError, match="must be in"):
    data.load_digits(**kwargs)


def test_iterate_batches_drops_the_remainder_and_reshuffles():
  x = np.arange(10)[:, None]
  y = np.arange(10)
  rng = np.random.default_rng(0)
  epoch1 = list(data.iterate_batches(x, y, 3, rng))
  epoch2 = list(data.iterate_batches(x, y, 3, rng))
  assert [xb.shape for xb, _ in epoch1] == [(3, 1)] * 3
  seen = np.concatenate([yb for _, yb in epoch1])
  assert len(set(seen)) == 9  # no repeats, one sample dropped
  for xb, yb in epoch1:
    np.testing.assert_array_equal(xb[:, 0], yb)  # inputs stay paired with labels
  assert not np.array_equal(seen, np.concatenate([yb for _, yb in epoch2]))
  with pytest.raises(ValueError, match="batch_size"):
    next(data.iterate_batches(x, y, 11, rng))


# ----------------------------------------------------------------------------
# Models and the train step.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_map_images_to_logits(name):
  model = models.make_model(name, seed=0)
  x, _ = _batch(5)
  logits = model(x)
  assert logits.shape == (5, data.NUM_CLASSES)
  assert jnp.all(jnp.isfinite(logits))
  assert 1_000 < models.count_params(model) < 50_000


def test_make_model_rejects_unknown_name():
  with pytest.raises(ValueError, match="choose from"):
    models.make_model("resnet")


def test_make_grad_fn_is_the_gradient_at_its_argument_and_pure():
  model = models.make_model("cnn", seed=0)
  x, y = _batch()
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grad_fn = jax.jit(train.make_grad_fn(model, x, y))
  nnx_grad = nnx.jit(nnx.grad(train.loss_fn))

  # At the model's own parameters: the ordinary NNX gradient.
  expected = nnx.as_pure(nnx_grad(model, x, y))
  jax.tree.map(np.testing.assert_allclose, grad_fn(params), expected)

  # At other parameters: the gradient of a model holding those parameters,
  # and the original model is left untouched.
  shifted = jax.tree.map(lambda p: p + 0.1, params)
  other = models.make_model("cnn", seed=0)
  nnx.update(other, shifted)
  expected = nnx.as_pure(nnx_grad(other, x, y))
  got = grad_fn(shifted)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      got,
      expected,
  )
  jax.tree.map(
      np.testing.assert_array_equal,
      nnx.as_pure(nnx.state(model, nnx.Param)),
      params,
  )


@pytest.mark.parametrize("method", ["sgd", "sam", "gnp", "fdgr", "flooding"])
def test_train_step_matches_a_pure_optax_step(method):
  """The NNX step equals tx.update on plain pytrees with jax.grad's grad_fn."""
  model = models.make_model("mlp", seed=0)
  x, y = _batch()
  tx = train.make_optimizer(method, lr=0.1, steps=10, flood_level=5.0)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)

  def pure_loss(p):
    return train.loss_fn(nnx.merge(graphdef, p), x, y)

  @jax.jit
  def reference_step(params):
    loss, grads = jax.value_and_grad(pure_loss)(params)
    updates, _ = tx.update(
        grads, tx.init(params), params, grad_fn=jax.grad(pure_loss), value=loss
    )
    return loss, optax.apply_updates(params, updates)

  loss, expected = reference_step(params)

  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  step_loss = train.train_step(model, optimizer, x, y)
  np.testing.assert_allclose(step_loss, loss, rtol=1e-6)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      nnx.as_pure(nnx.state(model, nnx.Param)),
      expected,
  )


def test_second_gradient_methods_change_the_step():
  """SAM's step differs from SGD's: the grad_fn really reaches the optimizer."""
  x, y = _batch()
  stepped = {}
  for method in ("sgd", "sam"):
    model = models.make_model("mlp", seed=0)
    tx = train.make_optimizer(method, lr=0.1, steps=10, rho=0.5)
    train.train_step(model, nnx.Optimizer(model, tx, wrt=nnx.Param), x, y)
    stepped[method] = nnx.as_pure(nnx.state(model, nnx.Param))
  diffs = jax.tree.map(
      lambda a, b: float(jnp.abs(a - b).max()), stepped["sgd"], stepped["sam"]
  )
  assert max(jax.tree.leaves(diffs)) > 1e-4


def test_make_optimizer_rejects_unknown_method():
  with pytest.raises(ValueError, match="unknown method"):
    train.make_optimizer("adam", lr=0.1, steps=10)


# ----------------------------------------------------------------------------
# Training runs.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", sorted(models.MODELS))
@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_trains_one_epoch(method, model):
  config = train.TrainConfig(
      method=method, model=model, epochs=1, batch_size=50, train_size=200
  )
  results = train.run(config)
  assert len(results["train_loss"]) == len(results["test_accuracy"]) == 1
  assert math.isfinite(results["train_loss"][0])
  assert 0.0 <= results["final_test_accuracy"] <= 1.0
  assert results["config"]["lr"] == train.default_lr(method)


def test_sgd_learns_the_clean_digits():
  config = train.TrainConfig(method="sgd", model="mlp", epochs=5, label_noise=0.0)
  results = train.run(config)
  assert results["train_loss"][-1] < results["train_loss"][0]
  assert results["final_test_accuracy"] > 0.9


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def test_cli_defaults_are_the_config_defaults():
  assert train.parse_args([]) == train.TrainConfig()
  assert train.TrainConfig().method == "sam"
  assert train.TrainConfig().model == "cnn"
  assert train.TrainConfig().label_noise == 0.2


def test_cli_parses_every_option():
  argv = (
      "--method gnp --model mlp --epochs 3 --batch-size 32 --lr 0.2 "
      "--momentum 0.5 --rho 0.1 --alpha 0.7 --gamma 0.02 --epsilon 0.05 "
      "--flood-level 0.8 --label-noise 0.4 --train-size 100 --seed 5"
  ).split()
  expected = train.TrainConfig(
      method="gnp", model="mlp", epochs=3, batch_size=32, lr=0.2, momentum=0.5,
      rho=0.1, alpha=0.7, gamma=0.02, epsilon=0.05, flood_level=0.8,
      label_noise=0.4, train_size=100, seed=5,
  )  # fmt: skip
  assert train.parse_args(argv) == expected
  assert {f.name for f in dataclasses.fields(train.TrainConfig)} == set(
      vars(train.build_parser().parse_args(argv))
  )


@pytest.mark.parametrize(
    "flag, bad, choices",
    [("--method", "adam", train.METHODS), ("--model", "resnet", models.MODELS)],
)
def test_cli_rejects_unknown_choice_listing_the_valid_ones(flag, bad, choices, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.parse_args([flag, bad])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"invalid choice: '{bad}'" in err
  for choice in choices:
    assert f"'{choice}'" in err


def test_main_prints_the_test_accuracy(capsys):
  results = train.main(
      ["--method", "sgd", "--model", "mlp", "--epochs", "1", "--train-size", "200"]
  )
  out = capsys.readouterr().out
  assert f"test accuracy: {results['final_test_accuracy']:.3f}" in out
