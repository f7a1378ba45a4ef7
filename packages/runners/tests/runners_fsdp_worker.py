"""Run by test_runners_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

One launch runs several GLUE trainings (each a full ``glue.main`` command line, ``--fsdp full_shard``
included) one after the other, the process group made once and reused, so that several methods share
the launcher's start-up cost. Usage: ``runners_fsdp_worker.py RUNS.json`` (a JSON list of argv lists).
"""

import json
import sys
from pathlib import Path

from loralab.runners import glue


def main(runs: str) -> None:
    for argv in json.loads(Path(runs).read_text()):
        glue.main(argv)


if __name__ == "__main__":
    main(sys.argv[1])
