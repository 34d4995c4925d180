"""A tiny Vision Transformer (Dosovitskiy et al., ICLR 2021), with dropout.

Train it after ``model.train()`` and evaluate it after ``model.eval()`` (which
turns dropout off). ``gnorm_optax.examples.models.make_model("vit")`` builds
it; fork this file to change the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from gnorm_optax.examples.data import IMAGE_SHAPE
from gnorm_optax.examples.data import NUM_CLASSES

Shape = Sequence[int]


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
