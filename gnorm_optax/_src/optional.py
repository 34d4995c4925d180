"""The error raised when an optional module's dependency is not installed."""

from __future__ import annotations


def missing_extra(
  error: ModuleNotFoundError, *, module: str, extra: str
) -> ModuleNotFoundError:
  """Returns an error naming the extra to install for `module`.

  Use it where an optional module imports its dependency::

    try:
      from flax import nnx
    except ModuleNotFoundError as e:
      raise missing_extra(e, module="gnorm_optax.flax", extra="flax") from e

  Args:
    error: the `ModuleNotFoundError` raised by the failed import.
    module: the optional module that needs the dependency.
    extra: the `pip` extra that installs it.

  Returns:
    A `ModuleNotFoundError` whose message names the missing package and the
    command that installs it (raise it `from error`).
  """
  missing = error.name or "a dependency"
  return ModuleNotFoundError(
    f"{module} needs {missing!r}, which is not installed. Install it with "
    f"pip install 'gnorm_optax[{extra}]'",
    name=error.name,
  )
