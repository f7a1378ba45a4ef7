"""Run by test_golore_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

One launch runs every mode in turn on the same seeded model, each rank a different batch, and writes
``{prefix}.{mode}.{rank}.pt`` (the trained parameters, or ``{"error": message}``):

- ``ddp``: GoLore (SVD, then random projectors) + GaLore groups under DDP;
- ``zero0`` / ``zero1`` / ``zero2``: the same optimizer as a DeepSpeed client optimizer;
- ``zero2resume``: ZeRO-2 with a DeepSpeed checkpoint saved mid-way and loaded into a fresh engine;
- ``zero3``: the same under ZeRO-3 (every matrix partitioned over the ranks: the projection algebra on
  each rank's elements, checked to have run);
- ``zero2offload`` / ``zero3offload``: ZeRO-2 with the optimizer offloaded to the CPU, ZeRO-3 with the
  optimizer and the parameters offloaded (``zero_force_ds_cpu_optimizer: false`` keeps GoLore's
  optimizer; DeepSpeed would otherwise refuse a client optimizer under offload);
- ``zero2roundrobin``: ZeRO-2 with ``round_robin_gradients`` (DeepSpeed reorders the parameters in
  its flat buffers; the views read each one's place from its storage offset);
- ``zero3subgroups``: ZeRO-3 with a small ``sub_group_size`` (each param group stepped in several
  partitions, as DeepSpeed does for large models);
- ``ddp-sgd`` / ``zero3-sgd``: GoLore's momentum SGD (coupled weight decay) under DDP and ZeRO-3;
  ``zero3resume-sgd``: the same with a DeepSpeed checkpoint saved mid-way and loaded into a fresh
  ZeRO-3 engine (each rank's rows / column blocks of the split matrices' state).
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group
from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.golore import GoLoreAdamW, GoLoreSGD

# Adam's first steps are ~lr·sign(g): with a tiny eps, the ulp-level differences of ZeRO-3's
# reduce-scatter order in near-zero gradient entries (the embedding rows) become whole-lr differences
EPS = 1e-4
MODES = (
    "ddp",
    "zero0",
    "zero1",
    "zero2",
    "zero2resume",
    "zero3",
    "zero2offload",
    "zero3offload",
    "zero2roundrobin",
    "zero3subgroups",
    "ddp-sgd",
    "zero3-sgd",
    "zero3resume-sgd",
)
CKPT = ""  # set in main: a checkpoint folder next to the outputs
STEPS = 4


def groups(model):
    proj = [p for n, p in model.named_parameters() if n.endswith("proj.weight")]
    ids = {id(p) for p in proj}
    return [
        dict(params=[p for p in model.parameters() if id(p) not in ids]),
        # weight decay and a 1-D-free matrix group; refresh at steps 0 (SVD) and 2 (random)
        dict(params=proj, rank=4, update_proj_gap=2, rand_ratio=0.5, total_steps=STEPS),
    ]


def ds_config(stage, offload=False, round_robin=False, sub_groups=False):
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips to 1.0 by default; DDP does not clip
    }
    if round_robin:
        config["zero_optimization"]["round_robin_gradients"] = True
    if sub_groups:  # ZeRO-3 steps each param group in partitions of ~this many elements
        config["zero_optimization"]["sub_group_size"] = 3000
    if offload:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        if stage == 3:
            config["zero_optimization"]["offload_param"] = {"device": "cpu"}
        config["zero_force_ds_cpu_optimizer"] = False
    return config


def optimizer(model, sgd):
    if sgd:  # coupled weight decay: added to each rank's gradient elements
        return GoLoreSGD(groups(model), lr=5e-2, momentum=0.9, weight_decay=0.1)
    return GoLoreAdamW(groups(model), lr=1e-2, weight_decay=0.1, eps=EPS)


def run_resume(rank, batches, stage=2, sgd=False):
    """Train half, save a DeepSpeed checkpoint, resume in a fresh engine, train the rest."""
    import deepspeed

    def engine():
        model = tiny_llama()
        opt = optimizer(model, sgd)
        return deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))[0], model

    def train(eng, bs):
        for b in bs:
            eng.backward(eng(**b).loss)
            eng.step()

    half = STEPS // 2 + 1  # the resumed engine's first step uses the saved projector (no refresh)
    first, _ = engine()
    train(first, batches[:half])
    first.save_checkpoint(CKPT, tag="half")
    dist.barrier()
    second, model = engine()
    second.load_checkpoint(CKPT, tag="half")
    train(second, batches[half:])
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # a no-op below ZeRO-3
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(mode, rank):
    model = tiny_llama()
    opt = optimizer(model, mode.endswith("-sgd"))
    split = []  # per call: the matrices stepped by the projection algebra on ZeRO's element ranges
    step_split = opt._step_split_matrices
    opt._step_split_matrices = lambda zp, state, pieces, *a: (
        split.append(len(pieces)),
        step_split(zp, state, pieces, *a),
    )[1]
    batches = make_lm_batches(STEPS, seed=rank)  # different data per rank
    if mode.startswith("ddp"):
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for b in batches:
            opt.zero_grad()
            ddp(**b).loss.backward()
            opt.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    import deepspeed

    if mode == "zero2resume":
        return run_resume(rank, batches)
    if mode == "zero3resume-sgd":
        return run_resume(rank, batches, stage=3, sgd=True)
    try:
        stage = int(mode[4])
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=opt,
            config=ds_config(
                stage,
                mode.endswith("offload"),
                mode.endswith("roundrobin"),
                mode.endswith("subgroups"),
            ),
        )
        if mode.endswith("offload"):  # the offload took effect: DeepSpeed's CPU partitions
            assert engine.zero_cpu_offload() and engine.optimizer.optimizer is opt
        for b in batches:
            loss = engine(**b).loss
            engine.backward(loss)
            engine.step()
    except (RuntimeError, NotImplementedError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if mode.startswith("zero3") and not split:  # ZeRO-3 splits every matrix over the ranks
        return {"error": "ZeRO-3 did not step its split matrices by the projection algebra"}
    if mode == "zero3subgroups" and len(split) <= STEPS:  # several partitions per step
        return {"error": f"sub_group_size did not split the group: {split}"}
    with deepspeed.zero.GatheredParameters(list(model.parameters())):  # a no-op below ZeRO-3
        return {n: p.detach().clone() for n, p in model.named_parameters()}


def main(prefix: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    global CKPT
    CKPT = f"{prefix}.ckpt"
    for mode in MODES:
        torch.save(run(mode, rank), f"{prefix}.{mode}.{rank}.pt")
        dist.barrier()
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
