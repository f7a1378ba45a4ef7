"""Run by test_runners_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

One launch runs several trainings one after the other (each ``[recipe, argv]``: ``loralab.runners.<recipe>
.main(argv)``, ``--fsdp full_shard`` in the argv), the process group made once and reused, so that several
runs share the launcher's start-up cost. Usage: ``runners_fsdp_worker.py RUNS.json`` (a JSON list of
``[recipe, argv]`` pairs).
"""

import importlib
import json
import sys
from pathlib import Path


def main(runs: str) -> None:
    for recipe, argv in json.loads(Path(runs).read_text()):
        importlib.import_module(f"loralab.runners.{recipe}").main(argv)


if __name__ == "__main__":
    main(sys.argv[1])
