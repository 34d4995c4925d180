"""Image-classification data with symmetric label noise, and mini-batches.

Data sets (see ``DATASETS`` and ``load_dataset``):

* ``"digits"``: scikit-learn's 8x8 grey digits. They ship inside scikit-learn,
  so nothing is downloaded.
* ``"mnist"``, ``"fashion_mnist"`` (28x28 grey) and ``"cifar10"`` (32x32
  colour): read with the Hugging Face ``datasets`` library (the ``examples``
  extra) from the Hub on first use, or offline from a local copy of the Hub's
  parquet files (``data_dir``).

Noisy training labels are the usual testbed for flat-minima optimizers: a
model that memorises the corrupted labels generalises worse, and SAM-like
methods resist it.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import sklearn.datasets

if TYPE_CHECKING:
  import datasets as hf_datasets

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)  # digits; see IMAGE_SHAPES for the other data sets
_MAX_PIXEL = 16.0  # digits pixels are integers in [0, 16]


class Dataset(NamedTuple):
  """Train/test split of an image-classification data set.

  Images are float32 NHWC ``(n, height, width, channels)`` in ``[0, 1]``
  (``IMAGE_SHAPES`` gives the shape per data set); labels are int32 in
  ``[0, NUM_CLASSES)``. ``y_train`` holds the (possibly noisy) training
  labels; ``y_test`` is clean.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


Digits = Dataset  # the original name, kept for existing code


def load_digits(
    test_fraction: float = 0.25, label_noise: float = 0.0, seed: int = 0
) -> Digits:
  """Loads, shuffles and splits the digits data, corrupting training labels.

  The split depends only on ``seed``, not on ``label_noise``, so runs with
  different noise levels share the same train and test images.

  Args:
    test_fraction: fraction of the samples held out for testing, in (0, 1).
    label_noise: fraction of training labels replaced by a different class
      drawn uniformly at random (symmetric noise), in [0, 1].
    seed: seed for the split and the noise.

  Returns:
    A ``Digits`` tuple ``(x_train, y_train, x_test, y_test)``.
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
  return Digits(images[train], y_train, images[test], labels[test])


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
    ``round(fraction * len(labels))`` entries.
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
  """
  if not 0 < batch_size <= len(x):
    raise ValueError(f"batch_size must be in [1, {len(x)}], got {batch_size}")
  order = rng.permutation(len(x))
  for start in range(0, len(x) - batch_size + 1, batch_size):
    idx = order[start : start + batch_size]
    yield x[idx], y[idx]


# --------------------------------------------------------------------------
# MNIST, Fashion-MNIST and CIFAR-10 through Hugging Face `datasets`.
# --------------------------------------------------------------------------

DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10")

IMAGE_SHAPES = {
    "digits": IMAGE_SHAPE,
    "mnist": (28, 28, 1),
    "fashion_mnist": (28, 28, 1),
    "cifar10": (32, 32, 3),
}


class _HubSpec(NamedTuple):
  repo_id: str
  image_column: str
  label_column: str


# Hub repositories and their columns. All three hold parquet files with a
# `train` (60k, 60k, 50k rows) and a `test` (10k) split, an image column of
# feature type `datasets.Image` (PNG bytes, decoded to PIL images: mode "L"
# for MNIST and Fashion-MNIST, "RGB" for CIFAR-10) and a `label` column of
# type `datasets.ClassLabel` with 10 classes. Files on the Hub:
#   ylecun/mnist:                  mnist/{train,test}-00000-of-00001.parquet
#   zalando-datasets/fashion_mnist: fashion_mnist/{train,test}-*.parquet
#   uoft-cs/cifar10:               plain_text/{train,test}-*.parquet
_HUB = {
    "mnist": _HubSpec("ylecun/mnist", "image", "label"),
    "fashion_mnist": _HubSpec("zalando-datasets/fashion_mnist", "image", "label"),
    "cifar10": _HubSpec("uoft-cs/cifar10", "img", "label"),
}

_SPLITS = ("train", "test")
_HUB_PROBE_TIMEOUT_S = 5.0


class DatasetUnavailableError(RuntimeError):
  """A data set could be read neither from ``data_dir`` nor from the Hub."""


def load_dataset(
    name: str,
    *,
    label_noise: float = 0.0,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
) -> Dataset:
  """Loads a data set by name, with symmetric noise on the training labels.

  ``"digits"`` comes from scikit-learn (``load_digits`` with its default
  split). ``"mnist"``, ``"fashion_mnist"`` and ``"cifar10"`` come from the
  Hugging Face Hub (``ylecun/mnist``, ``zalando-datasets/fashion_mnist``,
  ``uoft-cs/cifar10``) through the ``datasets`` library, with their official
  train/test splits:

  * if ``data_dir`` holds the Hub's parquet files, they are read from there
    without any network access. Accepted layouts, in ``data_dir`` itself or
    in one sub-folder of it (as in ``hf download ylecun/mnist --repo-type
    dataset --local-dir DATA_DIR``, which gives ``DATA_DIR/mnist/...``):
    ``train-*.parquet`` and ``test-*.parquet``, ``train.parquet`` and
    ``test.parquet``, or ``train/*.parquet`` and ``test/*.parquet``;
  * otherwise the data set is downloaded from the Hub and cached in
    ``data_dir`` (the ``datasets`` default cache when ``None``). If the Hub
    cannot be reached within a few seconds, a copy cached earlier is used.

  ``max_train`` and ``max_test`` keep the first samples of each split (before
  the label noise is drawn). Label noise is applied the same way for every
  data set, to the training labels only (see ``corrupt_labels``), with a
  generator derived from ``seed`` as in ``load_digits``: for ``"digits"``
  without ``max_train`` the result equals ``load_digits(label_noise=...,
  seed=...)``.

  Args:
    name: one of ``DATASETS``.
    label_noise: fraction of training labels replaced by a different class
      drawn uniformly at random, in [0, 1].
    seed: seed for the noise (and for the digits split).
    data_dir: folder with the Hub's parquet files, or the cache folder for
      the download; ignored for ``"digits"``.
    max_train: keep at most this many training samples (all if ``None``).
    max_test: keep at most this many test samples (all if ``None``).

  Returns:
    A ``Dataset`` tuple ``(x_train, y_train, x_test, y_test)``: float32 NHWC
    images in ``[0, 1]`` of shape ``(n,) + IMAGE_SHAPES[name]`` and int32
    labels.

  Raises:
    ValueError: for an unknown ``name`` or an out-of-range argument, or if
      ``data_dir`` holds parquet files in a layout that is not understood.
    DatasetUnavailableError: if the data set is neither in ``data_dir`` nor
      reachable on the Hub (offline, no cached copy).
    ImportError: if ``datasets`` is not installed (Hub data sets only).
  """
  if name not in DATASETS:
    raise ValueError(
        f"Unknown data set {name!r}; valid names are: {', '.join(DATASETS)}"
    )
  if not 0.0 <= label_noise <= 1.0:
    raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
  for arg, value in (("max_train", max_train), ("max_test", max_test)):
    if value is not None and value < 1:
      raise ValueError(f"{arg} must be a positive integer or None, got {value}")

  if name == "digits":
    clean = load_digits(label_noise=0.0, seed=seed)
  else:
    clean = _load_hub(name, data_dir, max_train, max_test)

  x_train, y_train = clean.x_train[:max_train], clean.y_train[:max_train]
  x_test, y_test = clean.x_test[:max_test], clean.y_test[:max_test]
  # Same derivation as load_digits, so both give the same noisy labels.
  _, noise_seed = np.random.SeedSequence(seed).spawn(2)
  y_train = corrupt_labels(
      y_train, label_noise, np.random.default_rng(noise_seed)
  )
  return Dataset(x_train, y_train, x_test, y_test)


def from_hf_dataset_dict(
    dataset_dict: hf_datasets.DatasetDict,
    image_column: str | None = None,
    label_column: str = "label",
) -> Dataset:
  """Converts a Hugging Face ``DatasetDict`` to numpy arrays.

  Grey (mode ``"L"``) images become one channel, colour images three
  (``"RGB"``; other modes such as ``"P"`` or ``"RGBA"`` are converted to
  ``"RGB"``). 8-bit pixel values ``v`` become ``v / 255``.

  Args:
    dataset_dict: a ``datasets.DatasetDict`` with ``"train"`` and ``"test"``
      splits, each with an image column and an integer label column.
    image_column: name of the image column (``"image"`` for MNIST and
      Fashion-MNIST, ``"img"`` for CIFAR-10); if ``None``, the only column
      whose feature is ``datasets.Image``. A column of ``{"bytes", "path"}``
      structs (parquet written without the ``datasets`` metadata) is decoded
      as images too.
    label_column: name of the label column.

  Returns:
    A ``Dataset`` tuple: float32 NHWC images in ``[0, 1]`` and int32 labels,
    in the order of the splits' rows, without label noise.

  Raises:
    ValueError: if a split or column is missing, the images of a split do
      not all have the same shape, or the labels are outside
      ``[0, NUM_CLASSES)``.
  """
  import datasets as hf_datasets  # optional dependency

  missing = [split for split in _SPLITS if split not in dataset_dict]
  if missing:
    raise ValueError(
        f"The DatasetDict has splits {sorted(dataset_dict)}, missing {missing}"
    )
  arrays = []
  for split in _SPLITS:
    ds = dataset_dict[split]
    column = image_column or _image_column(ds)
    for col in (column, label_column):
      if col not in ds.column_names:
        raise ValueError(
            f"Split {split!r} has columns {ds.column_names}, not {col!r}"
        )
    if not isinstance(ds.features[column], hf_datasets.Image):
      ds = ds.cast_column(column, hf_datasets.Image())
    arrays.append(_images_to_array(ds[column], split))
    labels = np.asarray(ds[label_column], dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise ValueError(
          f"Split {split!r}: labels must be in [0, {NUM_CLASSES}), got range "
          f"[{labels.min()}, {labels.max()}]"
      )
    arrays.append(labels.astype(np.int32))
  return Dataset(*arrays)


def _image_column(ds: hf_datasets.Dataset) -> str:
  import datasets as hf_datasets

  columns = [
      col
      for col, feature in ds.features.items()
      if isinstance(feature, hf_datasets.Image)
  ]
  if len(columns) != 1:
    raise ValueError(
        f"Cannot tell the image column among {ds.column_names}; "
        "pass image_column"
    )
  return columns[0]


def _images_to_array(images: Any, split: str) -> np.ndarray:
  """Stacks PIL images into a float32 NHWC array in [0, 1]."""
  pixels = []
  for image in images:
    if image.mode not in ("L", "RGB"):
      image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    pixels.append(array[..., None] if array.ndim == 2 else array)
  if not pixels:
    raise ValueError(f"Split {split!r} is empty")
  shapes = {p.shape for p in pixels}
  if len(shapes) != 1:
    raise ValueError(f"Split {split!r} mixes image shapes {sorted(shapes)}")
  return np.stack(pixels).astype(np.float32) / np.float32(255.0)


def _load_hub(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    max_train: int | None,
    max_test: int | None,
) -> Dataset:
  """Reads a Hub data set from ``data_dir`` or the Hub; clean labels."""
  try:
    import datasets as hf_datasets
  except ImportError as e:
    raise ImportError(
        f"Loading {name!r} needs the Hugging Face `datasets` package: "
        "pip install 'gnorm_optax[examples]' (or pip install datasets)"
    ) from e

  spec = _HUB[name]
  files = _find_parquet_splits(data_dir) if data_dir is not None else None
  if files is not None:
    # Local files only: forbid network access outright.
    with _hub_offline(True):
      dataset_dict = hf_datasets.load_dataset("parquet", data_files=files)
  else:
    if _hub_is_offline():
      reason = "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE)"
    elif not _hub_reachable():
      reason = f"the Hub ({hf_datasets.config.HF_ENDPOINT}) cannot be reached"
    else:
      reason = None
    try:
      # Offline, `datasets` uses a copy cached earlier, if any, at once.
      with _hub_offline(reason is not None):
        dataset_dict = hf_datasets.load_dataset(
            spec.repo_id, cache_dir=None if data_dir is None else str(data_dir)
        )
    except Exception as e:  # datasets raises many kinds
      raise DatasetUnavailableError(
          _unavailable_message(name, data_dir, reason, e)
      ) from e

  subsets = {}
  for split, limit in (("train", max_train), ("test", max_test)):
    ds = dataset_dict[split] if split in dataset_dict else None
    if ds is not None and limit is not None and limit < len(ds):
      ds = ds.select(range(limit))  # decode only the rows that are kept
    if ds is not None:
      subsets[split] = ds
  return from_hf_dataset_dict(
      hf_datasets.DatasetDict(subsets), spec.image_column, spec.label_column
  )


def _unavailable_message(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    reason: str | None,
    error: Exception,
) -> str:
  repo_id = _HUB[name].repo_id
  where = "the Hub or the `datasets` cache"
  if data_dir is not None:
    where = (
        f"the Hub, nor from data_dir={os.fspath(data_dir)!r} (no train/test "
        "parquet files there, nor a usable cached copy)"
    )
  because = f"{reason}; " if reason else ""
  return (
      f"Could not load {name!r} (Hugging Face Hub data set {repo_id!r}) from "
      f"{where}: {because}{type(error).__name__}: {error}\n"
      "To fix it, either connect to the internet (the data set is then "
      "downloaded, and cached in data_dir if given), or download its parquet "
      f"files on a machine with internet, e.g. `hf download {repo_id} "
      "--repo-type dataset --local-dir DIR`, and pass data_dir=DIR (a folder "
      "with train-*.parquet and test-*.parquet, directly or in a sub-folder)."
  )


def _find_parquet_splits(
    data_dir: str | os.PathLike[str],
) -> dict[str, list[str]] | None:
  """Finds the train and test parquet files in ``data_dir``.

  Looks in ``data_dir`` and in each of its immediate sub-folders for
  ``{split}.parquet``, ``{split}-*.parquet`` or ``{split}/*.parquet``.

  Returns:
    ``{"train": [...], "test": [...]}`` (sorted paths), or ``None`` if
    ``data_dir`` holds no parquet file at all (not even two levels down).

  Raises:
    ValueError: if there are parquet files but no single folder with both
      splits.
  """
  root = os.fspath(data_dir)
  if not os.path.isdir(root):
    return None
  subdirs = sorted(
      entry.path
      for entry in os.scandir(root)
      if entry.is_dir() and not entry.name.startswith(".")
      and entry.name not in _SPLITS
  )
  complete, partial = [], []
  for folder in [root, *subdirs]:
    found = {}
    for split in _SPLITS:
      paths = set()
      for pattern in (f"{split}.parquet", f"{split}-*.parquet",
                      os.path.join(split, "*.parquet")):
        paths.update(glob.glob(os.path.join(glob.escape(folder), pattern)))
      if paths:
        found[split] = sorted(paths)
    if len(found) == len(_SPLITS):
      complete.append((folder, found))
    elif found:
      partial.append(folder)
  if len(complete) == 1:
    return complete[0][1]
  if len(complete) > 1:
    raise ValueError(
        f"data_dir={root!r} holds train/test parquet files in several "
        f"folders {[folder for folder, _ in complete]}; pass one of them"
    )
  pattern = os.path.join(glob.escape(root), "**", "*.parquet")
  if partial or glob.glob(pattern, recursive=True):
    raise ValueError(
        f"data_dir={root!r} holds parquet files but not both splits in one "
        "folder; expected train-*.parquet and test-*.parquet (or train.parquet "
        "and test.parquet, or train/*.parquet and test/*.parquet) in data_dir "
        "or in one sub-folder of it"
    )
  return None


def _hub_is_offline() -> bool:
  import datasets as hf_datasets
  import huggingface_hub.constants

  return bool(
      getattr(hf_datasets.config, "HF_HUB_OFFLINE", False)
      or getattr(hf_datasets.config, "HF_DATASETS_OFFLINE", False)
      or getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
  )


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
  """Whether the Hub answers one request within ``timeout`` seconds.

  ``datasets`` retries unreachable hosts with back-off and long timeouts,
  which can take minutes offline; this one quick request avoids that.
  """
  import datasets as hf_datasets
  from huggingface_hub.utils import get_session

  try:
    get_session().head(hf_datasets.config.HF_ENDPOINT, timeout=timeout)
  except Exception:  # any network failure means "no"
    return False
  return True


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
  """Turns on the offline mode of ``datasets`` and ``huggingface_hub``.

  Both libraries read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, at
  import; this sets their module flags for the duration of the block, so
  that calls fail at once, or use the local cache, instead of retrying.
  """
  if not offline:
    yield
    return
  import datasets as hf_datasets
  import huggingface_hub.constants

  flags: Mapping[Any, tuple[str, ...]] = {
      hf_datasets.config: ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"),
      huggingface_hub.constants: ("HF_HUB_OFFLINE",),
  }
  saved = [
      (module, attr, getattr(module, attr))
      for module, attrs in flags.items()
      for attr in attrs
      if hasattr(module, attr)
  ]
  try:
    for module, attr, _ in saved:
      setattr(module, attr, True)
    yield
  finally:
    for module, attr, value in saved:
      setattr(module, attr, value)
