"""Small Flax NNX classifiers: MLP, CNN, 1-D CNN, ResNet (BatchNorm) and ViT.

Every model takes NHWC float images of shape ``in_shape`` (height, width,
channels), e.g. ``(8, 8, 1)`` for digits, ``(28, 28, 1)`` for (Fashion-)MNIST
or ``(32, 32, 3)`` for CIFAR-10, and returns ``num_classes`` logits. ``MLP``,
``CNN`` and ``CNN1D`` also take 1-D signals ``(length, channels)``, e.g.
``(40, 1)`` for MNIST-1D (``CNN1D`` is the MNIST-1D paper's net). Their
``rngs`` seed the weight initialisers (and dropout). Add a model by writing an
``nnx.Module`` whose constructor takes ``(in_shape, num_classes, *, rngs)``
and registering it in ``MODELS``.

``ResNet`` (BatchNorm, in ``resnet.py``) and ``ViT`` (dropout, in ``vit.py``)
live in files of their own: train them after ``model.train()`` and evaluate
them after ``model.eval()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from gnorm_optax.examples.data import IMAGE_SHAPE
from gnorm_optax.examples.data import NUM_CLASSES
from gnorm_optax.examples.resnet import ResNet
from gnorm_optax.examples.vit import ViT

Shape = Sequence[int]


class MLP(nnx.Module):
  """Two-hidden-layer ReLU perceptron on flattened inputs.

  Its hidden layers are 64 wide on images and 100 wide on 1-D signals
  ``(length, channels)``: on MNIST-1D that is the paper's 40-100-100-10 MLP
  (Greydanus, 2020, https://arxiv.org/abs/2011.14439).
  """

  def __init__(
    self,
    in_shape: Shape = IMAGE_SHAPE,
    num_classes: int = NUM_CLASSES,
    hidden: int | None = None,
    *,
    rngs: nnx.Rngs,
  ):
    """Builds the layers; ``hidden`` is the width of both hidden layers (None:
    64 for images, 100 for 1-D signals)."""
    if hidden is None:
      hidden = 100 if len(in_shape) == 2 else 64
    self.hidden1 = nnx.Linear(math.prod(in_shape), hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps images ``(n, *in_shape)`` to logits ``(n, num_classes)``."""
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.head(x)


class CNN(nnx.Module):
  """Two 3x3 convolutions (16 and 32 channels), 2x2 average pool, linear head.

  On 1-D signals ``(length, channels)`` the kernels are 3 and the pool 2.
  """

  def __init__(
    self,
    in_shape: Shape = IMAGE_SHAPE,
    num_classes: int = NUM_CLASSES,
    *,
    rngs: nnx.Rngs,
  ):
    """Builds the layers for inputs of ``in_shape`` (*spatial, channels)."""
    *spatial, channels = in_shape
    self.window = (2,) * len(spatial)
    kernel = (3,) * len(spatial)
    self.conv1 = nnx.Conv(channels, 16, kernel_size=kernel, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, kernel_size=kernel, rngs=rngs)
    pooled = math.prod(s // 2 for s in spatial) * 32
    self.head = nnx.Linear(pooled, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps inputs ``(n, *in_shape)`` to logits ``(n, num_classes)``."""
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, window_shape=self.window, strides=self.window)
    return self.head(x.reshape(x.shape[0], -1))


class CNN1D(nnx.Module):
  """The MNIST-1D paper's CNN: three strided 1-D convolutions, a linear head.

  Convolutions of 25 channels, kernels 5, 3 and 3, stride 2, padding 1, each
  followed by a ReLU, as in the ``ConvBase`` of Greydanus's MNIST-1D code
  (about 5,000 parameters on the length-40 signals). An image
  ``(height, width, channels)`` is read as a signal of length
  ``height * width``.

  References:
    Greydanus, *Scaling down Deep Learning*, 2020,
    https://arxiv.org/abs/2011.14439
  """

  def __init__(
    self,
    in_shape: Shape = (40, 1),
    num_classes: int = NUM_CLASSES,
    channels: int = 25,
    *,
    rngs: nnx.Rngs,
  ):
    """Builds the layers; ``channels`` is the width of every convolution."""
    length = math.prod(in_shape[:-1])
    convs = []
    for c_in, size in ((in_shape[-1], 5), (channels, 3), (channels, 3)):
      convs.append(
        nnx.Conv(c_in, channels, (size,), strides=(2,), padding=1, rngs=rngs)
      )
      length = (length + 2 - size) // 2 + 1
    self.convs = nnx.List(convs)
    self.head = nnx.Linear(length * channels, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps inputs ``(n, *in_shape)`` to logits ``(n, num_classes)``."""
    x = x.reshape(x.shape[0], -1, x.shape[-1])
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


MODELS: dict[str, Callable[..., nnx.Module]] = {
  "mlp": MLP,
  "cnn": CNN,
  "cnn1d": CNN1D,
  "resnet": ResNet,
  "vit": ViT,
}


def make_model(
  name: str,
  seed: int = 0,
  in_shape: Shape = IMAGE_SHAPE,
  num_classes: int = NUM_CLASSES,
  **kwargs: Any,
) -> nnx.Module:
  """Builds a registered model with freshly initialised weights.

  Args:
    name: a key of ``MODELS``.
    seed: seed for the weight initialisers and the dropout stream.
    in_shape: image shape ``(height, width, channels)``, or a 1-D signal's
      ``(length, channels)`` for ``mlp``, ``cnn`` and ``cnn1d``.
    num_classes: number of output logits.
    **kwargs: the model's other constructor arguments, e.g. ``hidden=32``
      for ``mlp``.

  Returns:
    The model, mapping ``(n, *in_shape)`` float images to
    ``(n, num_classes)`` logits, in training mode.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
  if name in ("resnet", "vit") and len(in_shape) != 3:
    raise ValueError(
      f"{name} takes images (height, width, channels), got in_shape "
      f"{tuple(in_shape)}; for 1-D signals use mlp, cnn or cnn1d"
    )
  return MODELS[name](tuple(in_shape), num_classes, rngs=nnx.Rngs(seed), **kwargs)


def count_params(model: nnx.Module) -> int:
  """Returns the number of scalar trainable parameters of ``model``."""
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
