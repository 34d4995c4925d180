"""Digits and MNIST-1D with symmetric label noise, and mini-batches.

The digits (1,797 grey 8x8 images of 10 classes) ship inside scikit-learn,
and MNIST-1D (5,000 one-dimensional signals of the ten digits, Greydanus
2020) is generated from its templates by the ``mnist1d`` package, so nothing
is downloaded. Noisy training labels are the usual testbed for
flat-minima optimizers: a model that memorises the corrupted labels
generalises worse, and SAM-like methods resist it. MNIST, Fashion-MNIST and
CIFAR-10 come from the Hugging Face Hub through ``gnorm_optax.examples.hub``
(the ``hub`` extra), as the same ``Dataset`` tuple.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import sklearn.datasets

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)  # (height, width, channels) of the digits
SIGNAL_SHAPE = (40, 1)  # (length, channels) of the MNIST-1D signals
_MAX_PIXEL = 16.0  # digits pixels are integers in [0, 16]


class Dataset(NamedTuple):
  """Train/test split of an image- or signal-classification data set.

  Images are float32 NHWC ``(n, height, width, channels)`` in ``[0, 1]``;
  MNIST-1D signals are float32 ``(n, length, channels)``, standardized;
  labels are int32 in ``[0, NUM_CLASSES)``. ``y_train`` holds the (possibly
  noisy) training labels; ``y_test`` is clean.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_digits(
  test_fraction: float = 0.25, label_noise: float = 0.0, seed: int = 0
) -> Dataset:
  """Loads, shuffles and splits the digits data, corrupting training labels.

  The split depends only on ``seed``, not on ``label_noise``, so runs with
  different noise levels share the same train and test images.

  Args:
    test_fraction: fraction of the samples held out for testing, in (0, 1).
    label_noise: fraction of training labels replaced by a different class
      drawn uniformly at random (symmetric noise), in [0, 1].
    seed: seed for the split and the noise.

  Returns:
    A ``Dataset`` ``(x_train, y_train, x_test, y_test)``: 1,348 training and
    449 test images with the default ``test_fraction``.

  Raises:
    ValueError: if ``test_fraction`` or ``label_noise`` is out of range.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
  if not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
  split_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)

  raw = sklearn.datasets.load_digits()
  images = (raw.images / _MAX_PIXEL).astype(np.float32)[..., None]
  labels = raw.target.astype(np.int32)

  order = np.random.default_rng(split_seed).permutation(len(labels))
  n_test = round(test_fraction * len(labels))
  test, train = order[:n_test], order[n_test:]
  y_train = corrupt_labels(
    labels[train], label_noise, np.random.default_rng(noise_seed)
  )
  return Dataset(images[train], y_train, images[test], labels[test])


def load(name: str, label_noise: float = 0.0, seed: int = 0) -> Dataset:
  """Loads the data set ``name`` with noisy training labels.

  Args:
    name: ``"digits"`` or ``"mnist1d"`` (offline), or ``"mnist"``,
      ``"fashion_mnist"``, ``"cifar10"`` from the Hugging Face Hub (through
      ``gnorm_optax.examples.hub``: the ``hub`` extra).
    label_noise: fraction of training labels replaced by another class.
    seed: seed of the noise (and of the split, where the data set has none).

  Returns:
    The ``Dataset``.
  """
  if name in ("digits", "mnist1d"):
    loader = load_digits if name == "digits" else load_mnist1d
    return loader(label_noise=label_noise, seed=seed)
  from gnorm_optax.examples import hub  # needs the `hub` extra

  return hub.load(name, label_noise=label_noise, seed=seed)


def load_mnist1d(label_noise: float = 0.0, seed: int = 0) -> Dataset:
  """MNIST-1D with the package's default settings, corrupting training labels.

  The data set is the published benchmark: ``mnist1d.data.make_dataset``
  with ``get_dataset_args()`` (its own seed 42), 4,000 training and 1,000
  test signals of length 40, generated offline in about a second and kept in
  memory. Its train/test split is part of the benchmark and stays fixed;
  ``seed`` draws the label noise (and nothing else here).

  Args:
    label_noise: fraction of training labels replaced by a different class
      drawn uniformly at random (symmetric noise), in [0, 1].
    seed: seed for the noise.

  Returns:
    A ``Dataset`` of float32 signals ``(n, 40, 1)`` and int32 labels.

  Raises:
    ValueError: if ``label_noise`` is out of range.

  References:
    Greydanus, *Scaling down Deep Learning*, 2020,
    https://arxiv.org/abs/2011.14439
  """
  if not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
  x_train, y_train, x_test, y_test = _mnist1d()
  noise_seed = np.random.SeedSequence(seed).spawn(2)[1]  # as load_digits's
  noisy = corrupt_labels(y_train, label_noise, np.random.default_rng(noise_seed))
  return Dataset(x_train, noisy, x_test, y_test)


@functools.cache
def _mnist1d() -> Dataset:
  from mnist1d.data import get_dataset_args
  from mnist1d.data import make_dataset

  state = np.random.get_state()  # make_dataset seeds numpy's global RNG.
  try:
    raw = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(state)
  signal = lambda x: np.asarray(x, np.float32)[..., None]  # noqa: E731
  label = lambda y: np.asarray(y, np.int32)  # noqa: E731
  out = Dataset(
    signal(raw["x"]), label(raw["y"]), signal(raw["x_test"]), label(raw["y_test"])
  )
  for array in out:
    array.flags.writeable = False  # shared by every call
  return out


def corrupt_labels(
  labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> np.ndarray:
  """Replaces ``round(fraction * len(labels))`` labels by a different class.

  Args:
    labels: int labels in ``[0, NUM_CLASSES)``.
    fraction: fraction of labels to corrupt, in [0, 1].
    rng: numpy random generator.

  Returns:
    A new label array that differs from ``labels`` in exactly
    ``round(fraction * len(labels))`` entries, each replaced by one of the
    other classes, uniformly.
  """
  noisy = labels.copy()
  n_noisy = round(fraction * len(labels))
  idx = rng.choice(len(labels), size=n_noisy, replace=False)
  # A shift in [1, NUM_CLASSES) modulo NUM_CLASSES is uniform over the other
  # classes and never gives back the original one.
  shift = rng.integers(1, NUM_CLASSES, size=n_noisy)
  noisy[idx] = (labels[idx] + shift) % NUM_CLASSES
  return noisy


def iterate_batches(
  x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Yields one epoch of shuffled, full-size mini-batches.

  The last incomplete batch is dropped, so every batch has the same shape and
  a jitted train step compiles once.

  Args:
    x: inputs; the first axis is the sample axis.
    y: labels aligned with ``x``.
    batch_size: samples per batch, in ``[1, len(x)]``.
    rng: numpy random generator; each call draws a new order from it.

  Yields:
    ``(x_batch, y_batch)`` pairs.

  Raises:
    ValueError: if ``batch_size`` is out of range.
  """
  if not 0 < batch_size <= len(x):
    raise ValueError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
  order = rng.permutation(len(x))
  for start in range(0, len(x) - batch_size + 1, batch_size):
    idx = order[start : start + batch_size]
    yield x[idx], y[idx]
