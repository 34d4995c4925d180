"""Small Flax NNX classifiers for 8x8x1 digit images.

Add a model by writing an ``nnx.Module`` whose constructor takes
``(num_classes, *, rngs)`` and registering it in ``MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from gnorm_optax.examples.data import IMAGE_SHAPE, NUM_CLASSES


class MLP(nnx.Module):
  """Two-hidden-layer ReLU perceptron on flattened images."""

  def __init__(
      self, num_classes: int = NUM_CLASSES, hidden: int = 64, *, rngs: nnx.Rngs
  ):
    """Builds the layers.

    Args:
      num_classes: number of output logits.
      hidden: width of both hidden layers.
      rngs: random streams for the weight initialisers.
    """
    in_features = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    self.hidden1 = nnx.Linear(in_features, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps images ``(n, 8, 8, 1)`` to logits ``(n, num_classes)``."""
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.head(x)


class CNN(nnx.Module):
  """Two 3x3 convolutions (16 and 32 channels), 2x2 average pool, linear head."""

  def __init__(self, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
    """Builds the layers.

    Args:
      num_classes: number of output logits.
      rngs: random streams for the weight initialisers.
    """
    height, width, channels = IMAGE_SHAPE
    self.conv1 = nnx.Conv(channels, 16, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
    pooled = (height // 2) * (width // 2) * 32
    self.head = nnx.Linear(pooled, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps images ``(n, 8, 8, 1)`` to logits ``(n, num_classes)``."""
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    return self.head(x.reshape(x.shape[0], -1))


MODELS: dict[str, Callable[..., nnx.Module]] = {"mlp": MLP, "cnn": CNN}


def make_model(name: str, seed: int = 0) -> nnx.Module:
  """Builds a registered model with freshly initialised weights.

  Args:
    name: a key of ``MODELS``.
    seed: seed for the weight initialisers.

  Returns:
    The model, mapping ``(n, 8, 8, 1)`` float images to ``(n, 10)`` logits.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  return MODELS[name](NUM_CLASSES, rngs=nnx.Rngs(seed))


def count_params(model: nnx.Module) -> int:
  """Returns the number of scalar trainable parameters of ``model``."""
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
