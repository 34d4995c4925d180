"""scikit-learn's digits with symmetric label noise, and mini-batches.

The digits (1,797 grey 8x8 images of 10 classes) ship inside scikit-learn,
so nothing is downloaded. Noisy training labels are the usual testbed for
flat-minima optimizers: a model that memorises the corrupted labels
generalises worse, and SAM-like methods resist it. MNIST, Fashion-MNIST and
CIFAR-10 come from the Hugging Face Hub through ``gnorm_optax.examples.hub``
(the ``hub`` extra), as the same ``Dataset`` tuple.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import sklearn.datasets

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)  # (height, width, channels) of the digits
_MAX_PIXEL = 16.0  # digits pixels are integers in [0, 16]


class Dataset(NamedTuple):
  """Train/test split of an image-classification data set.

  Images are float32 NHWC ``(n, height, width, channels)`` in ``[0, 1]``;
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
