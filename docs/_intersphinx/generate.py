"""Writes the intersphinx listings of optax, jax and flax from their doc sources.

The docs build offline (CI reaches no documentation site), so the inventories
of the projects the docstrings refer to are committed as text, one object a
line in the format of an `objects.inv` body, and `docs/conf.py` compresses them
into `objects.inv` files at build time. Each URL is where that project's own
Sphinx sources place the object (an `autofunction` on an API page, or an
autosummary page), and the object type comes from importing it. Regenerate
after an upstream docs reorganization, from checkouts of the three repositories:

  python docs/_intersphinx/generate.py OPTAX_REPO JAX_REPO FLAX_REPO
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).parent

# (name, docs root in its repository, API sources under it, published base URL)
PROJECTS = {
  "optax": ("docs", ["api/*.rst"]),
  "jax": (
    "docs",
    [
      f"{m}.rst"
      for m in (
        "jax",
        "jax.numpy",
        "jax.lax",
        "jax.random",
        "jax.sharding",
        "jax.tree",
        "jax.tree_util",
        "jax.nn",
        "jax.distributed",
        "jax.dtypes",
        "jax.typing",
      )
    ],
  ),
  "flax": ("docs_nnx", ["api_reference/flax.nnx/**/*.rst"]),
}

DIRECTIVE = re.compile(
  r"^\s*\.\. (auto)?(function|class|data|exception|method|attribute|module)"
  r":: *(\S+)"
)
# Public names that the sources document under their defining module.
ALIASES = {
  "flax.nnx.optimizer.Optimizer": "flax.nnx.Optimizer",
  "flax.nnx.optimizer.Optimizer.update": "flax.nnx.Optimizer.update",
  "optax.schedules.inject_hyperparams": "optax.inject_hyperparams",
  "optax.tree_utils.tree_norm": "optax.tree.norm",
}


def kind(fullname: str) -> str | None:
  """The py domain object type of `fullname` (None: it does not import)."""
  parts = fullname.split(".")
  for i in range(len(parts), 0, -1):
    try:
      obj = importlib.import_module(".".join(parts[:i]))
    except ImportError:
      continue
    try:
      for attr in parts[i:]:
        obj = getattr(obj, attr)
    except AttributeError:
      return None
    break
  else:
    return None
  if inspect.ismodule(obj):
    return "module"
  if inspect.isclass(obj):
    return "exception" if issubclass(obj, BaseException) else "class"
  if callable(obj):
    return "method" if len(parts) > 2 and parts[-2][:1].isupper() else "function"
  return "data"


def entries(path: pathlib.Path, page: str):
  """(fullname, uri) for each object that the reST file `path` documents."""
  module = ""
  lines = path.read_text().splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if m := re.match(r"^\s*\.\. (?:current)?module:: *(\S+)", line):
      module = m.group(1)
      if "currentmodule" not in line:
        yield module, f"{page}#module-{module}"
    elif m := re.match(r"^\s*\.\. automodule:: *(\S+)", line):
      module = m.group(1)
      yield module, f"{page}#module-{module}"
    elif m := DIRECTIVE.match(line):
      name = m.group(3)
      full = name if name.startswith(module + ".") or not module else f"{module}.{name}"
      yield full, f"{page}#{full}"
      j = i + 1
      while j < len(lines) and re.match(r"^\s+:", lines[j]):
        if mm := re.match(r"^\s+:members:\s*(\S.*)$", lines[j]):
          for member in mm.group(1).split(","):
            yield f"{full}.{member.strip()}", f"{page}#{full}.{member.strip()}"
        j += 1
    elif re.match(r"^\s*\.\. flax_module::", line):
      opts = {}
      j = i + 1
      while j < len(lines) and (mm := re.match(r"^\s+:(\w+):\s*(\S+)", lines[j])):
        opts[mm.group(1)] = mm.group(2)
        j += 1
      full = f"{opts['module']}.{opts['class']}"
      yield full, f"{page}#{full}"
    elif re.match(r"^\s*\.\. autosummary::", line):
      toctree = None
      j = i + 1
      while j < len(lines) and (not lines[j].strip() or lines[j].startswith(" ")):
        text = lines[j].strip()
        if mm := re.match(r":toctree:\s*(\S+)", text):
          toctree = mm.group(1).rstrip("/")
        elif text and not text.startswith(":") and toctree:
          name = text.split()[0].lstrip("~")
          full = name if name.startswith(module + ".") else f"{module}.{name}"
          yield full, f"{toctree}/{full}.html#{full}"
        j += 1
      i = j - 1
    i += 1


def main(repos: list[str]) -> None:
  for (project, (root, patterns)), repo in zip(PROJECTS.items(), repos, strict=True):
    docs = pathlib.Path(repo) / root
    found: dict[str, tuple[str, str]] = {}
    for pattern in patterns:
      for path in sorted(docs.glob(pattern)):
        page = path.relative_to(docs).with_suffix(".html").as_posix()
        for full, uri in entries(path, page):
          objtype = kind(full)
          if objtype is None or full in found:
            continue
          found[full] = (objtype, uri)
          if full in ALIASES:
            found[ALIASES[full]] = (objtype, uri)
    out = HERE / f"{project}.txt"
    with out.open("w") as f:
      for full, (objtype, uri) in sorted(found.items()):
        f.write(f"{full} py:{objtype} 1 {uri.replace('#' + full, '#$')} -\n")
    print(f"{out}: {len(found)} objects")


if __name__ == "__main__":
  main(sys.argv[1:])
