"""Regenerates every benchmark (or, with --small, checks that each one runs).

Run:  python benchmarks/run_all.py           (all full modes; rewrites RESULTS.md)
      python benchmarks/run_all.py --small   (CI: every small mode, through
                                              every writer into one temp file)
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
# script -> the arguments of its full mode (the one that writes RESULTS.md)
SCRIPTS = {
  "scaling.py": [],
  "every_k_cost.py": [],
  "multi_device.py": [],
  "generalization.py": ["--full"],
  "agr.py": [],
  "dln.py": [],
  "sam_family.py": [],
  # Without a GPU: "no GPU: skipped" (its --small also renders a tiny CPU run
  # through the writer). With one: measures; --record renders the JSON.
  "gpu_check.py": [],
}


def main(argv: list[str] | None = None) -> None:
  """Runs every script's full mode, or with ``--small`` every small mode."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="small modes (CI)")
  args = parser.parse_args(argv)
  extra: list[str] = []
  if args.small:
    fd, name = tempfile.mkstemp(prefix="RESULTS-small-", suffix=".md")
    with open(fd, "w") as f:
      f.write((HERE / "RESULTS.md").read_text())
    extra = ["--small", "--results", name]
  for script, full_args in SCRIPTS.items():
    cmd = [sys.executable, str(HERE / script), *(extra or full_args)]
    print("+ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
  if args.small:
    print(f"every small mode wrote its section to {extra[-1]}")


if __name__ == "__main__":
  main()
