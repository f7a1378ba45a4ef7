"""Multi-process worker of test_runners_c4_train.py: several C4 runs in one launch (one process group).

    torchrun --nproc-per-node 2 runners_c4_worker.py RUNS.json
    deepspeed --num_gpus 2 runners_c4_worker.py RUNS.json

``RUNS.json`` is a list of argument lists for ``loralab.runners.c4``; they run one after the other in
the same processes, so the (slow) imports and the process-group start are paid once per launch.
The deepspeed launcher appends ``--local_rank=N``, which is ignored (``LOCAL_RANK`` is read).
"""

import json
import sys

from loralab.core.distributed import end_process_group
from loralab.runners.c4 import parse_args, run

if __name__ == "__main__":
    runs_file = next(a for a in sys.argv[1:] if not a.startswith("--local_rank"))
    with open(runs_file) as fh:
        for argv in json.load(fh):
            run(parse_args(argv))
    end_process_group()  # as the entrypoints do once their run finished
