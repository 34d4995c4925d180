"""Writes one benchmark's section of benchmarks/RESULTS.md, keeping the others."""

from __future__ import annotations

import pathlib

PATH = pathlib.Path(__file__).with_name("RESULTS.md")
HEADER = "# Benchmark results\n\nEach table names the command that made it.\n\n"


def write_section(title: str, text: str, path: pathlib.Path = PATH) -> None:
  """Replaces the section headed `title` (a `## ...` line) or appends it.

  Args:
    title: the section's heading line, e.g. "## every_k: step time".
    text: the whole section, starting with that heading line.
    path: the results file.
  """
  old = path.read_text() if path.exists() else HEADER
  start = old.find(title)
  if start < 0:
    new = old.rstrip("\n") + "\n\n" + text
  else:
    end = old.find("\n## ", start + len(title))
    rest = "" if end < 0 else old[end + 1:]
    new = old[:start] + text + ("\n" + rest if rest else "")
  path.write_text(new)
