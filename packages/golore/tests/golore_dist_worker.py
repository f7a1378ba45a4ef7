"""Run by test_golore_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

mode ``ddp``: GoLore (random projectors) + GaLore groups under DDP, each rank a different batch;
writes this rank's parameters. mode ``zero0`` / ``zero2``: the same optimizer as a DeepSpeed client
optimizer; stage 0 must train, stage 2 must raise our clear error (written to the output file).
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.golore import GoLoreAdamW


def groups(model):
    proj = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    ids = {id(p) for p in proj}
    return [
        dict(params=[p for p in model.parameters() if id(p) not in ids]),
        dict(params=proj, rank=4, update_proj_gap=2, rand_ratio=0.5, total_steps=4),
    ]


def main(mode: str, prefix: str) -> None:
    if mode == "ddp":
        dist.init_process_group("gloo")
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    model = tiny_llama()
    opt = GoLoreAdamW(groups(model), lr=1e-3)
    batches = make_lm_batches(4, seed=rank)  # different data per rank
    if mode == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for b in batches:
            opt.zero_grad()
            ddp(**b).loss.backward()
            opt.step()
        torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{prefix}.{rank}.pt")
    else:
        import deepspeed

        stage = int(mode[-1])
        cfg = {
            "train_micro_batch_size_per_gpu": 2,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        try:
            for b in batches:
                loss = engine(**b).loss
                engine.backward(loss)
                engine.step()
            msg = "ok"
        except RuntimeError as e:
            msg = str(e)
        with open(f"{prefix}.{rank}.txt", "w") as fh:
            fh.write(msg)
        torch.save({n: p.detach() for n, p in model.named_parameters()}, f"{prefix}.{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
