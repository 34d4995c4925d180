"""Sphinx configuration of the gnorm_optax documentation.

Build (what .ci/run does; offline, warnings are errors):

  pip install -e ".[docs]"
  sphinx-build -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

import filecmp
import inspect
import os
import pathlib
import posixpath
import re
import shutil
import zlib

from sphinx.ext import intersphinx
from sphinx.util import logging

import gnorm_optax
import gnorm_optax.flax

HERE = pathlib.Path(__file__).resolve().parent
REPO_URL = "https://github.com/gnorm-optax/gnorm_optax"

project = "gnorm_optax"
author = "The gnorm_optax authors"
copyright = "The gnorm_optax authors"  # noqa: A001 (Sphinx's name)
release = gnorm_optax.__version__
version = release

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.intersphinx",
  "sphinx.ext.linkcode",
  "sphinx.ext.mathjax",
  "sphinx.ext.napoleon",
  "myst_nb",
  "sphinx_copybutton",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_intersphinx", "Thumbs.db", ".DS_Store"]

# A name in single backticks in a docstring is a cross-reference when it names
# an object (`penalized_grad`, `optax.chain`), and code otherwise.
default_role = "py:obj"

# -- autodoc, autosummary, napoleon (Google-style docstrings) ---------------

autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# The annotations as the code writes them (the modules use
# `from __future__ import annotations`), under their public names.
autodoc_type_aliases = {
  "optax.ScalarOrSchedule": "optax.ScalarOrSchedule",
  "optax.GradientTransformationExtraArgs": "optax.GradientTransformationExtraArgs",
  "nnx.Module": "flax.nnx.Module",
}
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
# One parameter per line once a signature is longer than this (as optax).
maximum_signature_line_length = 80
python_display_short_literal_types = True
autosummary_generate = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# `Attributes:` of the NamedTuple states as a field list: the fields are
# documented once, not a second time next to namedtuple's own descriptors.
napoleon_use_ivar = True
napoleon_use_rtype = False
napoleon_attr_annotations = False

# -- MyST and notebooks ------------------------------------------------------

myst_enable_extensions = ["amsmath", "colon_fence", "dollarmath"]
myst_heading_anchors = 3
# The notebooks are rendered from their committed outputs (CI executes them in
# their small mode in the tests; the outputs here are from a full run).
nb_execution_mode = "off"
nb_merge_streams = True


def _copy_notebooks() -> None:
  """Mirrors ../notebooks/*.ipynb into notebooks/ (git-ignored) for the build.

  Sphinx reads sources only under docs/, and a symlink would not do: MyST
  resolves links through it to paths outside docs/. Unchanged files are not
  touched, so incremental builds stay incremental.
  """
  src, dst = HERE.parent / "notebooks", HERE / "notebooks"
  dst.mkdir(exist_ok=True)
  wanted = {p.name for p in src.glob("*.ipynb")}
  for stale in dst.glob("*.ipynb"):
    if stale.name not in wanted:
      stale.unlink()
  for name in sorted(wanted):
    if not (dst / name).exists() or not filecmp.cmp(src / name, dst / name, False):
      shutil.copy2(src / name, dst / name)


_copy_notebooks()

# -- HTML --------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "gnorm_optax"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
  "repository_url": REPO_URL,
  "repository_branch": "main",
  "path_to_docs": "docs",
  "use_repository_button": True,
  "use_issues_button": True,
  "show_toc_level": 2,
  "navigation_with_keys": False,
  # The search field is in the sidebar; not a second one in a header bar.
  "navbar_persistent": [],
}
html_show_sourcelink = False
add_function_parentheses = False
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# -- Cross-references to optax, jax and flax (offline) ------------------------
# The build cannot download the projects' objects.inv (CI is offline), so their
# inventories are committed as text in _intersphinx/ (generated from the
# projects' own doc sources by _intersphinx/generate.py) and compressed here
# into objects.inv files. The links point at the published documentation.

INVENTORIES = {
  "optax": "https://optax.readthedocs.io/en/latest/",
  "jax": "https://docs.jax.dev/en/latest/",
  "flax": "https://flax.readthedocs.io/en/latest/",
}


def _write_inventory(name: str) -> str:
  """Compresses `_intersphinx/NAME.txt` into an objects.inv; returns its path."""
  body = (HERE / "_intersphinx" / f"{name}.txt").read_text()
  out = HERE / "_build" / "intersphinx" / f"{name}.inv"
  out.parent.mkdir(parents=True, exist_ok=True)
  header = (
    "# Sphinx inventory version 2\n"
    f"# Project: {name}\n"
    "# Version: latest\n"
    "# The remainder of this file is compressed using zlib.\n"
  )
  out.write_bytes(header.encode() + zlib.compress(body.encode()))
  return str(out)


intersphinx_mapping = {
  name: (url, _write_inventory(name)) for name, url in INVENTORIES.items()
}
intersphinx_timeout = 1

# The abbreviations the docstrings use, resolved to the full names.
ALIASES = {
  "gx.": "gnorm_optax.",
  "nnx.": "flax.nnx.",
  "jnp.": "jax.numpy.",
  "lax.": "jax.lax.",
}


def _resolve_alias(app, env, node, contnode):
  """`gx.sam`, `nnx.Optimizer`, `jnp.float32`, `lax.cond` as references."""
  if node.get("refdomain") != "py":
    return None
  target = node.get("reftarget", "")
  for short, full in ALIASES.items():
    if target.startswith(short):
      target = full + target[len(short) :]
      break
  else:
    return None
  python = env.get_domain("py")
  found = python.resolve_xref(
    env, node["refdoc"], app.builder, node["reftype"], target, node, contnode
  )
  if found is not None:
    return found
  node["reftarget"] = target
  return intersphinx.missing_reference(app, env, node, contnode)


# -- Files included from the repository ----------------------------------------
# docs/multi_device.md includes the README's section on several devices and
# docs/benchmarks.md includes benchmarks/RESULTS.md, as they stand. Their
# relative links are written for GitHub; here they point at the site's own
# pages where there is one (RESULTS.md, the notebooks, docs/*.md), and at the
# file on GitHub otherwise.

README_SECTION = re.compile(r"^## (Several devices.*)$", re.MULTILINE)
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")


def _site_link(target: str, base: str) -> str:
  """Where a link of a repository file in directory `base` points on the site."""
  blob = f"{REPO_URL}/blob/main/"
  if target.startswith(blob + "docs/"):
    return target[len(blob) + len("docs/") :]
  if re.match(r"^[a-z]+:|^#", target):
    return target
  path, _, anchor = target.partition("#")
  path = posixpath.normpath(posixpath.join(base, path))
  anchor = f"#{anchor}" if anchor else ""
  if path == "benchmarks/RESULTS.md":
    return f"benchmarks.md{anchor}"
  if path.startswith(("notebooks/", "docs/")) and path.endswith((".ipynb", ".md")):
    return path.removeprefix("docs/") + anchor
  return f"{blob}{path}{anchor}"


def _include_read(app, relative_path, parent_docname, content):
  """Rewrites the included README section and RESULTS.md for the site."""
  path = pathlib.Path(relative_path).as_posix()
  if path == "../README.md":
    text = content[0]
    heading = README_SECTION.search(text)
    if heading is None:
      logging.getLogger(__name__).warning(
        "README.md has no '## Several devices' section for docs/multi_device.md"
      )
      return
    rest = text[heading.end() :]
    end = re.search(r"^## ", rest, re.MULTILINE)
    content[0] = rest[: end.start() if end else len(rest)]
    base = ""
  elif path == "../benchmarks/RESULTS.md":
    base = "benchmarks"
  else:
    return
  content[0] = LINK.sub(
    lambda m: f"[{m.group(1)}]({_site_link(m.group(2), base)})", content[0]
  )


# -- Source links --------------------------------------------------------------


def linkcode_resolve(domain, info):
  """The GitHub URL of a documented object's source lines."""
  if domain != "py" or not info["module"].startswith("gnorm_optax"):
    return None
  obj = gnorm_optax if info["module"] == "gnorm_optax" else gnorm_optax.flax
  try:
    for attr in info["fullname"].split("."):
      obj = getattr(obj, attr)
    obj = inspect.unwrap(obj)
    filename = inspect.getsourcefile(obj)
    source, start = inspect.getsourcelines(obj)
  except (AttributeError, TypeError, OSError):
    return None
  if filename is None:
    return None
  root = pathlib.Path(gnorm_optax.__file__).resolve().parent.parent
  path = os.path.relpath(filename, root)
  return f"{REPO_URL}/blob/main/{path}#L{start}-L{start + len(source) - 1}"


# -- Every public name has its entry in the API reference ----------------------


def _check_api_coverage(app, env):
  """Warns (an error under -W) for a public name missing from api.rst."""
  documented = set(env.get_domain("py").objects)
  public = [f"gnorm_optax.{n}" for n in gnorm_optax.__all__] + [
    f"gnorm_optax.flax.{n}"
    for n, v in vars(gnorm_optax.flax).items()
    if not n.startswith("_")
    and inspect.isfunction(v)
    and v.__module__ == "gnorm_optax.flax"
  ]
  for name in public:
    if name not in documented:
      logging.getLogger(__name__).warning(
        f"{name} is public but not in the API reference: add it to docs/api.rst"
      )


def setup(app):
  app.connect("include-read", _include_read)
  app.connect("missing-reference", _resolve_alias)
  app.connect("env-check-consistency", _check_api_coverage)
