"""Tests of the example: data, models, NNX train step, runs, summary and CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import jax.flatten_util
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
  a = data.load_digits(label_noise=0.3, seed=7)
  b = data.load_digits(label_noise=0.3, seed=7)
  for left, right in zip(a, b, strict=True):
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
# Models.
# ----------------------------------------------------------------------------

IMAGE_SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]

# A jitted forward pass: one compilation is much faster than eager ops, and
# like an eager call it writes BatchNorm statistics and RNG counters back.
_forward = nnx.jit(lambda model, x: model(x))


@pytest.mark.parametrize("in_shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_models_map_images_to_logits(name, in_shape):
  model = models.make_model(name, seed=0, in_shape=in_shape, num_classes=7)
  x = jax.random.uniform(jax.random.key(0), (3, *in_shape))
  # Training mode: shapes only (tracing is enough, and much cheaper).
  model.train()
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
  assert out.shape == (3, 7)
  # Evaluation mode: the values too.
  model.eval()
  logits = _forward(model, x)
  assert logits.shape == (3, 7)
  assert jnp.all(jnp.isfinite(logits))
  assert 1_000 < models.count_params(model) < 250_000


def test_make_model_defaults_to_digits():
  model = models.make_model("cnn")
  x, _ = _batch(5)
  assert _forward(model, x).shape == (5, data.NUM_CLASSES)


def test_make_model_rejects_unknown_name():
  with pytest.raises(ValueError, match="choose from"):
    models.make_model("transformer")


def test_vit_patch_size_follows_the_image_size():
  assert [models.default_patch(s) for s in IMAGE_SHAPES] == [2, 4, 4]
  with pytest.raises(ValueError, match="patch must divide"):
    models.ViT((10, 10, 1), patch=4, rngs=nnx.Rngs(0))


def _non_params(model: nnx.Module) -> list[np.ndarray]:
  state = nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param)))
  return [
      np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
                 else x)
      for x in jax.tree.leaves(state)
  ]  # fmt: skip


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_eval_mode_is_deterministic_and_stateless(name):
  model = models.make_model(name, seed=0)
  x, _ = _batch(8)
  model.train()
  before = _non_params(model)
  train_logits = [_forward(model, x), _forward(model, x)]
  # Training mode moves BatchNorm statistics / the dropout stream ...
  after = _non_params(model)
  assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))
  if name == "vit":  # ... and dropout draws a new mask on every call.
    assert not np.allclose(*train_logits)
  model.eval()
  before = _non_params(model)
  np.testing.assert_array_equal(_forward(model, x), _forward(model, x))
  for a, b in zip(before, _non_params(model), strict=True):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------


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


def test_sam_step_keeps_the_batchnorm_statistics_of_the_clean_pass():
  """The perturbed pass of SAM leaves no trace in the BatchNorm statistics."""
  model = models.make_model("resnet", seed=0)
  clean = nnx.clone(model)
  x, y = _batch()
  tx = train.make_optimizer("sam", lr=0.1, steps=10, rho=0.5)
  train.train_step(model, nnx.Optimizer(model, tx, wrt=nnx.Param), x, y)
  _forward(clean, x)  # one pass in training mode: what the statistics should be
  for a, b in zip(_non_params(model), _non_params(clean), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_make_optimizer_rejects_unknown_method():
  with pytest.raises(ValueError, match="unknown method"):
    train.make_optimizer("adam", lr=0.1, steps=10)


# ----------------------------------------------------------------------------
# Training runs.
# ----------------------------------------------------------------------------

# One-epoch runs of every model with every method, on 64 samples, without the
# Hessian diagnostic (compiling the train step is most of the cost).
SMOKE_CASES = [(model, method) for model in models.MODELS for method in train.METHODS]


@pytest.mark.parametrize("model, method", SMOKE_CASES)
def test_every_model_and_method_trains_one_epoch(model, method):
  config = train.TrainConfig(
      method=method, model=model, epochs=1, batch_size=32, train_size=64,
      test_size=64, probe_size=64, hessian_iters=0,
  )  # fmt: skip
  results = train.run(config)
  assert len(results["train_loss"]) == len(results["test_accuracy"]) == 1
  assert math.isfinite(results["final_train_loss"])
  assert 0.0 <= results["final_test_accuracy"] <= 1.0
  assert math.isfinite(results["grad_norm"]) and results["grad_norm"] > 0
  assert results["hessian_top_eigenvalue"] is None
  assert results["config"]["lr"] == train.default_lr(method)


def test_run_takes_the_image_shape_from_the_data(monkeypatch):
  """A 32x32x3 data set (as CIFAR-10) reaches a model built for that shape."""
  rng = np.random.default_rng(0)

  def fake_load_dataset(name, **kwargs):
    del kwargs
    assert name == "cifar10"
    x = rng.uniform(size=(96, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, data.NUM_CLASSES, size=96).astype(np.int32)
    return data.Dataset(x[:64], y[:64], x[64:], y[64:])

  monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
  config = train.TrainConfig(
      method="sgd", model="cnn", dataset="cifar10", epochs=1, batch_size=32,
      hessian_iters=0,
  )  # fmt: skip
  results = train.run(config)
  assert results["num_params"] == models.count_params(
      models.make_model("cnn", in_shape=(32, 32, 3))
  )
  assert math.isfinite(results["final_train_loss"])


def test_sgd_learns_the_clean_digits():
  config = train.TrainConfig(
      method="sgd", model="mlp", epochs=5, lr=0.05, label_noise=0.0, hessian_iters=0
  )
  results = train.run(config)
  assert results["train_loss"][-1] < results["train_loss"][0]
  assert results["final_test_accuracy"] > 0.9


def test_flatness_matches_the_gradient_and_an_exact_eigenvalue():
  # A model small enough for the exact Hessian (55 parameters).
  model = models.MLP((2, 2, 1), num_classes=3, hidden=4, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (32, 2, 2, 1))
  y = jnp.arange(32) % 3
  got = train.flatness(model, x, y, key=jax.random.key(0), hessian_iters=100)
  graphdef, params = nnx.split(model, nnx.Param)
  flat, unravel = jax.flatten_util.ravel_pytree(nnx.as_pure(params))

  def loss(v):
    return train.loss_fn(nnx.merge(graphdef, unravel(v)), x, y)

  np.testing.assert_allclose(
      got["grad_norm"], jnp.linalg.norm(jax.jit(jax.grad(loss))(flat)), rtol=1e-5
  )
  eigenvalues = np.linalg.eigvalsh(jax.jit(jax.hessian(loss))(flat))
  # The largest (algebraic) eigenvalue, which Lanczos returns.
  np.testing.assert_allclose(got["hessian_top_eigenvalue"], eigenvalues[-1], rtol=1e-3)


# ----------------------------------------------------------------------------
# Summary table and files.
# ----------------------------------------------------------------------------


def _fake_run(method: str, seed: int, accuracy: float, eig: float | None) -> dict:
  return {
      "config": {"method": method, "seed": seed},
      "train_loss": [2.0, 1.0], "test_accuracy": [0.5, accuracy],
      "final_train_loss": 1.0, "final_test_accuracy": accuracy,
      "grad_norm": 0.1, "hessian_top_eigenvalue": eig, "wall_time_s": 2.0,
  }  # fmt: skip


def test_summarize_gives_mean_and_std_per_method_in_order():
  runs = [
      _fake_run("sgd", 0, 0.8, 4.0), _fake_run("sgd", 1, 0.9, 6.0),
      _fake_run("sam", 0, 0.95, None),
  ]  # fmt: skip
  rows = train.summarize(runs)
  assert [r["method"] for r in rows] == ["sgd", "sam"]
  assert rows[0]["seeds"] == [0, 1]
  np.testing.assert_allclose(rows[0]["final_test_accuracy"]["mean"], 0.85)
  np.testing.assert_allclose(
      rows[0]["final_test_accuracy"]["std"], np.std([0.8, 0.9], ddof=1)
  )
  assert rows[0]["hessian_top_eigenvalue"] == {"mean": 5.0, "std": math.sqrt(2.0)}
  assert rows[1]["final_test_accuracy"] == {"mean": 0.95, "std": 0.0}
  assert rows[1]["hessian_top_eigenvalue"] == {"mean": None, "std": None}
  table = train.format_table(rows).splitlines()
  assert table[0].split()[:3] == ["method", "test", "acc"]
  assert "0.850 ± 0.071" in table[1] and "5.00 ± 1.41" in table[1]
  assert "0.950" in table[2] and "±" not in table[2]  # one seed: no spread


def test_main_prints_the_table_and_writes_json_and_png(tmp_path, capsys):
  argv = (
      "--method sgd,sam --model mlp --seeds 0,1 --epochs 2 --train-size 64 "
      f"--test-size 64 --probe-size 64 --hessian-iters 5 --out-dir {tmp_path}"
  ).split()
  out = train.main(argv)
  printed = capsys.readouterr().out
  assert train.format_table(out["summary"]) in printed
  for row in out["summary"]:
    assert row["seeds"] == [0, 1]
    for metric in train.SUMMARY_METRICS:
      assert math.isfinite(row[metric]["mean"]) and row[metric]["std"] >= 0
    assert row["grad_norm"]["mean"] > 0

  json_path, png_path = (tmp_path / "digits_mlp_sgd-sam").with_suffix(".json"), (
      tmp_path / "digits_mlp_sgd-sam.png")  # fmt: skip
  assert out["files"] == [str(json_path), str(png_path)]
  record = json.loads(json_path.read_text())
  assert record["experiment"]["methods"] == ["sgd", "sam"]
  assert record["summary"] == out["summary"]
  assert [(r["config"]["method"], r["config"]["seed"]) for r in record["runs"]] == [
      ("sgd", 0), ("sgd", 1), ("sam", 0), ("sam", 1)]  # fmt: skip
  assert all(len(r["test_accuracy"]) == 2 for r in record["runs"])
  assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def test_cli_defaults_compare_sgd_sam_gnp_on_noisy_digits():
  experiment = train.parse_args([])
  assert experiment == train.Experiment()
  assert experiment.methods == ("sgd", "sam", "gnp")
  assert experiment.out_dir == "runs"
  assert experiment.config == train.TrainConfig()
  assert (experiment.config.model, experiment.config.dataset) == ("cnn", "digits")
  assert experiment.config.label_noise == 0.2


def test_cli_parses_every_option():
  argv = (
      "--method gnp --model resnet --dataset mnist --epochs 3 --batch-size 32 "
      "--lr 0.2 --momentum 0.5 --rho 0.1 --alpha 0.7 --gamma 0.02 --epsilon 0.05 "
      "--flood-level 0.8 --label-noise 0.4 --train-size 100 --test-size 50 "
      "--probe-size 40 --hessian-iters 3 --data-dir /data --seed 5 --out-dir out"
  ).split()
  expected = train.Experiment(
      methods=("gnp",), seeds=(5,), out_dir="out",
      config=train.TrainConfig(
          model="resnet", dataset="mnist", epochs=3, batch_size=32, lr=0.2,
          momentum=0.5, rho=0.1, alpha=0.7, gamma=0.02, epsilon=0.05,
          flood_level=0.8, label_noise=0.4, train_size=100, test_size=50,
          probe_size=40, hessian_iters=3, data_dir="/data",
      ),
  )  # fmt: skip
  assert train.parse_args(argv) == expected
  # Every TrainConfig field but the two the experiment sets has a flag.
  flags = set(vars(train.build_parser().parse_args(argv)))
  fields = {f.name for f in dataclasses.fields(train.TrainConfig)}
  assert flags == fields - {"method", "seed"} | {"methods", "seeds", "out_dir"}


DEFAULT_METHODS = ("sgd", "sam", "gnp")


@pytest.mark.parametrize(
    "argv, methods, seeds",
    [
        ([], DEFAULT_METHODS, (0, 1, 2)),
        (["--method", "all"], train.METHODS, (0, 1, 2)),
        (["--method", "sam", "--seed", "3"], ("sam",), (3,)),
        (["--method", "sgd,sam,gnp", "--seeds", "0,1,2"], DEFAULT_METHODS, (0, 1, 2)),
        (["--methods", "gr, flooding,gr", "--seed", "7"], ("gr", "flooding"), (7,)),
    ],
)
def test_cli_method_and_seed_lists(argv, methods, seeds):
  experiment = train.parse_args(argv)
  assert (experiment.methods, experiment.seeds) == (methods, seeds)
  expected = [(m, s) for m in methods for s in seeds]
  assert [(c.method, c.seed) for c in experiment.configs()] == expected


@pytest.mark.parametrize(
    "argv, bad, choices",
    [
        (["--method", "adam"], "adam", (*train.METHODS, "all")),
        (["--method", "sgd,adam,sam"], "adam", (*train.METHODS, "all")),
        (["--model", "transformer"], "transformer", tuple(models.MODELS)),
        (["--dataset", "imagenet"], "imagenet", data.DATASETS),
    ],
)
def test_cli_rejects_unknown_choice_listing_the_valid_ones(argv, bad, choices, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.parse_args(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert f"invalid choice: '{bad}'" in err
  for choice in choices:
    assert f"'{choice}'" in err


def test_cli_rejects_bad_seeds(capsys):
  for seeds in ("0,x", "", "-1", "0,,1", str(2**63)):
    with pytest.raises(SystemExit) as exit_info:
      train.parse_args(["--seeds", seeds])
    assert exit_info.value.code == 2
    assert f"invalid seeds: '{seeds}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value, rule",
    [
        ("--batch-size", "0", "a positive integer"),
        ("--batch-size", "-3", "a positive integer"),
        ("--batch-size", "1.5", "a positive integer"),
        ("--epochs", "0", "a positive integer"),
        ("--lr", "0", "a finite number > 0"),
        ("--lr", "-0.1", "a finite number > 0"),
        ("--lr", "nan", "a finite number > 0"),
        ("--lr", "inf", "a finite number > 0"),
        ("--momentum", "1", "a number in [0, 1)"),
        ("--rho", "-0.1", "a finite number >= 0"),
        ("--alpha", "nan", "a finite number"),
        ("--gamma", "-1", "a finite number >= 0"),
        ("--epsilon", "0", "a finite number > 0"),
        ("--flood-level", "-1", "a finite number >= 0"),
        ("--label-noise", "1", "a number in [0, 1)"),
        ("--label-noise", "-0.1", "a number in [0, 1)"),
        ("--train-size", "0", "a positive integer"),
        ("--test-size", "0", "a positive integer"),
        ("--probe-size", "-1", "an integer >= 0"),
        ("--hessian-iters", "-1", "an integer >= 0"),
    ],
)
def test_cli_rejects_out_of_range_numbers_before_any_work(flag, value, rule, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main([flag, value])  # would train for minutes if it got past parsing
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  error = captured.err.strip().splitlines()[-1]
  assert error.endswith(f"error: argument {flag}: must be {rule}, got {value}")


@pytest.mark.parametrize(
    "argv, limit",
    [
        (["--batch-size", "65", "--train-size", "64"], "64 with --train-size 64"),
        (["--batch-size", "1349"], "1348 in digits"),
        (["--batch-size", "2000", "--train-size", "5000"], "1348 in digits"),
    ],
)
def test_cli_rejects_a_batch_larger_than_the_training_set(argv, limit, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main(argv)
  assert exit_info.value.code == 2
  assert (
      "error: argument --batch-size: must be at most the number of training "
      f"samples ({limit}), got {argv[1]}"
  ) in capsys.readouterr().err
  assert train.TRAIN_SET_SIZES["digits"] == len(data.load_digits().x_train)
  assert train.parse_args(["--batch-size", "64", "--train-size", "64"])


def test_probe_size_0_skips_the_flatness_probe():
  assert train.parse_args(["--probe-size", "0"]).config.probe_size == 0
  x, y = _batch(0)
  got = train.flatness(models.make_model("mlp"), x, y, key=jax.random.key(0))
  assert got == {"grad_norm": None, "hessian_top_eigenvalue": None}


def _strict_json(text: str):
  def no_constant(name):
    raise ValueError(f"non-standard JSON constant {name}")

  return json.loads(text, parse_constant=no_constant)


def test_summary_table_json_and_png_mark_diverged_runs(tmp_path):
  diverged = {
      **_fake_run("sgd", 1, 0.1, None), "train_loss": [2.0, math.nan],
      "final_train_loss": math.nan, "grad_norm": None, "diverged": True,
      "diverged_epoch": 2,
  }  # fmt: skip
  runs = [_fake_run("sgd", 0, 0.8, 4.0), diverged, _fake_run("sam", 0, 0.9, 3.0)]
  rows = train.summarize(runs)
  assert [r["diverged_seeds"] for r in rows] == [[1], []]
  assert rows[0]["final_train_loss"] == {"mean": None, "std": None}
  table = train.format_table(rows).splitlines()
  assert table[1].startswith("sgd (diverged seed 1)")
  assert table[2].startswith("sam ") and "diverged" not in table[2]
  experiment = train.Experiment(("sgd", "sam"), (0, 1), out_dir=str(tmp_path))
  json_path, png_path = train.save_results(experiment, runs)
  record = _strict_json(json_path.read_text())
  assert record["runs"][1]["train_loss"] == [2.0, None]
  assert record["runs"][1]["final_train_loss"] is None
  assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_diverging_run_stops_and_is_reported_and_written(tmp_path, capsys):
  argv = (
      "--method sgd --model mlp --seed 0 --epochs 4 --lr 1e6 --batch-size 32 "
      f"--train-size 64 --test-size 64 --probe-size 64 --out-dir {tmp_path}"
  ).split()
  out = train.main(argv)  # returns: a diverged run is no error
  printed = capsys.readouterr().out
  (result,) = out["runs"]
  assert result["diverged"]
  epoch = result["diverged_epoch"]
  assert re.search(rf"^sgd seed 0: diverged at epoch {epoch} \(loss=nan\)$",
                   printed, re.MULTILINE)  # fmt: skip
  assert len(result["train_loss"]) == len(result["test_accuracy"]) == epoch < 4
  assert result["grad_norm"] is None and result["hessian_top_eigenvalue"] is None
  assert "sgd (diverged)" in printed
  json_path, png_path = map(pathlib.Path, out["files"])
  record = _strict_json(json_path.read_text())
  assert record["runs"][0]["diverged"] and record["runs"][0]["diverged_epoch"] == epoch
  assert record["runs"][0]["train_loss"][-1] is None
  assert record["summary"][0]["diverged_seeds"] == [0]
  assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------
# Checkpoints: --checkpoint-dir resumes exactly.
# ----------------------------------------------------------------------------


class _Stop(Exception):
  pass


def _stop_after(epoch_to_stop):
  def on_epoch(epoch, loss, accuracy):
    del loss, accuracy
    if epoch == epoch_to_stop:
      raise _Stop

  return on_epoch


@pytest.mark.parametrize("model, method", [("mlp", "sam"), ("resnet", "gnp"),
                                           ("vit", "fdgr")])
def test_checkpointed_run_resumes_exactly(tmp_path, model, method):
  """Stopped after epoch 2 of 3 and resumed, the run equals an unbroken one
  (BatchNorm statistics, dropout RNG, optimizer state and batch order)."""
  config = train.TrainConfig(
      method=method, model=model, epochs=3, batch_size=32, train_size=96,
      test_size=64, probe_size=64, hessian_iters=0,
  )  # fmt: skip
  unbroken = train.run(config)
  resumable = dataclasses.replace(config, checkpoint_dir=str(tmp_path))
  with pytest.raises(_Stop):
    train.run(resumable, on_epoch=_stop_after(2))
  epochs_run = []
  resumed = train.run(resumable, on_epoch=lambda e, *_: epochs_run.append(e))
  assert epochs_run == [3]  # epochs 1 and 2 came from the checkpoint
  for key in ("train_loss", "test_accuracy", "final_train_loss", "grad_norm"):
    assert resumed[key] == unbroken[key], key


def test_checkpoint_dir_resumes_in_a_new_process(tmp_path):
  args = ["--method", "sam", "--seed", "0", "--epochs", "2", "--train-size", "96",
          "--test-size", "64", "--probe-size", "64", "--hessian-iters", "0",
          "--batch-size", "32", "--checkpoint-dir", str(tmp_path / "ckpt"),
          "--out-dir", str(tmp_path / "out")]
  config = train.parse_args(args).configs()[0]
  with pytest.raises(_Stop):
    train.run(config, on_epoch=_stop_after(1))
  proc = subprocess.run([sys.executable, "-m", "gnorm_optax.examples.train", *args],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  resumed = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
  unbroken = train.run(dataclasses.replace(config, checkpoint_dir=None))
  assert resumed["runs"][0]["train_loss"] == unbroken["train_loss"]


def test_checkpoint_dir_refuses_to_resume_with_other_arguments(tmp_path, capsys):
  """A checkpoint resumed with other --epochs/--rho/--lr would splice two runs:
  refused, naming the flags; the final measurements may change."""
  args = ["--method", "sam", "--seed", "0", "--model", "mlp", "--epochs", "3",
          "--train-size", "96", "--test-size", "64", "--probe-size", "64",
          "--hessian-iters", "0", "--batch-size", "32",
          "--checkpoint-dir", str(tmp_path / "ckpt"), "--out-dir", str(tmp_path)]
  config = train.parse_args(args).configs()[0]
  with pytest.raises(_Stop):
    train.run(config, on_epoch=_stop_after(1))
  recorded = json.loads((train._run_dir(config) / train.RUN_ARGS_FILE).read_text())
  assert recorded == train.run_args(config) and recorded["lr"] == 0.02

  with pytest.raises(SystemExit) as exit_info:
    train.main([*args, "--epochs", "5", "--rho", "0.1", "--lr", "0.05"])
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  error = captured.err.strip().splitlines()[-1]
  assert "error: argument --checkpoint-dir: " in error
  assert "--epochs 3 (now 5), --lr 0.02 (now 0.05), --rho 0.15 (now 0.1);" in error
  assert "use a new --checkpoint-dir (or delete the old one)" in error
  with pytest.raises(ValueError, match=r"--epochs 3 \(now 5\)"):
    train.run(dataclasses.replace(config, epochs=5))

  # The same run (the default lr spelled out) and other final measurements
  # resume; so does another method, which gets its own directory.
  same = [*args, "--lr", "0.02", "--probe-size", "32", "--hessian-iters", "2"]
  assert train.parse_args(same).config.lr == 0.02
  assert train.parse_args([*args, "--method", "sgd", "--rho", "0.1"])
