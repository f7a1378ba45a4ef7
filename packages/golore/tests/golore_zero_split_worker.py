"""Run by test_golore_zero_split.py under ``torchrun --nproc-per-node 4`` (gloo, CPU, float64).

The AdamW forms' projection algebra on ZeRO element ranges (``_step_split_matrices``) against the
plain one-process step, on hand-made ZeRO-1/2 partitions (``as_zero12_partition``) whose split
points fall where the test wants them: inside rows of left and right projections, a matrix over
three ranks, a rank holding less than one row, ranks holding none of a matrix. Each rank trains on
its own batches; the one-process reference steps the gradient averaged over every rank's batches.

Writes ``{prefix}.{rank}.pt``: per case, the largest difference to the reference, the pieces that
stepped split, and the collectives of the steps without a projector refresh (kind, elements).
"""

import sys

import torch
import torch.distributed as dist

from loralab.core.distributed import end_process_group
from loralab.core.testing import as_zero12_partition
from loralab.golore import GaLoreAdafactor, GaLoreAdamW, GaLoreSGD, GoLoreAdamW, GoLoreSGD

STEPS, GAP = 5, 2
# (out, in): std projects right when out >= in, left otherwise
SHAPES = {
    "a": (10, 6),
    "b": (7, 10),
    "c": (7, 7),
    "d": (2, 150),
    "e": (40, 8),
    "u": (10,),
    "v": (7,),
}
LAYOUTS = {
    # order of the flat buffer and padding (the padded size must split over 4 ranks); the matrices
    # split inside a row (ranks holding them):
    "d3e2": ("abuvcde", 4),  # d over 3 ranks, the first holding 9 elements (< 1 row); e
    "b2d2e2": ("acdbeuv", 8),  # b (left) after 4 rows and 3 elements
    "c2e2d2": ("ubvecad", 0),  # c: one rank holds one element of it
    "a2d2e2": ("ucdabve", 4),
}
CASES = {
    "galore-hf": (GaLoreAdamW, {"weight_decay": 0.1, "second_moment": "project"}),
    "galore-torch-reverse": (
        GaLoreAdamW,
        {"weight_decay": 0.1, "adamw_style": "torch", "proj_type": "reverse_std"},
    ),
    "golore": (GoLoreAdamW, {"weight_decay": 0.1, "rand_ratio": 0.4, "total_steps": STEPS}),
    "galore-no-reproject": (GaLoreAdamW, {"reproject_moments": False, "correct_bias": False}),
    # two-sided: (r, r) partial products all-reduced; P by rows, Q whole
    "galore-full": (
        GaLoreAdamW,
        {"weight_decay": 0.1, "proj_type": "full", "second_moment": "project"},
    ),
    "golore-sgd-full": (
        GoLoreSGD,
        {"lr": 0.5, "momentum": 0.9, "proj_type": "full", "rand_ratio": 0.4, "total_steps": STEPS},
    ),
    # SGD: the weight decay is coupled (added to each rank's gradient elements before projecting)
    "galore-sgd-nesterov": (
        GaLoreSGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    ),
    "golore-sgd": (
        GoLoreSGD,
        {
            "lr": 0.2,
            "momentum": 0.8,
            "dampening": 0.1,
            "weight_decay": 0.05,
            "rand_ratio": 0.4,
            "total_steps": STEPS,
        },
    ),
}


def params(order):
    gen = torch.Generator().manual_seed(0)
    made = {
        k: torch.nn.Parameter(torch.randn(SHAPES[k], generator=gen, dtype=torch.float64) * 0.5)
        for k in sorted(SHAPES)
    }
    return [made[k] for k in order]


def loss_of(ps, order, rank, step):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    total = 0
    for p in ps:
        if p.dim() == 2:
            x = torch.randn(5, p.shape[1], generator=gen, dtype=torch.float64)
            y = torch.randn(5, p.shape[0], generator=gen, dtype=torch.float64)
            total = total + ((x @ p.T).tanh() - y).pow(2).mean()
        else:
            total = (
                total + (p.sin() * torch.randn(p.shape, generator=gen, dtype=torch.float64)).sum()
            )
    return total


def optimizer(cls, kwargs, ps):
    settings = {"lr": 1e-2, **({"eps": 1e-8} if "AdamW" in cls.__name__ else {}), **kwargs}
    return cls([{"params": ps, "rank": 3, "update_proj_gap": GAP}], **settings)


def reference(cls, kwargs, order, world):
    ps = params(order)
    opt = optimizer(cls, kwargs, ps)
    for step in range(STEPS):
        grads = [torch.zeros_like(p) for p in ps]
        for r in range(world):
            for g, p in zip(grads, torch.autograd.grad(loss_of(ps, order, r, step), ps)):
                g += p / world
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
    return ps


class Collectives:
    """Counts the collectives (and their elements) while ``on``."""

    def __init__(self):
        self.on, self.seen = False, []
        for name in (
            "all_reduce",
            "broadcast",
            "gather",
            "scatter",
            "reduce_scatter_tensor",
            "all_gather_into_tensor",
        ):
            original = getattr(dist, name)

            def counted(*a, _name=name, _original=original, **k):
                if self.on:
                    self.seen.append((_name, a[0].numel() if a[0] is not None else 0))
                return _original(*a, **k)

            setattr(dist, name, counted)


def run_case(cls, kwargs, order, pad, rank, world, counter):
    ps = params(order)
    opt = optimizer(cls, kwargs, ps)
    hand_gradient, copy_back = as_zero12_partition(opt, ps, pad=pad)
    split = []
    original = opt._step_split_matrices

    def recording(zp, state, pieces, *a):
        split.append(sorted(order[pc.index] for pc in pieces))
        return original(zp, state, pieces, *a)

    opt._step_split_matrices = recording
    collectives = []
    for step in range(STEPS):
        loss_of(ps, order, rank, step).backward()
        hand_gradient()
        counter.on, counter.seen = step % GAP != 0, []
        opt.step()
        counter.on = False
        if step % GAP:
            collectives.append(list(counter.seen))
        copy_back()
    ref = reference(cls, kwargs, order, world)
    diff = max(float((p - q).abs().max()) for p, q in zip(ps, ref))
    moved = min(float((p - q).abs().max()) for p, q in zip(ps, params(order)) if p.dim() == 2)
    return {
        "diff": diff,
        "moved": moved,
        "split": split[0] if split else [],
        "collectives": collectives,
    }


NAN_CASES = {
    # (layout, optimizer, matrix whose gradient gets a NaN): the projector's SVD fails on the
    # matrix's owner rank; every rank must raise instead of waiting in the next collective
    "split-adamw": ("b2d2e2", GaLoreAdamW, {}, "d"),  # split: the element-range algebra
    "owner-adamw": ("b2d2e2", GaLoreAdamW, {}, "a"),  # rank 0 holds it whole
    "owner-adafactor": (
        "b2d2e2",
        GaLoreAdafactor,
        {"relative_step": False, "scale_parameter": False},
        "d",
    ),  # split, stepped whole on an owner
}


def run_nan(layout, cls, kwargs, bad, rank):
    order, pad = LAYOUTS[layout]
    ps = params(order)
    opt = cls([{"params": ps, "rank": 3, "update_proj_gap": GAP}], lr=1e-2, **kwargs)
    hand_gradient, _copy_back = as_zero12_partition(opt, ps, pad=pad)
    loss_of(ps, order, rank, 0).backward()
    if rank == 0:
        ps[order.index(bad)].grad[0, 0] = float("nan")
    hand_gradient()
    try:
        opt.step()
    except FloatingPointError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None, "message": ""}


def main(prefix):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = Collectives()
    out = {}
    for layout, (order, pad) in LAYOUTS.items():
        for case, (cls, kwargs) in CASES.items():
            out[f"{layout}/{case}"] = run_case(cls, kwargs, order, pad, rank, world, counter)
    for case, (layout, cls, kwargs, bad) in NAN_CASES.items():
        out[f"nan/{case}"] = run_nan(layout, cls, kwargs, bad, rank)
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
