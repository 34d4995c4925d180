"""Tests of load_dataset on small local fixtures in the Hugging Face Hub format.

Every test runs offline: the fixtures are parquet files written here with
``datasets`` (PNG images in a ``datasets.Image`` column and a ``ClassLabel``
column, as on the Hub), sockets are blocked, and the Hub libraries are in
offline mode, so nothing is downloaded and no test waits on the network.
"""

import os
import socket
import time

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
PIL_Image = pytest.importorskip("PIL.Image")
hub_constants = pytest.importorskip("huggingface_hub.constants")

from gnorm_optax.examples import data  # noqa: E402

N_TRAIN, N_TEST = 24, 12

# name -> (image column, image shape, PIL mode, folder of the Hub layout)
FORMATS = {
    "mnist": ("image", (28, 28, 1), "L", "mnist"),
    "fashion_mnist": ("image", (28, 28, 1), "L", "data"),
    "cifar10": ("img", (32, 32, 3), "RGB", "plain_text"),
}


def _no_network(*args, **kwargs):
  raise OSError("network access is disabled in tests")


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
  """Blocks sockets, puts the Hub libraries offline, caches under tmp_path."""
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  # Both libraries read those variables at import; set their flags too.
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(socket.socket, "connect", _no_network)
  monkeypatch.setattr(socket, "create_connection", _no_network)
  monkeypatch.setattr(socket, "getaddrinfo", _no_network)


def _make_split(n, shape, mode, image_column, rng):
  """Random uint8 images and labels, and the datasets.Dataset holding them."""
  pixels = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
  # Every pixel value appears, so the round trip is checked on all of them.
  pixels.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)
  labels = rng.integers(0, data.NUM_CLASSES, size=n)
  images = [
      PIL_Image.fromarray(p[..., 0] if mode == "L" else p, mode=mode)
      for p in pixels
  ]
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


def _write_fixture(root, name, seed=0, n_train=N_TRAIN, n_test=N_TEST):
  """Writes train/test parquet files like the Hub's; returns the raw arrays."""
  image_column, shape, mode, folder = FORMATS[name]
  rng = np.random.default_rng(seed)
  out = {}
  os.makedirs(root / folder, exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    ds, pixels, labels = _make_split(n, shape, mode, image_column, rng)
    ds.to_parquet(str(root / folder / f"{split}-00000-of-00001.parquet"))
    out[split] = (pixels, labels)
  return out


@pytest.mark.parametrize("name", list(FORMATS))
def test_loads_the_hub_format_exactly(tmp_path, name):
  raw = _write_fixture(tmp_path / "hub", name)
  d = data.load_dataset(name, data_dir=tmp_path / "hub")
  shape = data.IMAGE_SHAPES[name]
  assert shape == FORMATS[name][1]
  assert d.x_train.shape == (N_TRAIN, *shape)
  assert d.x_test.shape == (N_TEST, *shape)
  for x, y, split in ((d.x_train, d.y_train, "train"), (d.x_test, d.y_test, "test")):
    pixels, labels = raw[split]
    assert x.dtype == np.float32 and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(x, pixels.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(np.rint(x * 255).astype(np.uint8), pixels)
    np.testing.assert_array_equal(y, labels)


def test_accepts_str_data_dir_and_flat_layout(tmp_path):
  # Files directly in data_dir, data_dir given as a str.
  _, shape, mode, _ = FORMATS["mnist"]
  rng = np.random.default_rng(1)
  for split in ("train", "test"):
    ds, _, _ = _make_split(5, shape, mode, "image", rng)
    ds.to_parquet(str(tmp_path / f"{split}.parquet"))
  d = data.load_dataset("mnist", data_dir=str(tmp_path))
  assert d.x_train.shape == (5, 28, 28, 1) and d.x_test.shape == (5, 28, 28, 1)


def test_label_noise_changes_train_labels_only(tmp_path):
  _write_fixture(tmp_path, "cifar10")
  clean = data.load_dataset("cifar10", data_dir=tmp_path, seed=3)
  noisy = data.load_dataset("cifar10", data_dir=tmp_path, label_noise=0.5, seed=3)
  np.testing.assert_array_equal(noisy.x_train, clean.x_train)
  np.testing.assert_array_equal(noisy.x_test, clean.x_test)
  np.testing.assert_array_equal(noisy.y_test, clean.y_test)
  assert np.sum(noisy.y_train != clean.y_train) == round(0.5 * N_TRAIN)
  assert noisy.y_train.dtype == np.int32
  again = data.load_dataset("cifar10", data_dir=tmp_path, label_noise=0.5, seed=3)
  np.testing.assert_array_equal(again.y_train, noisy.y_train)


def test_max_train_and_max_test_keep_the_first_samples(tmp_path):
  _write_fixture(tmp_path, "fashion_mnist")
  full = data.load_dataset("fashion_mnist", data_dir=tmp_path)
  small = data.load_dataset(
      "fashion_mnist", data_dir=tmp_path, max_train=7, max_test=3, label_noise=1.0
  )
  assert small.x_train.shape == (7, 28, 28, 1) and small.y_train.shape == (7,)
  assert small.x_test.shape == (3, 28, 28, 1) and small.y_test.shape == (3,)
  np.testing.assert_array_equal(small.x_train, full.x_train[:7])
  np.testing.assert_array_equal(small.x_test, full.x_test[:3])
  np.testing.assert_array_equal(small.y_test, full.y_test[:3])
  assert np.all(small.y_train != full.y_train[:7])  # noise on the kept ones
  larger = data.load_dataset("fashion_mnist", data_dir=tmp_path, max_train=10**6)
  assert len(larger.x_train) == N_TRAIN


def test_digits_through_the_dispatcher():
  d = data.load_dataset("digits", label_noise=0.2, seed=4)
  ref = data.load_digits(label_noise=0.2, seed=4)
  for a, b in zip(d, ref, strict=True):
    np.testing.assert_array_equal(a, b)
  assert isinstance(d, data.Digits) and data.Digits is data.Dataset
  small = data.load_dataset("digits", max_train=50, max_test=20)
  assert small.x_train.shape == (50, 8, 8, 1) and small.x_test.shape == (20, 8, 8, 1)


def test_unknown_name_lists_the_valid_names():
  with pytest.raises(ValueError, match="Unknown data set 'svhn'") as info:
    data.load_dataset("svhn")
  for name in data.DATASETS:
    assert name in str(info.value)
  assert data.DATASETS == ("digits", "mnist", "fashion_mnist", "cifar10")


@pytest.mark.parametrize(
    "kwargs",
    [{"label_noise": -0.1}, {"label_noise": 1.5}, {"max_train": 0}, {"max_test": -1}],
)
def test_rejects_bad_arguments(kwargs):
  with pytest.raises(ValueError):
    data.load_dataset("mnist", **kwargs)


@pytest.mark.parametrize("which", ["missing", "empty"])
def test_missing_data_gives_a_clear_error(tmp_path, which):
  data_dir = tmp_path / "nothing_here"
  if which == "empty":
    data_dir.mkdir()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_dataset("cifar10", data_dir=data_dir)
  message = str(info.value)
  for part in ("'cifar10'", "uoft-cs/cifar10", str(data_dir), "internet",
               "data_dir", "parquet", "offline mode"):
    assert part in message


def test_unreachable_hub_fails_fast_without_offline_mode(tmp_path, monkeypatch):
  # Offline flags off, but sockets still blocked: the quick probe must notice
  # and switch to offline mode instead of letting `datasets` retry for long.
  monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
  monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError, match="ylecun/mnist") as info:
    data.load_dataset("mnist", data_dir=tmp_path / "cache_dir")
  assert time.perf_counter() - start < 10
  assert "cannot be reached" in str(info.value)
  # The flags are restored afterwards.
  assert datasets.config.HF_HUB_OFFLINE is False
  assert hub_constants.HF_HUB_OFFLINE is False


def test_incomplete_local_copy_is_an_error(tmp_path):
  _write_fixture(tmp_path, "mnist")
  os.remove(tmp_path / "mnist" / "test-00000-of-00001.parquet")
  with pytest.raises(ValueError, match="not both splits"):
    data.load_dataset("mnist", data_dir=tmp_path)


def test_from_hf_dataset_dict_finds_the_image_column_and_checks_splits():
  rng = np.random.default_rng(2)
  train, pixels, labels = _make_split(4, (32, 32, 3), "RGB", "img", rng)
  test, _, _ = _make_split(2, (32, 32, 3), "RGB", "img", rng)
  d = data.from_hf_dataset_dict(datasets.DatasetDict({"train": train, "test": test}))
  assert d.x_train.shape == (4, 32, 32, 3) and d.x_test.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(d.x_train, pixels / np.float32(255))
  np.testing.assert_array_equal(d.y_train, labels)
  with pytest.raises(ValueError, match="missing"):
    data.from_hf_dataset_dict(datasets.DatasetDict({"train": train}))
