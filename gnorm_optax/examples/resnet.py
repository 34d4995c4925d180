"""A small ResNet for images, with BatchNorm (He et al., CVPR 2016).

Train it after ``model.train()`` and evaluate it after ``model.eval()``: its
BatchNorm layers use the batch statistics in training and their running
averages in evaluation. ``gnorm_optax.examples.models.make_model("resnet")``
builds it; fork this file to change the stages or the block.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from gnorm_optax.examples.data import IMAGE_SHAPE
from gnorm_optax.examples.data import NUM_CLASSES

Shape = Sequence[int]


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
