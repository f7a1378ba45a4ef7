"""Run by test_lora_sb_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank calls ``get_lora_sb_model(tiny_llama(), config, its_init_batches, shard=fully_shard_model)``:
the PEFT model is sharded with FSDP2 (``fully_shard`` on each decoder block, the inner model and the
root) before ``initialize_lora_sb_weights`` estimates on the sharded model. Then ``R`` trains for
``STEPS`` AdamW steps on the rank's micro-batches (FSDP2 averages the gradients), as the other
distributed modes of ``lora_sb_dist_worker``. A second model targets a Linear (``spare``) that the
forward never calls: every rank must raise the estimation error naming it.

Each rank writes ``{prefix}.{rank}.pt``: ``init`` (A, B, R per layer, gathered whole), ``final`` (R),
``sharded`` and ``unused_error``.
"""

import importlib.util
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group

_spec = importlib.util.spec_from_file_location(
    "lora_sb_dist_worker", Path(__file__).with_name("lora_sb_dist_worker.py")
)
w = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(w)


def whole_state(state):
    from loralab.core.sharding import whole

    return {k: whole(v).clone() for k, v in state.items()}


def main(prefix: str) -> None:
    from loralab.core.sharding import is_sharded
    from loralab.core.testing import fully_shard_model, tiny_llama
    from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = LoraSBConfig(r=w.RANK_R, target_modules=w.TARGETS)
    model = get_lora_sb_model(
        tiny_llama(), config, w.init_batches(rank), lr=w.INIT_LR, progress=False,
        shard=fully_shard_model,
    )  # fmt: skip
    out: dict = {
        "init": whole_state(w.factors(model)),
        "sharded": torch.tensor(all(is_sharded(p) for p in model.parameters())),
    }
    opt = w.make_optimizer(model)
    model.train()
    for batch in w.train_batches(rank):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    out["final"] = whole_state(w.final_r(model))

    model = tiny_llama()
    model.model.layers[0].spare = torch.nn.Linear(64, 64)  # never called by the forward
    config = LoraSBConfig(r=w.RANK_R, target_modules=[*w.TARGETS, "spare"])
    try:
        get_lora_sb_model(
            model, config, w.init_batches(rank), lr=w.INIT_LR, progress=False,
            shard=fully_shard_model,
        )  # fmt: skip
    except Exception as e:  # the test checks the type and message
        out["unused_error"] = f"{type(e).__name__}: {e}"
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
