"""Tree math shared by the transforms: compute dtypes, norms, shard_map types.

Where `optax.tree` has the operation with the same semantics the library uses
it (`cast_like`, `add_scale`, `vdot`, `random_like`, `where`, `conj`); what is
here differs from it on purpose, as each docstring says.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype the math runs in: at least float32 (bf16/f16 are promoted)."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(tree: Any) -> Any:
  """Casts every leaf to its compute dtype (at least float32)."""
  return jax.tree.map(lambda x: x.astype(compute_dtype(x.dtype)), tree)


def abs_sq(x: jax.Array) -> jax.Array:
  """`|x|^2` elementwise, real for complex `x` (optax's convention)."""
  if jnp.iscomplexobj(x):
    return jnp.square(x.real) + jnp.square(x.imag)
  return jnp.square(x)


def global_norm(tree: Any) -> jax.Array:
  """L2 norm `sqrt(sum |x|^2)` over all leaves, accumulated in at least float32.

  Complex leaves count `|x|^2`, as `optax.tree.norm` does; unlike it, bfloat16
  leaves are squared in float32. A gradient whose squares overflow (an entry
  above about 1.8e19 in float32) has an infinite norm: `penalized_grad` counts
  such a step as degenerate (see `SecondGradientState`) rather than paying a
  second, rescaled pass over the gradient on every step.
  """
  leaves = [x.astype(compute_dtype(x.dtype)) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(abs_sq(x)) for x in leaves))


def real_vdot(a: Any, b: Any) -> jax.Array:
  """Real inner product `sum(real(conj(a) * b))` over the leaves, >= float32.

  A complex leaf counts as its real and imaginary parts, two real
  coordinates. (No reshape: it is not defined on explicitly sharded arrays.)
  """
  terms = [
    jnp.sum(jnp.real(jnp.conj(x) * y))
    for x, y in zip(jax.tree.leaves(upcast(a)), jax.tree.leaves(upcast(b)), strict=True)
  ]
  return sum(terms, start=jnp.zeros((), jnp.float32))


def same_structure(a: Any, b: Any) -> bool:
  """True when the trees `a` and `b` have the same structure."""
  # (jaxlib's PyTreeDef stub declares no __eq__.)
  return bool(jax.tree.structure(a) == jax.tree.structure(b))  # type: ignore[operator]


def tree_all_finite(tree: Any) -> jax.Array:
  """True when every element of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


def varying_axes(x: Any) -> frozenset:
  """The mesh axes over which `x` varies inside `shard_map` (empty elsewhere).

  Only tracked when `shard_map` checks them (`check_vma=True`, its default).
  """
  axes = getattr(jax.typeof(x), "manual_axis_type", None)
  return frozenset(axes.varying) if axes is not None else frozenset()


def match_varying(x: Any, like: Any) -> Any:
  """Casts `x` to vary over the axes that `like` varies over (leaf by leaf).

  Needed where an averaged (invariant) value meets per-device values in one
  primitive, e.g. the tangent of `jax.jvp` at varying parameters.
  """

  def one(a, b):
    missing = tuple(sorted(varying_axes(b) - varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a

  return jax.tree.map(one, x, like)
