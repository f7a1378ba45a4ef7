"""Run by test_core_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

The shape of a finished run that used to abort at the interpreter's exit: the group pinned by a
module imported after it exists (``torch.distributed.nn`` binds it as a default argument, as
transformers' imports do), collectives on tensors Python holds, then the end. ``plain``: the end is
``destroy_process_group()`` alone (41 of 64 launches aborted on a loaded 2-core machine);
``end``: :func:`loralab.core.distributed.end_process_group`.
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group

if __name__ == "__main__":
    dist.init_process_group("gloo")
    # imported after the group exists: its functions keep the group as a default argument
    import torch.distributed.nn

    t = torch.ones(1024)
    for _ in range(20):
        dist.all_reduce(t)
    assert t[0].item() == 2.0**20
    if sys.argv[1] == "plain":
        dist.destroy_process_group()
    else:
        end_process_group()
