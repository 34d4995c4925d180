"""MNIST, Fashion-MNIST and CIFAR-10 from the Hugging Face Hub, as ``Dataset``.

``load("mnist", label_noise=0.2)`` downloads the data set on first use with
``datasets.load_dataset`` (cached by ``datasets``, ``~/.cache/huggingface``
by default; set ``HF_HUB_OFFLINE=1`` to use that cache without a network) and
converts it with ``to_dataset``, which also works on any ``DatasetDict`` with
``train`` and ``test`` splits of images and integer labels. Needs the ``hub``
extra: ``pip install 'gnorm_optax[hub]'``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
  import datasets
except ModuleNotFoundError as e:
  from gnorm_optax._src.optional import missing_extra

  raise missing_extra(e, module="gnorm_optax.examples.hub", extra="hub") from e

from gnorm_optax.examples.data import NUM_CLASSES
from gnorm_optax.examples.data import Dataset
from gnorm_optax.examples.data import corrupt_labels

# name -> (Hub repository, image column); every one has a `label` column of
# 10 classes and `train` (60k, 60k, 50k images) and `test` (10k) splits.
HUB = {
  "mnist": ("ylecun/mnist", "image"),
  "fashion_mnist": ("zalando-datasets/fashion_mnist", "image"),
  "cifar10": ("uoft-cs/cifar10", "img"),
}
IMAGE_SHAPES = {
  "mnist": (28, 28, 1),
  "fashion_mnist": (28, 28, 1),
  "cifar10": (32, 32, 3),
}


def load(
  name: str, *, label_noise: float = 0.0, seed: int = 0, **load_kwargs: Any
) -> Dataset:
  """Loads a Hub data set with its official split, noise on the train labels.

  Args:
    name: a key of ``HUB``.
    label_noise: fraction of training labels replaced by another class.
    seed: seed for the label noise.
    **load_kwargs: passed to ``datasets.load_dataset`` (e.g. ``cache_dir``).

  Returns:
    The ``Dataset``; images of shape ``(n,) + IMAGE_SHAPES[name]``.

  Raises:
    ValueError: for an unknown ``name``.
  """
  if name not in HUB:
    raise ValueError(f"unknown data set {name!r}; choose from {sorted(HUB)}")
  repo, image_column = HUB[name]
  dataset_dict = datasets.load_dataset(repo, **load_kwargs)
  return to_dataset(
    dataset_dict, image_column=image_column, label_noise=label_noise, seed=seed
  )


def to_dataset(
  dataset_dict: datasets.DatasetDict,
  *,
  image_column: str = "image",
  label_column: str = "label",
  label_noise: float = 0.0,
  seed: int = 0,
) -> Dataset:
  """Converts the ``train`` and ``test`` splits of a ``DatasetDict``.

  Args:
    dataset_dict: splits with an image column (PIL images or arrays of 8-bit
      pixels, all of one shape) and an integer label column.
    image_column: the name of the image column.
    label_column: the name of the label column.
    label_noise: fraction of training labels replaced by another class, drawn
      as in ``data.load_digits`` (the test labels stay clean).
    seed: seed for the label noise.

  Returns:
    A ``Dataset``: float32 NHWC images in ``[0, 1]``, int32 labels.

  Raises:
    ValueError: if a label is outside ``[0, NUM_CLASSES)``.
  """
  arrays = []
  for split in ("train", "test"):
    ds = dataset_dict[split]
    x = np.stack([np.asarray(image, np.uint8) for image in ds[image_column]])
    x = x[..., None] if x.ndim == 3 else x  # grey images get a channel axis
    y = np.asarray(ds[label_column], np.int32)
    if y.size and not 0 <= y.min() <= y.max() < NUM_CLASSES:
      raise ValueError(f"{split} labels must be in [0, {NUM_CLASSES})")
    arrays += [x.astype(np.float32) / np.float32(255), y]
  _, noise_seed = np.random.SeedSequence(seed).spawn(2)  # as load_digits
  arrays[1] = corrupt_labels(arrays[1], label_noise, np.random.default_rng(noise_seed))
  return Dataset(*arrays)
