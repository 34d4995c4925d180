"""Small Flax NNX classifiers: MLP, CNN, 1-D CNN, ResNet (BatchNorm) and ViT.

Every model takes NHWC float images of shape ``in_shape`` (height, width,
channels), e.g. ``(8, 8, 1)`` for digits, ``(28, 28, 1)`` for (Fashion-)MNIST
or ``(32, 32, 3)`` for CIFAR-10, and returns ``num_classes`` logits. ``MLP``,
``CNN`` and ``CNN1D`` also take 1-D signals ``(length, channels)``, e.g.
``(40, 1)`` for MNIST-1D (``CNN1D`` is the MNIST-1D paper's net). Their
``rngs`` seed the weight initialisers (and dropout). Add a model by writing an
``nnx.Module`` whose constructor takes ``(in_shape, num_classes, *, rngs)``
and registering it in ``MODELS``.

``ResNet`` has BatchNorm and ``ViT`` has dropout: train them after
``model.train()`` and evaluate them after ``model.eval()``.
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


class BasicBlock(nnx.Module):
  """ResNet basic block: two 3x3 conv + BatchNorm, plus a (projected) shortcut."""

  def __init__(self, in_channels: int, channels: int, stride: int, *, rngs: nnx.Rngs):
    """Builds the layers; ``stride`` is the first convolution's and the
    shortcut's."""
    self.conv1 = _conv(in_channels, channels, 3, stride, rngs)
    self.bn1 = _batch_norm(channels, rngs)
    self.conv2 = _conv(channels, channels, 3, 1, rngs)
    self.bn2 = _batch_norm(channels, rngs)
    # A 1x1 projection where the shape changes, the identity elsewhere.
    project = stride != 1 or in_channels != channels
    self.shortcut = (
      nnx.Sequential(
        _conv(in_channels, channels, 1, stride, rngs), _batch_norm(channels, rngs)
      )
      if project
      else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``(n, h, w, in_channels)`` to ``(n, h/stride, w/stride, channels)``."""
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nnx.Module):
  """A small ResNet: 3x3 stem, one basic block per stage, global average pool.

  Stages have 16, 32 and 64 channels and strides 1, 2 and 2, as in the CIFAR
  ResNets of He et al. (2016) with one block per stage.
  """

  def __init__(
    self,
    in_shape: Shape = IMAGE_SHAPE,
    num_classes: int = NUM_CLASSES,
    stages: Sequence[int] = (16, 32, 64),
    *,
    rngs: nnx.Rngs,
  ):
    """Builds the layers; ``stages`` are the channels of each stage."""
    self.stem = _conv(in_shape[-1], stages[0], 3, 1, rngs)
    self.stem_bn = _batch_norm(stages[0], rngs)
    in_channels = (stages[0],) + tuple(stages[:-1])
    self.blocks = nnx.List(
      [
        BasicBlock(c_in, c_out, 1 if i == 0 else 2, rngs=rngs)
        for i, (c_in, c_out) in enumerate(zip(in_channels, stages, strict=True))
      ]
    )
    self.head = nnx.Linear(stages[-1], num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps images ``(n, *in_shape)`` to logits ``(n, num_classes)``."""
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    return self.head(x.mean(axis=(1, 2)))


class EncoderBlock(nnx.Module):
  """Pre-norm transformer block: self-attention and a GELU MLP, both residual."""

  def __init__(
    self, dim: int, num_heads: int, mlp_dim: int, dropout: float, *, rngs: nnx.Rngs
  ):
    """Builds the layers.

    Args:
      dim: token width.
      num_heads: attention heads (must divide ``dim``).
      mlp_dim: hidden width of the MLP.
      dropout: dropout rate after the attention and the MLP.
      rngs: random streams for the initialisers and dropout.
    """
    self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(num_heads, dim, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp1 = nnx.Linear(dim, mlp_dim, rngs=rngs)
    self.mlp2 = nnx.Linear(mlp_dim, dim, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps tokens ``(n, length, dim)`` to tokens of the same shape."""
    x = x + self.dropout(self.attention(self.norm1(x)))
    y = self.mlp2(nnx.gelu(self.mlp1(self.norm2(x))))
    return x + self.dropout(y)


class ViT(nnx.Module):
  """A tiny Vision Transformer: patch embedding, 2 encoder blocks, mean pool.

  Images are cut into non-overlapping ``patch x patch`` patches (2x2 for
  images up to 16 pixels a side, 4x4 above), embedded linearly, given a
  learned position embedding, passed through the encoder and averaged over
  the tokens before the linear head (Dosovitskiy et al., ICLR 2021).
  """

  def __init__(
    self,
    in_shape: Shape = IMAGE_SHAPE,
    num_classes: int = NUM_CLASSES,
    dim: int = 48,
    depth: int = 2,
    num_heads: int = 4,
    mlp_dim: int = 96,
    dropout: float = 0.1,
    patch: int | None = None,
    *,
    rngs: nnx.Rngs,
  ):
    """Builds the layers.

    Args:
      in_shape: image shape ``(height, width, channels)``.
      num_classes: number of output logits.
      dim: token width.
      depth: number of encoder blocks.
      num_heads: attention heads (must divide ``dim``).
      mlp_dim: hidden width of the encoder MLPs.
      dropout: dropout rate in the encoder blocks.
      patch: patch side; None picks ``default_patch(in_shape)``.
      rngs: random streams for the initialisers and dropout.

    Raises:
      ValueError: if ``patch`` does not divide the image sides.
    """
    height, width, channels = in_shape
    patch = default_patch(in_shape) if patch is None else patch
    if height % patch or width % patch:
      raise ValueError(
        f"patch must divide the image sides, got patch={patch} for {in_shape}"
      )
    self.embed = nnx.Conv(
      channels,
      dim,
      kernel_size=(patch, patch),
      strides=(patch, patch),
      padding="VALID",
      rngs=rngs,
    )
    num_tokens = (height // patch) * (width // patch)
    self.position = nnx.Param(
      nnx.initializers.normal(0.02)(rngs.params(), (1, num_tokens, dim))
    )
    self.blocks = nnx.List(
      [EncoderBlock(dim, num_heads, mlp_dim, dropout, rngs=rngs) for _ in range(depth)]
    )
    self.norm = nnx.LayerNorm(dim, rngs=rngs)
    self.head = nnx.Linear(dim, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps images ``(n, *in_shape)`` to logits ``(n, num_classes)``."""
    x = self.embed(x)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.position[...]
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x).mean(axis=1))


def default_patch(in_shape: Shape) -> int:
  """Patch side of ``ViT``: 2 for images up to 16 pixels a side, else 4."""
  return 2 if max(in_shape[:2]) <= 16 else 4


def _conv(in_channels: int, channels: int, size: int, stride: int, rngs: nnx.Rngs):
  return nnx.Conv(
    in_channels,
    channels,
    kernel_size=(size, size),
    strides=(stride, stride),
    use_bias=False,
    rngs=rngs,
  )


def _batch_norm(channels: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(channels, momentum=0.9, rngs=rngs)


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
