"""The public namespace: every name exists and is documented, examples run.

This is where the doctests run (pytest runs without `--doctest-modules`):
every docstring example in the library's modules (`gnorm_optax`,
`gnorm_optax.flax`, `gnorm_optax._src.*`; not the example scripts of
`gnorm_optax.examples`), once each.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
import types

import optax
import pytest

import gnorm_optax as gx

PUBLIC = sorted(gx.__all__)
FUNCTIONS = [n for n in PUBLIC if inspect.isfunction(getattr(gx, n, None))]
CLASSES = [n for n in PUBLIC if inspect.isclass(getattr(gx, n, None))]

SECTIONS = ("Args:", "Returns:", "Examples:", "References:", "Raises:", "Attributes:")


def section(doc: str, name: str) -> str:
  """The text of section `name` (up to the next section header)."""
  match = re.search(rf"^\s*{re.escape(name)}\s*$", doc, re.MULTILINE)
  assert match, f"no {name!r} section"
  rest = doc[match.end() :]
  ends = [
    m.start()
    for s in SECTIONS
    if (m := re.search(rf"^\s*{re.escape(s)}\s*$", rest, re.MULTILINE))
  ]
  return rest[: min(ends, default=len(rest))]


def test_all_is_explicit_and_complete():
  assert len(PUBLIC) == len(set(gx.__all__)), "duplicates in __all__"
  for name in PUBLIC:
    assert hasattr(gx, name), f"gnorm_optax.__all__ names a missing {name!r}"
  # Everything public in the namespace (except subpackages and __version__)
  # is listed.
  exported = {
    n
    for n, v in vars(gx).items()
    if not n.startswith("_") and not isinstance(v, types.ModuleType)
  }
  assert exported <= set(gx.__all__), exported - set(gx.__all__)
  assert isinstance(gx.__version__, str)


def test_public_names_are_functions_or_classes():
  assert sorted(FUNCTIONS + CLASSES) == PUBLIC
  assert FUNCTIONS and CLASSES


@pytest.mark.parametrize("name", FUNCTIONS)
def test_function_docstring(name):
  fn = getattr(gx, name)
  doc = inspect.getdoc(fn)
  assert doc, f"{name} has no docstring"
  summary = doc.splitlines()[0]
  assert summary.strip() and summary.rstrip().endswith("."), summary

  params = [
    p
    for p in inspect.signature(fn).parameters.values()
    if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
  ]
  if params:
    args = section(doc, "Args:")
    for p in params:
      assert re.search(rf"^\s*{p.name}( \(.*\))?:", args, re.MULTILINE), (
        f"{name}: argument {p.name!r} is not documented under Args:"
      )
  assert section(doc, "Returns:").strip()
  assert ">>>" in section(doc, "Examples:")
  assert "arxiv.org" in section(doc, "References:")


def library_doctests() -> dict[str, doctest.DocTest]:
  """Every doctest with examples in the library's modules, by name."""
  names = ["gnorm_optax", "gnorm_optax.flax"] + [
    m.name for m in pkgutil.walk_packages(gx._src.__path__, "gnorm_optax._src.")
  ]
  finder = doctest.DocTestFinder()
  found = {}
  for name in names:
    module = importlib.import_module(name)
    for test in finder.find(module):
      if test.examples:
        found[test.name] = test
  return found


DOCTESTS = library_doctests()


def test_every_public_function_has_a_doctest():
  documented = {name.rsplit(".", 1)[-1] for name in DOCTESTS}
  assert set(FUNCTIONS) <= documented, set(FUNCTIONS) - documented
  assert {"nnx_grad_fn", "nnx_value_fn"} <= documented


@pytest.mark.parametrize("name", sorted(DOCTESTS))
def test_examples_run(name):
  """The `Examples:` doctest runs and prints what it says."""
  runner = doctest.DocTestRunner(
    optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  )
  runner.run(DOCTESTS[name])
  result = runner.summarize(verbose=False)
  assert result.failed == 0, f"{name}: {result.failed} doctest example(s) failed"


def test_probe_is_documented():
  """The one public class that is not a record: the building block's probe."""
  doc = inspect.getdoc(gx.Probe) or ""
  assert len(doc.splitlines()[0]) > 10 and "grad_fn" in doc
  for name, member in vars(gx.Probe).items():
    if not name.startswith("_") and callable(member):
      assert inspect.getdoc(member), f"Probe.{name} has no docstring"


@pytest.mark.parametrize("name", [n for n in CLASSES if n != "Probe"])
def test_state_class_documented(name):
  cls = getattr(gx, name)
  doc = inspect.getdoc(cls) or ""
  # a state, an info record, or the building block's refresh policy
  assert name.endswith(("State", "Info", "Policy"))
  assert issubclass(cls, tuple) and hasattr(cls, "_fields"), "a NamedTuple"
  # Not the docstring namedtuple generates ("Name(field, ...)").
  assert not doc.startswith(f"{name}("), f"{name} has no docstring"
  assert len(doc.splitlines()[0]) > 10
  for field in cls._fields:
    assert re.search(rf"\b{field}\b", doc), f"{name}.{field} is not documented"
  if len(cls._fields) > 1:
    for field in cls._fields:
      assert re.search(rf"^\s*{field}:", section(doc, "Attributes:"), re.MULTILINE), (
        f"{name}.{field} not under Attributes:"
      )


def _documented_return(fn) -> str:
  returns = section(inspect.getdoc(fn), "Returns:")
  match = re.search(r"optax\.(\w+)", returns)
  assert match, f"Returns: of {fn.__name__} names no optax class"
  return match.group(1)


TRANSFORM_ARGS = {
  "penalized_grad": {},
  "sam": {},
  "finite_difference_gr": dict(gamma=0.1, epsilon=0.01),
  "gradient_regularization": dict(gamma=0.1),
  "gsam": {},
  "second_gradient_transformation": dict(
    name="example",
    correction_fn=lambda probe, g_perturb, g, params, hp: g,
    apply_fn=lambda g, d, hp: g,
    hyperparams={},
  ),
  "adaptive_gradient_regularization": {},
  "agr_adamw": dict(learning_rate=0.1),
  "agr_adan": dict(learning_rate=0.1),
  "adan": dict(learning_rate=0.1),
  "flooding": dict(level=0.1),
}


@pytest.mark.parametrize("name", sorted(TRANSFORM_ARGS))
def test_documented_return_type_is_returned(name):
  fn = getattr(gx, name)
  tx = fn(**TRANSFORM_ARGS[name])
  documented = _documented_return(fn)
  assert type(tx).__name__ == documented
  assert isinstance(tx, optax.GradientTransformation)


def test_transform_args_cover_every_public_transform():
  returns_tx = {
    n
    for n in FUNCTIONS
    if "optax.GradientTransformation"
    in section(inspect.getdoc(getattr(gx, n)), "Returns:")
  }
  assert returns_tx == set(TRANSFORM_ARGS)
