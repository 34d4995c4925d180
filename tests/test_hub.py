"""Tests of examples.hub on small in-memory fixtures (no network)."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
PIL_Image = pytest.importorskip("PIL.Image")

from gnorm_optax.examples import data  # noqa: E402
from gnorm_optax.examples import hub  # noqa: E402

N_TRAIN, N_TEST = 24, 12


def _split(n, shape, rng, image_column="image"):
  """Random 8-bit PIL images and labels, as the Hub's data sets hold them."""
  pixels = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
  pixels.reshape(-1)[:256] = np.arange(256)  # every pixel value appears
  labels = rng.integers(0, data.NUM_CLASSES, size=n)
  grey = shape[-1] == 1
  images = [PIL_Image.fromarray(p[..., 0] if grey else p) for p in pixels]
  features = datasets.Features(
    {
      image_column: datasets.Image(),
      "label": datasets.ClassLabel(num_classes=data.NUM_CLASSES),
    }
  )
  ds = datasets.Dataset.from_dict(
    {image_column: images, "label": labels.tolist()}, features=features
  )
  return ds, pixels, labels


def _fixture(name, seed=0):
  _, image_column = hub.HUB[name]
  rng = np.random.default_rng(seed)
  train, x_train, y_train = _split(N_TRAIN, hub.IMAGE_SHAPES[name], rng, image_column)
  test, x_test, y_test = _split(N_TEST, hub.IMAGE_SHAPES[name], rng, image_column)
  return datasets.DatasetDict({"train": train, "test": test}), (
    x_train,
    y_train,
    x_test,
    y_test,
  )


@pytest.mark.parametrize("name", list(hub.HUB))
def test_load_converts_the_hub_format_exactly(name, monkeypatch):
  dataset_dict, raw = _fixture(name)
  calls = []

  def fake_load_dataset(repo, **kwargs):
    calls.append((repo, kwargs))
    return dataset_dict

  monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
  ds = hub.load(name, cache_dir="/somewhere")
  assert calls == [(hub.HUB[name][0], {"cache_dir": "/somewhere"})]
  assert isinstance(ds, data.Dataset)
  for got, pixels in ((ds.x_train, raw[0]), (ds.x_test, raw[2])):
    assert got.dtype == np.float32 and got.shape[1:] == hub.IMAGE_SHAPES[name]
    np.testing.assert_array_equal(got, pixels / np.float32(255))
  for got, labels in ((ds.y_train, raw[1]), (ds.y_test, raw[3])):
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, labels)


def test_label_noise_changes_train_labels_only():
  dataset_dict, _ = _fixture("cifar10")
  clean = hub.to_dataset(dataset_dict, image_column="img", seed=3)
  noisy = hub.to_dataset(dataset_dict, image_column="img", label_noise=0.5, seed=3)
  np.testing.assert_array_equal(noisy.x_train, clean.x_train)
  np.testing.assert_array_equal(noisy.y_test, clean.y_test)
  assert np.sum(noisy.y_train != clean.y_train) == round(0.5 * N_TRAIN)
  again = hub.to_dataset(dataset_dict, image_column="img", label_noise=0.5, seed=3)
  np.testing.assert_array_equal(again.y_train, noisy.y_train)


def test_bad_names_and_labels_are_refused():
  with pytest.raises(ValueError, match="unknown data set 'svhn'"):
    hub.load("svhn")
  dataset_dict, _ = _fixture("mnist")
  bad = dataset_dict.cast_column("label", datasets.Value("int64"))
  bad["test"] = bad["test"].map(lambda row: {"label": 10})
  with pytest.raises(ValueError, match=r"test labels must be in \[0, 10\)"):
    hub.to_dataset(bad)


def test_missing_datasets_names_the_hub_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  monkeypatch.delitem(sys.modules, "gnorm_optax.examples.hub")
  with pytest.raises(ModuleNotFoundError) as info:
    importlib.import_module("gnorm_optax.examples.hub")
  assert "gnorm_optax.examples.hub needs 'datasets'" in str(info.value)
  assert "pip install 'gnorm_optax[hub]'" in str(info.value)
