"""The one writer of benchmarks/RESULTS.md: a section per benchmark, with provenance.

Every benchmark script calls it the same way:

  parser = argparse.ArgumentParser(...)
  results_md.add_arguments(parser)            # --small and --results PATH
  args = parser.parse_args(argv)
  record = results_md.start(args)             # load average, clock, date
  ...                                         # the benchmark
  results_md.write(record, SECTION, body)     # header line + body, to args.results

The full mode writes ``benchmarks/RESULTS.md``; ``--small`` (CI) writes the same
section to a temporary file (its path is printed), so that CI goes through
every script's write path without touching the recorded results.

The generated header of a section holds measured facts only: the command, the
git commit (``+ uncommitted changes`` when the work tree differs from it), the
device, the versions, the date, the run time and the machine's load average at
the start and at the end of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

PATH = pathlib.Path(__file__).with_name("RESULTS.md")
ROOT = PATH.parent.parent
HEADER = (
  "# Benchmark results\n\n"
  "Each section is written by the script it names (`python benchmarks/run_all.py` "
  "runs them all); its first line records the commit, device, versions, date "
  "and load average of that run. Text marked *hand-written* is an analysis of "
  "an earlier run and is not regenerated.\n\n"
)
VERSIONED = ("jax", "jaxlib", "optax", "flax")
# Flags left out of the recorded command: they name files, not the results.
NOT_SHOWN = ("--results", "--cache", "--output-dir", "--png")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds ``--small`` and ``--results PATH`` to a benchmark's parser.

  Args:
    parser: the script's parser.
  """
  parser.add_argument(
    "--small",
    action="store_true",
    help="CI: a seconds-long run through every code path; writes its section "
    "to a temporary results file (printed) unless --results is given",
  )
  parser.add_argument(
    "--results",
    type=pathlib.Path,
    default=None,
    metavar="PATH",
    help=f"results file to write (default: {PATH.relative_to(ROOT)}, or a "
    "temporary file with --small)",
  )


def results_path(args: argparse.Namespace) -> pathlib.Path:
  """The results file of this run: ``--results``, else RESULTS.md or a temp file.

  Args:
    args: parsed arguments with ``small`` and ``results``.

  Returns:
    The path to write; with ``--small`` and no ``--results`` a fresh file in
    the system's temporary directory, holding a copy of RESULTS.md so that the
    section is replaced the way the real file's would be.
  """
  if args.results is not None:
    return args.results
  if not args.small:
    return PATH
  fd, name = tempfile.mkstemp(prefix="RESULTS-small-", suffix=".md")
  os.close(fd)
  path = pathlib.Path(name)
  path.write_text(PATH.read_text() if PATH.exists() else HEADER)
  return path


@dataclasses.dataclass
class Record:
  """What a run measured about itself from its start; see ``start``.

  Attributes:
    command: the command line, as ``python benchmarks/<script> [args]``.
    path: the results file the run writes.
    load_start: the 1, 5 and 15 minute load averages at the start.
    clock_start: ``time.perf_counter()`` at the start.
    date: the UTC date and time of the start.
  """

  command: str
  path: pathlib.Path
  load_start: tuple[float, float, float]
  clock_start: float
  date: str

  def elapsed(self) -> float:
    """Seconds since the start."""
    return time.perf_counter() - self.clock_start


def start(args: argparse.Namespace, argv: list[str] | None = None) -> Record:
  """Records the start of a run: command, results path, load average, clock.

  Args:
    args: parsed arguments (see ``add_arguments``).
    argv: the arguments the script was given (``sys.argv[1:]`` when None).

  Returns:
    The ``Record`` that ``write`` turns into the section's header line.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  script = pathlib.Path(sys.argv[0]).name if sys.argv[0] else "?"
  if not script.endswith(".py"):
    script = "<script>.py"
  path = results_path(args)
  # Where files go is not part of the command that reproduces the table.
  shown, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in NOT_SHOWN:
      skip = True
    elif not a.startswith(tuple(f"{flag}=" for flag in NOT_SHOWN)):
      shown.append(a)
  now = datetime.datetime.now(datetime.UTC)
  return Record(
    command=" ".join(["python", f"benchmarks/{script}", *shown]),
    path=path,
    load_start=os.getloadavg(),
    clock_start=time.perf_counter(),
    date=now.strftime("%Y-%m-%d %H:%M UTC"),
  )


def git_commit() -> str:
  """``git rev-parse --short HEAD``, plus `` + uncommitted changes`` if any.

  RESULTS.md itself does not count: a run of several scripts rewrites it.
  """

  def git(*cmd: str) -> str:
    out = subprocess.run(
      ["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()

  try:
    commit = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", ".", ":!benchmarks/RESULTS.md")
  except (OSError, subprocess.CalledProcessError):
    return "unknown (not a git checkout)"
  return commit + (" + uncommitted changes" if dirty else "")


def versions() -> str:
  """``python X, jax X, jaxlib X, optax X, flax X`` of this environment."""
  parts = [f"python {platform.python_version()}"]
  for name in VERSIONED:
    try:
      parts.append(f"{name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
      parts.append(f"{name} not installed")
  return ", ".join(parts)


def device() -> str:
  """The first JAX device's platform and kind, and the device count."""
  import jax

  d = jax.devices()[0]
  return f"{d.platform} ({d.device_kind}), {jax.device_count()} device(s)"


def provenance(record: Record, device_text: str | None = None) -> str:
  """The generated header line of a section (measured facts only).

  Args:
    record: the run's ``start`` record.
    device_text: what ran it, when this process's ``jax.devices()`` is not
      it (e.g. worker processes with simulated devices); None asks JAX here.

  Returns:
    One paragraph: command, commit, device, versions, date, run time, load.
  """
  end = os.getloadavg()
  load = lambda x: "/".join(f"{v:.2f}" for v in x)  # noqa: E731
  return (
    f"*Generated by `{record.command}`* at commit {git_commit()}, "
    f"{record.date}, in {record.elapsed():.0f} s. Device: "
    f"{device_text or device()}; {os.cpu_count()} CPU(s) visible. "
    f"{versions()}. Load average (1/5/15 min): {load(record.load_start)} at the "
    f"start, {load(end)} at the end."
  )


def write(
  record: Record, title: str, body: str, device_text: str | None = None
) -> pathlib.Path:
  """Writes ``title``, the provenance line and ``body`` as one section.

  Args:
    record: the run's ``start`` record; names the file and the command.
    title: the section's heading line, e.g. ``"## every_k: step time"``.
    body: the section's text after the header line (tables, notes).
    device_text: see ``provenance``.

  Returns:
    The path written (also printed).
  """
  text = f"{title}\n\n{provenance(record, device_text)}\n\n{body.strip()}\n"
  write_section(title, text, record.path)
  print(f"wrote section {title!r} to {record.path}", flush=True)
  return record.path


def write_recorded(
  title: str, facts: dict, body: str, path: pathlib.Path, rendered_by: str
) -> pathlib.Path:
  """Writes a section measured elsewhere (e.g. on a GPU machine) from its facts.

  The header line names what the measuring run recorded about itself, not
  this machine: its command, commit, device, versions, date and run time.

  Args:
    title: the section's heading line.
    facts: the run's own record: ``command``, ``commit``, ``device``,
      ``versions``, ``date``, ``elapsed_s`` (missing ones read "unknown").
    body: the section's text after the header line.
    path: the results file.
    rendered_by: the command that rendered the facts here.

  Returns:
    The path written (also printed).
  """
  get = lambda k: facts.get(k) or "unknown"  # noqa: E731
  elapsed = facts.get("elapsed_s")
  took = (
    f"in {elapsed:.0f} s" if isinstance(elapsed, int | float) else "run time unknown"
  )
  header = (
    f"*Generated by `{get('command')}`* at commit {get('commit')}, "
    f"{get('date')}, {took}. Device: {get('device')}. {get('versions')}. "
    f"Rendered here from its JSON by `{rendered_by}`."
  )
  write_section(title, f"{title}\n\n{header}\n\n{body.strip()}\n", path)
  print(f"wrote section {title!r} to {path}", flush=True)
  return path


def write_section(title: str, text: str, path: pathlib.Path = PATH) -> None:
  """Replaces the section headed ``title`` (a ``## ...`` line) or appends it.

  A section runs from its heading to the next ``## `` heading; the other
  sections are kept as they are.

  Args:
    title: the section's heading line, e.g. ``"## every_k: step time"``.
    text: the whole section, starting with that heading line.
    path: the results file.
  """
  old = path.read_text() if path.exists() else HEADER
  start_ = old.find(title + "\n")
  if start_ < 0:
    new = old.rstrip("\n") + "\n\n" + text
  else:
    end = old.find("\n## ", start_ + len(title))
    rest = "" if end < 0 else old[end + 1 :]
    new = old[:start_] + text + ("\n" + rest if rest else "")
  path.write_text(new)
