"""The notebooks: each runs top to bottom (small mode) and is committed with a full run.

Every notebook is executed end to end in a fresh Jupyter kernel by nbclient,
with ``GNORM_NOTEBOOK_SIZE=small``, so that none of them can rot. The committed
files are checked for what a reader on GitHub needs: the outputs of one
top-to-bottom run in full size, plots included, the Colab badge and the
install cell pointing at this repository.
"""

from __future__ import annotations

import ast
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

tomllib = pytest.importorskip("tomllib")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED = (
  "01_quickstart",
  "02_gnp_vs_sam",
  "03_finite_difference_gr",
  "04_agr",
  "05_multi_device",
)
# Per notebook, small mode; a run takes well under a minute on 2 CPU cores.
TIMEOUT_S = 600


def _repository() -> str:
  with open(ROOT / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["urls"]["Repository"]


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
  return [c for c in nb.cells if c.cell_type == "code"]


def _outputs(
  nb: nbformat.NotebookNode, output_type: str
) -> list[nbformat.NotebookNode]:
  return [o for c in _code_cells(nb) for o in c.outputs if o.output_type == output_type]


def _text(cell: nbformat.NotebookNode) -> str:
  return "".join(
    o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
    for o in cell.outputs
  )


def _images(nb: nbformat.NotebookNode) -> int:
  return sum(
    "image/png" in o.get("data", {}) for c in _code_cells(nb) for o in c.outputs
  )


def _parameters_cell(nb: nbformat.NotebookNode) -> int:
  tagged = [
    i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])
  ]
  assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
  return tagged[0]


def test_the_five_notebooks_exist():
  assert tuple(p.stem for p in NOTEBOOKS) == EXPECTED


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def notebook(request) -> tuple[pathlib.Path, nbformat.NotebookNode]:
  path = request.param
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  return path, nb


def test_opens_in_colab_and_installs_from_the_repository(notebook):
  path, nb = notebook
  repo = _repository()
  owner_name = repo.removeprefix("https://github.com/")
  badge = (
    f"https://colab.research.google.com/github/{owner_name}/blob/main/"
    f"notebooks/{path.name}"
  )
  assert nb.cells[0].cell_type == "markdown"
  assert badge in nb.cells[0].source, "the first cell must carry the Colab badge"
  assert "colab-badge.svg" in nb.cells[0].source
  install = nb.cells[1]
  assert install.cell_type == "code"
  assert f'REPO = "{repo}"' in install.source
  # It installs only where the package is missing: harmless in a checkout.
  assert 'if importlib.util.find_spec("gnorm_optax") is None:' in install.source
  assert nb.metadata.kernelspec.name == "python3"


def _imported_modules(nb: nbformat.NotebookNode) -> set[str]:
  """Every module a code cell imports; ``from a import b`` counts as a and a.b."""
  modules = set()
  for cell in _code_cells(nb):
    for node in ast.walk(ast.parse(cell.source)):
      if isinstance(node, ast.Import):
        modules.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        modules.add(node.module)
        modules.update(f"{node.module}.{alias.name}" for alias in node.names)
  return modules


def test_uses_only_the_public_api_and_the_documented_examples(notebook):
  """No notebook imports the training scripts, so that a reader can copy it.

  The notebooks use ``gnorm_optax``, ``gnorm_optax.flax`` and the example data
  and models (``gnorm_optax.examples.data`` and ``.models``); the scripts
  ``gnorm_optax.examples.train`` and ``.data_parallel`` are free to change.
  """
  _, nb = notebook
  scripts = ("gnorm_optax.examples.train", "gnorm_optax.examples.data_parallel")
  forbidden = sorted(
    m
    for m in _imported_modules(nb)
    if any(m == s or m.startswith(s + ".") for s in scripts)
  )
  assert not forbidden, f"imports the training scripts: {forbidden}"


def test_size_switch(notebook):
  _, nb = notebook
  source = nb.cells[_parameters_cell(nb)].source
  assert re.search(
    r'^SIZE = os\.environ\.get\("GNORM_NOTEBOOK_SIZE", "full"\)$', source, re.M
  )


def test_committed_with_the_outputs_of_a_full_run(notebook):
  """One top-to-bottom run (execution counts 1..n), full size, no errors, plots."""
  _, nb = notebook
  cells = _code_cells(nb)
  assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
  assert not _outputs(nb, "error")
  size_report = "".join(_text(c) for c in cells)
  assert "size: full" in size_report
  assert _images(nb) >= 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_top_to_bottom_in_small_mode(path, tmp_path, monkeypatch):
  monkeypatch.setenv("GNORM_NOTEBOOK_SIZE", "small")
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
    nb,
    timeout=TIMEOUT_S,
    kernel_name="python3",
    # The kernel's working directory: whatever a notebook writes stays there.
    resources={"metadata": {"path": str(tmp_path)}},
  )
  client.execute()  # raises CellExecutionError, with the traceback, on failure
  cells = _code_cells(nb)
  assert all(c.execution_count is not None for c in cells)
  assert "size: small" in "".join(_text(c) for c in cells)
  assert _images(nb) >= 1, "the notebook must still draw its plots in small mode"
