"""Tests of the examples: data, models, train.py and checkpointing.py."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gnorm_optax.examples import checkpointing
from gnorm_optax.examples import data
from gnorm_optax.examples import models
from gnorm_optax.examples import train
from gnorm_optax.examples import vit

N_SAMPLES = 1797  # size of scikit-learn's digits data set


def _batch(n: int = 32) -> tuple[jax.Array, jax.Array]:
  digits = data.load_digits(seed=0)
  return jnp.asarray(digits.x_train[:n]), jnp.asarray(digits.y_train[:n])


def _params(model: nnx.Module) -> list[np.ndarray]:
  return [np.asarray(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param))]


def _non_params(model: nnx.Module) -> list[np.ndarray]:
  state = jax.tree.leaves(nnx.as_pure(nnx.state(model, nnx.Not(nnx.Param))))
  return [
    np.asarray(jax.random.key_data(x) if checkpointing._is_key(x) else x) for x in state
  ]


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def test_load_digits_shapes_dtypes_and_range():
  digits = data.load_digits(test_fraction=0.25)
  n_test = round(0.25 * N_SAMPLES)
  assert digits.x_train.shape == (N_SAMPLES - n_test, *data.IMAGE_SHAPE)
  assert digits.x_test.shape == (n_test, *data.IMAGE_SHAPE)
  assert digits.y_train.shape == (N_SAMPLES - n_test,)
  assert digits.y_test.shape == (n_test,)
  assert digits.x_train.dtype == digits.x_test.dtype == np.float32
  assert digits.y_train.dtype == digits.y_test.dtype == np.int32
  for x in (digits.x_train, digits.x_test):
    assert x.min() == 0.0 and x.max() == 1.0
  assert set(np.unique(digits.y_test)) == set(range(data.NUM_CLASSES))
  assert train.TRAIN_SIZES["digits"] == len(digits.x_train)


def test_load_digits_is_deterministic_given_seed():
  a = data.load_digits(label_noise=0.3, seed=7)
  b = data.load_digits(label_noise=0.3, seed=7)
  for left, right in zip(a, b, strict=True):
    np.testing.assert_array_equal(left, right)
  assert not np.array_equal(a.x_test, data.load_digits(seed=8).x_test)


@pytest.mark.parametrize("noise", [0.0, 0.2, 1.0])
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


def test_load_mnist1d_is_the_published_benchmark_with_label_noise():
  state = np.random.get_state()
  clean = data.load_mnist1d(label_noise=0.0, seed=0)
  assert np.random.get_state()[1].tolist() == state[1].tolist()  # not reseeded
  assert clean.x_train.shape == (4000, *data.SIGNAL_SHAPE)
  assert clean.x_test.shape == (1000, *data.SIGNAL_SHAPE)
  assert clean.x_train.dtype == np.float32 and clean.y_train.dtype == np.int32
  assert abs(float(clean.x_train.mean())) < 0.05  # standardized by mnist1d
  assert set(np.unique(clean.y_test)) == set(range(data.NUM_CLASSES))
  assert train.TRAIN_SIZES["mnist1d"] == len(clean.x_train)
  noisy = data.load("mnist1d", label_noise=0.2, seed=3)
  np.testing.assert_array_equal(noisy.x_train, clean.x_train)  # fixed split
  np.testing.assert_array_equal(noisy.y_test, clean.y_test)
  assert (noisy.y_train != clean.y_train).sum() == 800
  again = data.load_mnist1d(label_noise=0.2, seed=3)
  np.testing.assert_array_equal(again.y_train, noisy.y_train)
  with pytest.raises(ValueError, match="label_noise must be in"):
    data.load_mnist1d(label_noise=1.5)


def test_missing_flax_names_the_examples_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "flax", None)
  for name in [m for m in sys.modules if m.startswith("gnorm_optax.examples")]:
    monkeypatch.delitem(sys.modules, name)
  with pytest.raises(ModuleNotFoundError, match=r"gnorm_optax\[examples\]"):
    importlib.import_module("gnorm_optax.examples.data")


# ----------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------

IMAGE_SHAPES = [(8, 8, 1), (28, 28, 1), (32, 32, 3)]


@pytest.mark.parametrize("in_shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", models.MODELS)
def test_models_map_images_to_logits(name, in_shape):
  """Shapes only, in both modes: abstract weights, tracing, nothing compiled."""
  model = nnx.eval_shape(lambda: models.make_model(name, 0, in_shape, 7))
  x = jax.ShapeDtypeStruct((3, *in_shape), jnp.float32)
  for mode in (model.train, model.eval):
    mode()
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, x)
    assert out.shape == (3, 7)
  assert 1_000 < models.count_params(model) < 250_000


def test_models_for_1d_signals_are_the_mnist1d_papers():
  def size(name):
    return models.count_params(
      nnx.eval_shape(lambda: models.make_model(name, 0, data.SIGNAL_SHAPE))
    )

  # 40-100-100-10 MLP; ConvBase: 25 channels, kernels 5, 3, 3, stride 2.
  assert size("mlp") == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
  assert size("cnn1d") == (5 * 25 + 25) + 2 * (3 * 25 * 25 + 25) + (25 * 5 * 10 + 10)
  x = jax.ShapeDtypeStruct((3, *data.SIGNAL_SHAPE), jnp.float32)
  for name in ("mlp", "cnn", "cnn1d"):
    model = nnx.eval_shape(lambda n=name: models.make_model(n, 0, data.SIGNAL_SHAPE))
    graphdef, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x, g=graphdef: nnx.merge(g, s)(x), state, x)
    assert out.shape == (3, 10)
  for name in ("resnet", "vit"):
    with pytest.raises(ValueError, match="takes images"):
      models.make_model(name, 0, data.SIGNAL_SHAPE)


def test_model_names_and_sizes():
  assert train.MODELS == tuple(models.MODELS)
  cnn = nnx.eval_shape(lambda: models.make_model("cnn"))
  assert models.count_params(cnn) == 9_930  # the README's number
  with pytest.raises(ValueError, match="choose from"):
    models.make_model("transformer")
  assert [vit.default_patch(s) for s in IMAGE_SHAPES] == [2, 4, 4]
  with pytest.raises(ValueError, match="patch must divide"):
    nnx.eval_shape(lambda: models.ViT((10, 10, 1), patch=4, rngs=nnx.Rngs(0)))


# ----------------------------------------------------------------------------
# train.py: every method on one model, every model on one method.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", train.METHODS)
def test_every_method_takes_a_step(method):
  model = models.make_model("mlp", seed=0)
  before = _params(model)
  tx = train.make_optimizer(method, train.default_lr(method), steps=10)
  loss = train.train_step(model, nnx.Optimizer(model, tx, wrt=nnx.Param), *_batch())
  assert np.isfinite(loss)
  after = _params(model)
  assert all(np.isfinite(p).all() for p in after)
  assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_train_step_matches_a_pure_optax_sam_step():
  """grad_fn reaches the optimizer: the NNX step is tx.update on pytrees."""
  model = models.make_model("mlp", seed=0)
  x, y = _batch()
  tx = train.make_optimizer("sam", lr=0.1, steps=10, rho=0.5)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.as_pure(params)

  def pure_loss(p):
    return train.loss_fn(nnx.merge(graphdef, p), x, y)

  @jax.jit
  def reference_step(params):
    grads = jax.grad(pure_loss)(params)
    state = tx.init(params)
    updates, _ = tx.update(grads, state, params, grad_fn=jax.grad(pure_loss))
    return optax.apply_updates(params, updates)

  expected = reference_step(params)
  train.train_step(model, nnx.Optimizer(model, tx, wrt=nnx.Param), x, y)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    nnx.as_pure(nnx.state(model, nnx.Param)),
    expected,
  )


@pytest.mark.parametrize("name", models.MODELS)
def test_every_model_trains_and_evaluates(name):
  """Training mode moves BatchNorm statistics and the dropout stream;
  evaluation mode is deterministic and leaves the state alone."""
  model = models.make_model(name, seed=0)
  tx = train.make_optimizer("sgd", 0.02, steps=10)
  before = _non_params(model)
  x, y = _batch()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  assert np.isfinite(train.train_step(model, optimizer, x, y))
  after = _non_params(model)
  moved = [not np.array_equal(a, b) for a, b in zip(before, after, strict=True)]
  assert any(moved) == (name in ("resnet", "vit"))
  accuracy = train.evaluate(model, *_batch(100))  # leaves it in eval mode
  before = _non_params(model)
  assert accuracy == train.evaluate(model, *_batch(100))
  for a, b in zip(before, _non_params(model), strict=True):
    np.testing.assert_array_equal(a, b)


def test_flatness_matches_the_gradient_and_an_exact_eigenvalue():
  model = models.MLP((2, 2, 1), num_classes=3, hidden=4, rngs=nnx.Rngs(0))  # 55
  x = jax.random.normal(jax.random.key(1), (32, 2, 2, 1))
  y = jnp.arange(32) % 3
  grad_norm, top = train.flatness(model, x, y, jax.random.key(0), hessian_iters=55)
  graphdef, params = nnx.split(model, nnx.Param)
  flat, unravel = jax.flatten_util.ravel_pytree(nnx.as_pure(params))

  def loss(v):
    return train.loss_fn(nnx.merge(graphdef, unravel(v)), x, y)

  grad = jax.jit(jax.grad(loss))(flat)
  np.testing.assert_allclose(grad_norm, jnp.linalg.norm(grad), rtol=1e-5)
  eigenvalues = np.linalg.eigvalsh(jax.jit(jax.hessian(loss))(flat))
  np.testing.assert_allclose(top, eigenvalues[-1], rtol=1e-3)


# ----------------------------------------------------------------------------
# train.py's command line.
# ----------------------------------------------------------------------------

# A short run: 5 steps of 256 samples per epoch.
SHORT = ["--model", "mlp", "--method", "sgd", "--batch-size", "256"]


def test_main_trains_prints_and_writes_the_summary(tmp_path, capsys):
  out = tmp_path / "run.json"
  argv = [
    *SHORT,
    "--epochs",
    "4",
    "--lr",
    "0.2",
    "--label-noise",
    "0",
    "--output",
    str(out),
  ]
  results = train.main(argv)
  printed = capsys.readouterr().out
  assert len(results["train_loss"]) == len(results["test_accuracy"]) == 4
  assert results["train_loss"][-1] < results["train_loss"][0]
  assert results["final_test_accuracy"] > 0.8
  assert results["grad_norm"] > 0 and np.isfinite(results["hessian_top_eigenvalue"])
  assert f"test accuracy {results['final_test_accuracy']:.3f} |" in printed
  assert f"top Hessian eigenvalue {results['hessian_top_eigenvalue']:.2f}" in printed
  assert json.loads(out.read_text()) == results
  assert results["args"]["lr"] == 0.2 and results["args"]["method"] == "sgd"


def test_main_trains_on_mnist1d_with_adam_at_a_constant_lr(capsys):
  argv = ["--dataset", "mnist1d", "--model", "mlp", "--method", "adam"]
  argv += ["--schedule", "constant", "--batch-size", "400", "--epochs", "2"]
  results = train.main(argv)
  assert "adam on mnist1d (20% label noise), mlp (15,210 parameters)" in (
    capsys.readouterr().out
  )
  assert results["args"]["lr"] == 0.01 and results["final_test_accuracy"] > 0.15
  tx = train.make_optimizer("sgd", 0.1, steps=10, schedule="constant")
  params = {"w": jnp.ones(2)}
  updates, _ = tx.update({"w": jnp.ones(2)}, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1)  # not decayed


def test_defaults_are_sam_on_noisy_digits():
  args = vars(train.parse_args([]))
  assert args == dict(
    method="sam",
    model="cnn",
    dataset="digits",
    seed=0,
    epochs=60,
    batch_size=64,
    lr=0.02,
    label_noise=0.2,
    schedule="cosine",
    rho=0.15,
    alpha=0.8,
    output=None,
  )
  assert train.parse_args(["--method", "agr_adan"]).lr == 3e-3


@pytest.mark.parametrize(
  "flag, value, rule",
  [
    ("--batch-size", "0", "a positive integer"),
    ("--batch-size", "1.5", "a positive integer"),
    ("--epochs", "0", "a positive integer"),
    ("--seed", "-1", "an integer in [0, 2**63)"),
    ("--lr", "nan", "a finite number > 0"),
    ("--lr", "-0.1", "a finite number > 0"),
    ("--rho", "-0.1", "a finite number >= 0"),
    ("--alpha", "inf", "a finite number"),
    ("--label-noise", "1", "a number in [0, 1)"),
  ],
)
def test_bad_flags_are_refused_naming_the_flag(flag, value, rule, capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main([flag, value])  # would train for a minute past the parser
  assert exit_info.value.code == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  error = captured.err.strip().splitlines()[-1]
  assert error.endswith(f"error: argument {flag}: must be {rule}, got {value}")


@pytest.mark.parametrize(
  "argv, message",
  [
    (["--method", "adamax"], "argument --method: invalid choice: 'adamax'"),
    (["--model", "mlp2"], "argument --model: invalid choice: 'mlp2'"),
    (["--batch-size", "1349"], "argument --batch-size: must be at most 1348"),
  ],
)
def test_bad_choices_are_refused_listing_the_valid_ones(argv, message, capsys):
  with pytest.raises(SystemExit):
    train.parse_args(argv)
  err = capsys.readouterr().err
  assert message in err
  if "choice" in message:  # and the valid ones
    choices = train.METHODS if "method" in message else train.MODELS
    assert all(c in err.split("choose from")[1] for c in choices)


def test_flags_are_parsed_before_the_heavy_imports():
  """`--help` and bad flags answer without importing flax or scikit-learn."""
  code = (
    "import runpy, sys\n"
    "sys.argv = ['train', '--lr', 'nan']\n"
    "try:\n"
    "  runpy.run_module('gnorm_optax.examples.train', run_name='__main__')\n"
    "except SystemExit as e:\n"
    "  print(e.code, 'flax' in sys.modules, 'sklearn' in sys.modules)\n"
  )
  proc = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
  )
  assert proc.stdout.split() == ["2", "False", "False"], proc.stderr[-2000:]
  assert "argument --lr: must be a finite number > 0, got nan" in proc.stderr


def test_a_diverging_run_stops_and_says_so(capsys):
  with pytest.raises(SystemExit) as exit_info:
    train.main([*SHORT, "--epochs", "3", "--lr", "1e6"])
  message = str(exit_info.value.code)
  assert "at epoch 1: the run diverged; try a lower --lr (now 1000000.0)" in message
  assert "test accuracy" not in capsys.readouterr().out


# ----------------------------------------------------------------------------
# checkpointing.py: resumes exactly in a new process, refuses other flags.
# ----------------------------------------------------------------------------

RESUMABLE = [*SHORT, "--method", "sam", "--epochs", "3"]


class _Stop(Exception):
  pass


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
  """A run stopped after epoch 2 of 3, resumed by the CLI in a new process."""
  tmp = tmp_path_factory.mktemp("checkpointing")
  argv = [*RESUMABLE, "--checkpoint-dir", str(tmp / "ckpt")]
  real_epoch = train.train_epoch

  def stop_after_2(*args):
    if args[-1] == 3:
      raise _Stop
    return real_epoch(*args)

  train.train_epoch = stop_after_2
  try:
    with pytest.raises(_Stop):
      checkpointing.main(argv)
  finally:
    train.train_epoch = real_epoch
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "gnorm_optax.examples.checkpointing",
      *argv,
      "--output",
      str(tmp / "resumed.json"),
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "resumed after epoch 2" in proc.stdout
  return argv, json.loads((tmp / "resumed.json").read_text())


def test_checkpointed_run_resumes_in_a_new_process_exactly(resumed):
  _, results = resumed
  unbroken = train.main(RESUMABLE)
  for key in ("train_loss", "test_accuracy", "grad_norm", "hessian_top_eigenvalue"):
    assert results[key] == unbroken[key], key


def test_checkpoint_dir_refuses_a_run_with_other_flags(resumed, capsys):
  argv, _ = resumed
  with pytest.raises(SystemExit) as exit_info:
    checkpointing.main([*argv, "--epochs", "5", "--rho", "0.1"])
  assert exit_info.value.code == 2
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert "error: argument --checkpoint-dir: " in error
  assert "--epochs 3 (now 5), --rho 0.15 (now 0.1);" in error
  assert "use a new --checkpoint-dir or delete the old one" in error
  # The same run, with the default lr spelled out or another --output, may.
  assert checkpointing.parse_args([*argv, "--lr", "0.02", "--output", "x.json"])
