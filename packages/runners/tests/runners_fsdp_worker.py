"""Run by test_runners_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

One launch runs several trainings one after the other (each ``[recipe, argv]``: ``loralab.runners.<recipe>
.main(argv)``, ``--fsdp full_shard`` in the argv), the process group made once and reused, so that several
runs share the launcher's start-up cost. Usage: ``runners_fsdp_worker.py RUNS.json`` (a JSON list of
``[recipe, argv]`` pairs; ``["copy_run", [src, dst]]`` copies a run directory without ``final/`` on rank
0, as an interrupted run leaves it, for a ``--resume_from_checkpoint`` run that follows;
``["slow_rank", [seconds]]`` holds rank 1 back before the next run, as a slower process would be). Also
run by the ``deepspeed`` launcher.
"""

import importlib
import json
import shutil
import sys
from pathlib import Path

from loralab.core.distributed import end_process_group


def main(runs: str) -> None:
    for recipe, argv in json.loads(Path(runs).read_text()):
        if (
            recipe == "copy_run"
        ):  # [src, dst]: an interrupted run (no final/), for a resume that follows
            import torch.distributed as dist

            if dist.get_rank() == 0:
                shutil.copytree(
                    argv[0], argv[1], ignore=shutil.ignore_patterns("final", "checkpoint-3")
                )
            dist.barrier()
            continue
        if recipe == "slow_rank":  # [seconds]: rank 1 starts the next run that much later
            import time

            import torch.distributed as dist

            if dist.get_rank() == 1:
                time.sleep(float(argv[0]))
            continue
        importlib.import_module(f"loralab.runners.{recipe}").main(argv)
    end_process_group()  # as the entrypoints do once their runs finished


if __name__ == "__main__":
    # the deepspeed launcher appends --local_rank=N (LOCAL_RANK is read)
    main(next(a for a in sys.argv[1:] if not a.startswith("--local_rank")))
