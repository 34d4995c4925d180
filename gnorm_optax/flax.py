"""Flax NNX integration: `grad_fn` / `value_fn` built from a model and a loss.

`nnx.Optimizer.update(model, grads, **kwargs)` forwards keyword arguments to
`tx.update`, and hands the transformation plain arrays (`nnx.as_pure` of the
`wrt` state). The functions here build the matching `grad_fn(params)` and
`value_fn(params)`: they run the loss on a *copy* of the model (`nnx.merge` of
its graph, the given parameters and a snapshot of its other state), so the
extra forward/backward passes never change BatchNorm running statistics,
dropout RNG counters or any other mutable state of `model`. Graph nodes passed
to the loss (an `nnx.Rngs`, another `nnx.Module`, an `nnx.Variable`) are
snapshotted the same way, together with the model, so references they share
with it stay shared.

Build them *before* the clean pass: the snapshot then holds the RNG state the
clean pass starts from, so the perturbed pass draws the same dropout masks (the
finite differences of gradients are only meaningful with the same masks), and
only the clean pass's state updates are kept::

    @nnx.jit
    def train_step(model, optimizer, x, y):
      grad_fn = gnorm_optax.flax.nnx_grad_fn(model, loss_fn, x, y)
      loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
      optimizer.update(model, grads, grad_fn=grad_fn, value=loss)
      return loss
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax

from gnorm_optax._src.optional import missing_extra

try:
  from flax import nnx
except ModuleNotFoundError as e:
  raise missing_extra(e, module="gnorm_optax.flax", extra="flax") from e

# How many paths an error message lists before eliding the rest.
_SHOWN_PATHS = 6


def _check_model_and_loss(name: str, model: Any, loss_fn: Any) -> None:
  """Raises a TypeError for a non-Module `model` or a non-loss `loss_fn`."""
  fix = f"    gnorm_optax.flax.{name}(model, loss_fn, *batch)"
  if isinstance(loss_fn, nnx.Module) and not isinstance(model, nnx.Module):
    raise TypeError(
      f"{name} got the loss function as `model` and an nnx.Module as "
      f"`loss_fn`: the model comes first, then the loss, then its "
      f"arguments:\n{fix}"
    )
  if not isinstance(model, nnx.Module):
    raise TypeError(
      f"{name} needs an nnx.Module as its first argument `model`, got "
      f"{type(model).__name__}. Call it as\n{fix}"
    )
  if isinstance(loss_fn, nnx.Module) or not callable(loss_fn):
    raise TypeError(
      f"{name} needs `loss_fn(model, *batch) -> loss` as its second "
      f"argument, got {type(loss_fn).__name__}. Call it as\n{fix}"
    )


def _key_str(key: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _paths(tree: Any) -> list[str]:
  """The leaves' paths of `tree` as "a.b.c"; a State and a dict agree."""
  leaves = jax.tree_util.tree_leaves_with_path(
    tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )
  return [".".join(_key_str(k) for k in path) for path, _ in leaves]


def _brief(paths: list[str]) -> str:
  shown = ", ".join(paths[:_SHOWN_PATHS])
  more = len(paths) - _SHOWN_PATHS
  return f"[{shown}{f', ... ({more} more)' if more > 0 else ''}]"


def _filter_name(wrt: Any) -> str:
  """A short name of an nnx filter: `Param`, `Any(Param, BatchStat)`."""
  if isinstance(wrt, type):
    return wrt.__name__
  return re.sub(r"OfType\(<class '(?:\w+\.)*(\w+)'>\)", r"\1", repr(wrt))


def _loss_value(name: str, out: Any, has_aux: bool) -> Any:
  """The scalar loss from `loss_fn`'s output; clear errors otherwise."""
  if has_aux:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise TypeError(
        f"{name}(..., has_aux=True) needs loss_fn to return a pair "
        f"(loss, aux), got {type(out).__name__}. Return the pair, or drop "
        f"has_aux:\n    gnorm_optax.flax.{name}(model, loss_fn, *batch)"
      )
    out = out[0]
  elif isinstance(out, (tuple, list)):
    raise TypeError(
      f"{name}: loss_fn returned a {type(out).__name__} of {len(out)} "
      f"values, not a scalar loss. If it returns (loss, aux), say so:\n"
      f"    gnorm_optax.flax.{name}(model, loss_fn, *batch, has_aux=True)"
    )
  if isinstance(out, (int, float)):
    return out
  shape = getattr(out, "shape", None)
  if shape != ():
    described = f"shape {shape}" if shape is not None else type(out).__name__
    raise TypeError(
      f"{name}: loss_fn must return a scalar loss, got {described}. Reduce "
      f"it in the loss, e.g.\n    loss = jnp.mean(per_example_losses)"
    )
  return out


def _pure_loss(
  name: str,
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
  wrt: Any,
  has_aux: bool,
) -> Callable[[Any], jax.Array]:
  """`params -> loss` on snapshot copies of `model` and the graph nodes."""
  _check_model_and_loss(name, model, loss_fn)
  # Graph nodes among the arguments (an nnx.Rngs, a teacher Module, ...) are
  # snapshotted with the model in one split, so that shared references (a
  # Module holding the very Rngs that is also passed) stay shared in the copy.
  # Used as they are, they would be mutated from inside jax.grad: Flax's
  # TraceContextError, and a changed caller's state.
  is_node = nnx.graph.is_graph_node
  leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_node)
  node_at = [i for i, leaf in enumerate(leaves) if is_node(leaf)]
  wrt_state = nnx.state(model, wrt)
  wrt_paths = frozenset(path for path, _ in nnx.to_flat_state(wrt_state))

  def in_wrt(path: tuple[Any, ...], _: Any) -> bool:
    # Only the model's own wrt state is differentiated, with `wrt` applied to
    # the model's paths: a Module passed in the arguments stays constant.
    return path[0] == 0 and tuple(path[1:]) in wrt_paths

  parts: tuple[Any, ...] = nnx.split((model, [leaves[i] for i in node_at]), in_wrt, ...)
  graphdef, rest = parts[0], parts[2]  # (graphdef, wrt state, the rest)
  # A snapshot of plain arrays, not the Variables: the copy's writes cannot
  # reach `model` or the arguments (and writing to them under jax.grad would
  # fail).
  rest = nnx.as_pure(rest)
  expected = _paths(nnx.as_pure(wrt_state))
  expected_set = frozenset(expected)
  wrt_name = _filter_name(wrt)

  def check_params(params: Any) -> None:
    got = _paths(params)
    if got == expected:
      return
    extra = [p for p in got if p not in expected_set]
    missing = [p for p in expected if p not in set(got)]
    raise ValueError(
      f"{name}: the params do not match the state this function was built "
      f"for, nnx.state(model, wrt={wrt_name}):\n"
      f"  params:   {len(got)} leaves {_brief(got)}\n"
      f"  expected: {len(expected)} leaves {_brief(expected)}\n"
      + (f"  not expected: {_brief(extra)}\n" if extra else "")
      + (f"  missing: {_brief(missing)}\n" if missing else "")
      + "Most likely the optimizer differentiates another `wrt`; pass the "
      "same one to both:\n"
      "    optimizer = nnx.Optimizer(model, tx, wrt=wrt)\n"
      f"    gnorm_optax.flax.{name}(model, loss_fn, *batch, wrt=wrt)"
    )

  def value_fn(params: Any) -> jax.Array:
    check_params(params)
    model_copy, nodes = nnx.merge(graphdef, {0: params}, rest)
    new_leaves = list(leaves)
    for i, node in zip(node_at, nodes, strict=True):
      new_leaves[i] = node
    call_args, call_kwargs = jax.tree.unflatten(treedef, new_leaves)
    out = loss_fn(model_copy, *call_args, **call_kwargs)
    return _loss_value(name, out, has_aux)

  return value_fn


def nnx_value_fn(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
  **kwargs: Any,
) -> Callable[[Any], jax.Array]:
  r"""The loss as a pure function of the parameters, for `value_fn=`.

  `value_fn(params)` is `loss_fn(model_with_params, *args, **kwargs)`,
  evaluated on a copy of `model` whose non-`wrt` state (BatchNorm statistics,
  RNG counters, ...) is the snapshot taken when `nnx_value_fn` is called;
  whatever the loss writes goes to the copy and is discarded. Graph nodes in
  `args` / `kwargs` (an `nnx.Rngs`, another `nnx.Module`, an `nnx.Variable`)
  are snapshotted the same way: the loss sees copies, so an `nnx.Rngs` draws
  the stream it would have drawn at build time and the caller's is never
  advanced, and a Module's parameters are constants (only the `wrt` state of
  `model` is an input).

  Args:
    model: the NNX model; its structure and state are read, never written.
    loss_fn: `loss_fn(model, *args, **kwargs) -> scalar loss` (or
      `(loss, aux)` with `has_aux=True`).
    *args: the batch and any other positional arguments of `loss_fn`.
    wrt: the filter of the differentiated state; the same as in
      `nnx.Optimizer(model, tx, wrt=...)`, or `value_fn` rejects the params.
    has_aux: whether `loss_fn` returns `(loss, aux)`, as in `jax.grad`. The
      aux is dropped: gnorm_optax needs a scalar `value_fn`, and the aux of the
      extra (perturbed) evaluations is not the clean pass's; take it from the
      clean pass, `nnx.value_and_grad(loss_fn, has_aux=True)`.
    **kwargs: keyword arguments of `loss_fn`.

  Returns:
    `value_fn(params) -> scalar`, where `params` has the structure of
    `nnx.as_pure(nnx.state(model, wrt))` (what `nnx.Optimizer` passes on).

  Raises:
    TypeError: at build time, if `model` is not an `nnx.Module` or `loss_fn`
      is not a loss function (e.g. the two swapped); when called, if the loss
      is not a scalar (or not a pair with `has_aux=True`).
    ValueError: when called with params of another structure (another `wrt`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from gnorm_optax.flax import nnx_value_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> loss_fn = lambda m, x: jnp.mean(m(x) ** 2)
    >>> value_fn = nnx_value_fn(model, loss_fn, jnp.ones((4, 2)))
    >>> params = nnx.as_pure(nnx.state(model, nnx.Param))
    >>> bool(jnp.allclose(value_fn(params), loss_fn(model, jnp.ones((4, 2)))))
    True

  References:
    Zhao, Zhang, Hu, ICML 2022, https://arxiv.org/abs/2202.03599 and Foret
    et al., ICLR 2021, https://arxiv.org/abs/2010.01412 (the perturbed pass
    this function serves).
  """
  return _pure_loss("nnx_value_fn", model, loss_fn, args, kwargs, wrt, has_aux)


def nnx_grad_fn(
  model: nnx.Module,
  loss_fn: Callable[..., Any],
  *args: Any,
  wrt: Any = nnx.Param,
  has_aux: bool = False,
  **kwargs: Any,
) -> Callable[[Any], Any]:
  r"""The gradient of the loss as a pure function of the parameters: `grad_fn=`.

  `grad_fn(params)` is the gradient of
  `loss_fn(model_with_params, *args, **kwargs)` with respect to `params`.
  This is `jax.grad(nnx_value_fn(model, loss_fn, *args, wrt=wrt, **kwargs))`:
  side-effect free (on `model` and on graph nodes in the arguments, e.g. an
  `nnx.Rngs`), with the tree of `nnx.as_pure(nnx.state(model, wrt))`, so it
  plugs into `optimizer.update(model, grads, grad_fn=...)` for every
  second-gradient transform of gnorm_optax. Build it before the clean pass, so
  that its RNG snapshot (the model's and any `nnx.Rngs` argument's) is the one
  the clean pass starts from.

  Args:
    model: the NNX model; its structure and state are read, never written.
    loss_fn: `loss_fn(model, *args, **kwargs) -> scalar loss` (or
      `(loss, aux)` with `has_aux=True`).
    *args: the batch and any other positional arguments of `loss_fn`; graph
      nodes (`nnx.Rngs`, `nnx.Module`) among them are snapshotted, never
      written.
    wrt: the filter of the differentiated state (default `nnx.Param`); the
      same as in `nnx.Optimizer(model, tx, wrt=...)`, or `grad_fn` rejects
      the params.
    has_aux: whether `loss_fn` returns `(loss, aux)`, as in
      `nnx.value_and_grad`. The aux is dropped, since the second-gradient
      protocol is `grad_fn(params) -> grads` and the aux of the perturbed pass
      is not the clean pass's: take it from
      `nnx.value_and_grad(loss_fn, has_aux=True)`.
    **kwargs: keyword arguments of `loss_fn`.

  Returns:
    `grad_fn(params) -> grads`.

  Raises:
    TypeError: at build time, if `model` is not an `nnx.Module` or `loss_fn`
      is not a loss function (e.g. the two swapped); when called, if the loss
      is not a scalar (or not a pair with `has_aux=True`).
    ValueError: when called with params of another structure (another `wrt`).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from flax import nnx
    >>> import gnorm_optax as gx
    >>> from gnorm_optax.flax import nnx_grad_fn
    >>> model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    >>> optimizer = nnx.Optimizer(
    ...     model, optax.chain(gx.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)
    >>> loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
    >>> x, y = jnp.ones((4, 2)), jnp.zeros((4, 1))
    >>> grad_fn = nnx_grad_fn(model, loss_fn, x, y)
    >>> loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    >>> _ = optimizer.update(model, grads, grad_fn=grad_fn)
    >>> bool(loss_fn(model, x, y) < loss)
    True

  References:
    Zhao, Zhang, Hu, ICML 2022, https://arxiv.org/abs/2202.03599 ; Karakida
    et al., ICML 2023, https://arxiv.org/abs/2210.02720
  """
  return jax.grad(_pure_loss("nnx_grad_fn", model, loss_fn, args, kwargs, wrt, has_aux))
