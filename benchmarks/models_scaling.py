"""The models of the scaling benchmark: plain JAX, on synthetic data.

Three families, each at a few sizes (``SIZES``), each a ``Problem``: a
parameter tree, a pure loss ``loss(params, batch) -> scalar`` and one batch.

* ``mlp``: a ReLU perceptron on 256 random features (3 hidden layers of one
  width, 10 classes), batch 8: parameter-dominated, so memory in parameter
  copies is what the optimizer adds.
* ``resnet``: a ResNet-style conv net on 32x32x3 random images: a 3x3 stem,
  three stages of one residual block (two 3x3 convolutions each; widths w,
  2w, 4w, stride 2 between stages, a 1x1 projection on the shortcut),
  normalization by the batch's statistics (BatchNorm in training mode, with
  scale and offset, no running averages), global average pooling, 10
  classes.
* ``transformer``: a decoder-only language model on random tokens
  (vocabulary 256): learned positions, pre-LayerNorm blocks of causal
  multi-head attention and a 4x GELU MLP, untied output layer; next-token
  cross-entropy.

``make(family, size, dtype=...)`` builds one. With ``dtype=jnp.bfloat16`` the
parameters are stored in bfloat16 and the loss computes in bfloat16 (a
float32 point, e.g. SAM's ``perturb_dtype=jnp.float32``, is cast to bfloat16
on entry, as a Flax module with ``dtype=`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES, VOCAB, MLP_IN = 10, 256, 256

# family -> size label -> keyword arguments of the builder. The label is the
# rough parameter count; `Problem.num_params` is the exact one.
SIZES: dict[str, dict[str, dict[str, int]]] = {
  "mlp": {
    "10k": dict(width=32),
    "100k": dict(width=176),
    "1M": dict(width=640),
    "10M": dict(width=2176),
    "100M": dict(width=7040),
  },
  "resnet": {
    "20k": dict(width=8),
    "80k": dict(width=16),
    "300k": dict(width=32),
    "1.2M": dict(width=64, batch=64),
    "5M": dict(width=128, batch=64),
  },
  "transformer": {
    "140k": dict(d_model=64, layers=2),
    "870k": dict(d_model=128, layers=4),
    "3.3M": dict(d_model=256, layers=4),
    "25M": dict(d_model=512, layers=8, seq=256, batch=16),
    "85M": dict(d_model=768, layers=12, seq=256, batch=16),
  },
}


class Problem(NamedTuple):
  """One model at one size, with one batch of synthetic data.

  Attributes:
    name: ``"<family> <size>"``, e.g. ``"mlp 1M"``.
    family: ``"mlp"``, ``"resnet"`` or ``"transformer"``.
    params: the parameter tree (float32, or ``dtype``).
    loss: ``loss(params, batch) -> scalar float32``, pure.
    batch: the inputs and targets ``loss`` takes.
    num_params: number of parameters.
    describe: the shapes in words (for the tables).
  """

  name: str
  family: str
  params: Any
  loss: Callable[[Any, Any], jax.Array]
  batch: Any
  num_params: int
  describe: str


def _dense(key, n_in, n_out):
  w = jax.random.normal(key, (n_in, n_out), jnp.float32) / math.sqrt(n_in)
  return {"w": w, "b": jnp.zeros((n_out,), jnp.float32)}


def _conv(key, k, c_in, c_out):
  shape = (k, k, c_in, c_out)
  return jax.random.normal(key, shape, jnp.float32) / math.sqrt(k * k * c_in)


def _norm(c):
  return {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}


def _cross_entropy(logits, labels):
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(logp, labels[..., None], axis=-1).mean()


def mlp(key, *, width, depth=3, batch=8):
  """Parameters, loss and batch of the MLP (see the module docstring)."""
  keys = jax.random.split(key, depth + 2)
  dims = [MLP_IN] + [width] * depth + [NUM_CLASSES]
  params = {
    f"dense{i}": _dense(keys[i], dims[i], dims[i + 1]) for i in range(depth + 1)
  }

  def apply(p, x):
    for i in range(depth + 1):
      x = x @ p[f"dense{i}"]["w"] + p[f"dense{i}"]["b"]
      x = jax.nn.relu(x) if i < depth else x
    return x

  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, MLP_IN)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  describe = f"width {width}, depth {depth}, batch {batch} of {MLP_IN} features"
  return params, apply, (x, y), describe


def resnet(key, *, width, batch=8):
  """Parameters, loss and batch of the ResNet-style net (module docstring)."""
  keys = iter(jax.random.split(key, 16))
  w = (width, 2 * width, 4 * width)
  params = {"stem": _conv(next(keys), 3, 3, w[0]), "stem_norm": _norm(w[0])}
  c_in = w[0]
  for s, c in enumerate(w):
    params[f"stage{s}"] = {
      "conv1": _conv(next(keys), 3, c_in, c),
      "norm1": _norm(c),
      "conv2": _conv(next(keys), 3, c, c),
      "norm2": _norm(c),
    }
    if c != c_in:
      params[f"stage{s}"]["proj"] = _conv(next(keys), 1, c_in, c)
    c_in = c
  params["head"] = _dense(next(keys), c_in, NUM_CLASSES)

  def conv(x, k, stride=1):
    return jax.lax.conv_general_dilated(
      x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )

  def norm(x, p):
    mean = x.mean(axis=(0, 1, 2))
    var = x.var(axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

  def apply(p, x):
    x = jax.nn.relu(norm(conv(x, p["stem"]), p["stem_norm"]))
    for s in range(3):
      q, stride = p[f"stage{s}"], 1 if s == 0 else 2
      h = jax.nn.relu(norm(conv(x, q["conv1"], stride), q["norm1"]))
      h = norm(conv(h, q["conv2"]), q["norm2"])
      x = jax.nn.relu(h + (conv(x, q["proj"], stride) if "proj" in q else x))
    x = x.mean(axis=(1, 2))
    return x @ p["head"]["w"] + p["head"]["b"]

  rng = np.random.default_rng(0)
  x = rng.normal(size=(batch, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
  describe = f"widths {w}, batch {batch} of 32x32x3"
  return params, apply, (x, y), describe


def transformer(key, *, d_model, layers, heads=4, seq=64, batch=8):
  """Parameters, loss and batch of the language model (module docstring)."""
  keys = iter(jax.random.split(key, 4 * layers + 4))
  d = d_model
  params = {
    "embed": jax.random.normal(next(keys), (VOCAB, d), jnp.float32) * 0.02,
    "pos": jax.random.normal(next(keys), (seq, d), jnp.float32) * 0.02,
    "final_norm": _norm(d),
    "unembed": _dense(next(keys), d, VOCAB),
  }
  for i in range(layers):
    params[f"block{i}"] = {
      "norm1": _norm(d),
      "qkv": _dense(next(keys), d, 3 * d),
      "out": _dense(next(keys), d, d),
      "norm2": _norm(d),
      "up": _dense(next(keys), d, 4 * d),
      "down": _dense(next(keys), 4 * d, d),
    }

  def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]

  def dense(x, p):
    return x @ p["w"] + p["b"]

  mask = np.tril(np.ones((seq, seq), bool))

  def apply(p, tokens):
    b, t = tokens.shape
    x = p["embed"][tokens] + p["pos"][:t]
    for i in range(layers):
      q = p[f"block{i}"]
      qkv = dense(layer_norm(x, q["norm1"]), q["qkv"])
      qkv = qkv.reshape(b, t, 3, heads, d // heads)
      qh, kh, vh = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      att = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / math.sqrt(d // heads)
      att = jnp.where(mask[:t, :t], att, jnp.finfo(att.dtype).min)
      att = jax.nn.softmax(att.astype(jnp.float32), axis=-1).astype(vh.dtype)
      h = jnp.einsum("bhqk,bkhd->bqhd", att, vh).reshape(b, t, d)
      x = x + dense(h, q["out"])
      h = jax.nn.gelu(dense(layer_norm(x, q["norm2"]), q["up"]))
      x = x + dense(h, q["down"])
    return dense(layer_norm(x, p["final_norm"]), p["unembed"])

  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (batch, seq + 1)).astype(np.int32)
  describe = (
    f"d_model {d}, {layers} layers, {heads} heads, batch {batch} of {seq} tokens"
  )
  return params, apply, (tokens[:, :-1], tokens[:, 1:]), describe


BUILDERS = {"mlp": mlp, "resnet": resnet, "transformer": transformer}


def make(family: str, size: str, dtype: Any = jnp.float32, seed: int = 0) -> Problem:
  """One model of ``SIZES`` with its loss and a batch of synthetic data.

  Args:
    family: a key of ``SIZES``.
    size: a key of ``SIZES[family]``.
    dtype: the parameters' dtype, which is also the compute dtype.
    seed: the initialization's seed (the data's is fixed).

  Returns:
    The ``Problem``.
  """
  kwargs = SIZES[family][size]
  params, apply, (x, y), describe = BUILDERS[family](jax.random.key(seed), **kwargs)
  dtype = jnp.dtype(dtype)
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = x.astype(dtype)
  batch = (jnp.asarray(x), jnp.asarray(y))

  def loss(p, batch):
    x, y = batch
    # The compute dtype is the params' own: a point formed in another dtype
    # (e.g. float32 for bfloat16 params) is cast back on entry.
    p = jax.tree.map(lambda a: a.astype(dtype), p)
    return _cross_entropy(apply(p, x), y)

  num_params = sum(a.size for a in jax.tree.leaves(params))
  return Problem(f"{family} {size}", family, params, loss, batch, num_params, describe)
