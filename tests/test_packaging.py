"""The package's metadata and its optional modules' import errors."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
HUB_STACK = ("datasets", "pyarrow", "pandas")


def _names(requirements: list[str]) -> set[str]:
  return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}


def test_metadata_states_python_license_and_urls():
  assert PROJECT["requires-python"] == ">=3.11"  # jax 0.10 and flax need 3.11
  assert PROJECT["license"] == "Apache-2.0"
  assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
  assert (ROOT / "gnorm_optax" / "py.typed").exists()
  assert {"Repository", "Documentation", "Issues"} <= set(PROJECT["urls"])
  assert "Typing :: Typed" in PROJECT["classifiers"]


def test_extras_bring_what_they_name_and_examples_skip_the_hub_stack():
  extras = PROJECT["optional-dependencies"]
  assert _names(extras["flax"]) == {"flax"}
  assert not _names(extras["examples"]) & set(HUB_STACK)
  assert "datasets" in _names(extras["hub"])


@pytest.mark.parametrize(
  "module, missing, extra",
  [("gnorm_optax.flax", "flax", "flax")],
)
def test_optional_module_without_its_dependency_names_the_extra(module, missing, extra):
  # `sys.modules[name] = None` makes `import name` fail as if not installed.
  code = (
    f"import sys; sys.modules[{missing!r}] = None\n"
    f"try:\n  import {module}\n"
    "except ModuleNotFoundError as e:\n  print(e)\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, check=True
  ).stdout
  assert f"pip install 'gnorm_optax[{extra}]'" in out, out
  assert module in out and repr(missing) in out, out
