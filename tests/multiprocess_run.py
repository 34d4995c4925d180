"""The data-parallel example, once per method, in one set of processes.

  python tests/multiprocess_run.py OUT [--coordinator-address HOST:PORT
      --num-processes N --process-id I]

Joins the other processes (``jax.distributed``) with the example's own flags,
then calls ``gnorm_optax.examples.data_parallel.main`` for each run in `RUNS`:
one epoch of 10 steps on the MLP, the state saved under ``OUT/<run>`` and the
results in ``OUT/<run>.json``. `tests/test_multiprocess.py` starts it as two
processes of 2 CPU devices and as one of 4, and compares what they saved.
One set of processes for all the runs: the start-up (JAX, the coordinator,
gloo) is paid once.
"""

from __future__ import annotations

import pathlib
import sys

from gnorm_optax.examples import data_parallel
from gnorm_optax.examples import distributed

COMMON = ["--model", "mlp", "--epochs", "1", "--batch-size", "128"]
RUNS = {
  "sam": ["--method", "sam"],
  "gnp_fsdp": ["--method", "gnp", "--fsdp"],
  "fdgr_every_3": ["--method", "fdgr", "--every-k", "3"],
  "agr_adamw_fsdp": ["--method", "agr_adamw", "--fsdp"],
}


def main(argv: list[str]) -> None:
  out = pathlib.Path(argv[0])
  distributed.initialize(data_parallel.parse_args(argv[1:]))
  for name, flags in RUNS.items():
    checkpoint, results = out / name, out / f"{name}.json"
    data_parallel.main(
      [*COMMON, *flags, "--checkpoint-dir", str(checkpoint), "--output", str(results)]
    )


if __name__ == "__main__":
  main(sys.argv[1:])
