"""Regenerates every benchmark (or, with --small, checks that each one runs).

Run:  python benchmarks/run_all.py           (all full modes; rewrites RESULTS.md)
      python benchmarks/run_all.py --small   (CI: every small mode, prints only)
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys

SCRIPTS = (
    "step_cost.py",
    "every_k_cost.py",
    "multi_device.py",
    "generalization.py",
    "agr.py",
    "dln.py",
)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="small modes (CI)")
  args = parser.parse_args(argv)
  here = pathlib.Path(__file__).parent
  for script in SCRIPTS:
    cmd = [sys.executable, str(here / script), *(["--small"] if args.small else [])]
    print("+ " + " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


if __name__ == "__main__":
  main()
