"""Run by test_golore_fsdp.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

Each rank trains the toy model (float64; weights of 13×6 (right projection, rows split 7 + 6), 5×13
and 3×5 (left projection, 3 + 2 and 2 + 1 rows)) sharded with FSDP2 (``fully_shard`` on each layer and
the root) on its own half of every batch, with each optimizer of :data:`CONFIGS`, and writes per
configuration the whole parameters after the steps, the shapes of its optimizer state (for a left
projection: its column block of the (r, n) moments, 7 + 6 and 3 + 2 columns) and, per step,
the shapes of the whole matrices gathered (``DTensor.full_tensor``) and how many earlier gathered
matrices were still alive at each gather. ``resume``: GaLore AdamW stopped after 2 steps, its
``state_dict`` saved and loaded into a fresh sharded model and optimizer, then 2 more steps.
"""

import io
import sys
import weakref

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from loralab.core.distributed import end_process_group
from loralab.core.sharding import local_tensor
from loralab.golore import (
    GaLoreAdafactor,
    GaLoreAdamW,
    GaLoreAdamW8bit,
    GaLoreSGD,
    GoLoreAdafactor,
    GoLoreAdamW,
    GoLoreSGD,
)

STEPS, MICRO, IN, OUT = 4, 4, 6, 3
# refreshes at steps 0 and 2 (update_proj_gap 2); GoLore: SVD at 0, random at 2
CONFIGS = {
    "galore_adamw": (GaLoreAdamW, dict(lr=1e-2, weight_decay=0.1, scale=0.5, eps=1e-4)),
    "golore_adamw": (GoLoreAdamW, dict(lr=1e-2, rand_step=2, second_moment="project", eps=1e-4)),
    "galore_adamw_torch_full": (
        GaLoreAdamW,
        dict(lr=1e-2, weight_decay=0.1, adamw_style="torch", proj_type="full", eps=1e-4),
    ),
    "galore_sgd": (GaLoreSGD, dict(lr=5e-2, momentum=0.9, weight_decay=0.1)),
    "golore_sgd_reverse": (
        GoLoreSGD,
        dict(lr=5e-2, momentum=0.9, nesterov=True, proj_type="reverse_std", rand_step=2),
    ),
    # the forms that step each sharded parameter whole on an owner rank (_step_fsdp_owners)
    # min_8bit_size 16: the toy's (2, 13) / (13, 2) moments are quantized 8-bit (the default keeps
    # tensors under 4096 elements in 32 bits)
    "galore_adamw8bit": (
        GaLoreAdamW8bit,
        dict(lr=1e-2, weight_decay=0.1, scale=0.5, eps=1e-4, min_8bit_size=16),
    ),
    "golore_adafactor": (
        GoLoreAdafactor,
        dict(lr=1e-2, rand_step=2, beta1=0.9, relative_step=False, scale_parameter=True),
    ),
    "galore_adafactor": (GaLoreAdafactor, dict(lr=None, relative_step=True, weight_decay=0.1)),
}
SUBSPACE = dict(rank=2, update_proj_gap=2)
# layer-wise stepping under FSDP2: the row-shard algebra (AdamW, SGD) and an owner-rank form (8-bit)
LAYERWISE = ("galore_adamw", "golore_sgd_reverse", "galore_adamw8bit")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(IN, 13)
        self.lin2 = nn.Linear(13, 5)
        self.head = nn.Linear(5, OUT)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        y = self.head(torch.tanh(self.lin2(torch.tanh(self.lin1(x)))))
        return ((y - labels) ** 2).mean()


def toy() -> Toy:
    torch.manual_seed(0)
    return Toy().double()


def batches(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "x": torch.randn(MICRO, IN, generator=g, dtype=torch.float64),
            "labels": torch.randn(MICRO, OUT, generator=g, dtype=torch.float64),
        }
        for _ in range(STEPS)
    ]


def groups(model: nn.Module, name: str) -> tuple[type, list[dict]]:
    cls, kw = CONFIGS[name]
    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    return cls, [dict(params=mats, **SUBSPACE, **kw), dict(params=rest, **kw)]


def sharded(model: nn.Module) -> nn.Module:
    for layer in (model.lin1, model.lin2, model.head):
        fully_shard(layer)
    fully_shard(model)
    return model


class GatherLog:
    """Records every ``DTensor.full_tensor`` (a whole matrix built on this rank) while active."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []
        self.max_alive = 0
        self._refs: list[weakref.ref] = []
        self._orig = DTensor.full_tensor

    def __enter__(self) -> "GatherLog":
        log = self

        def full_tensor(t, *a, **k):
            # how many whole matrices gathered earlier in this step are still held somewhere
            log.max_alive = max(log.max_alive, sum(r() is not None for r in log._refs))
            out = log._orig(t, *a, **k)
            log.shapes.append(tuple(out.shape))
            log._refs.append(weakref.ref(out))
            return out

        DTensor.full_tensor = full_tensor
        return self

    def __exit__(self, *exc) -> None:
        DTensor.full_tensor = self._orig


def train(name: str, rank: int) -> dict:
    model = sharded(toy())
    cls, param_groups = groups(model, name)
    opt = cls(param_groups)
    gathers, alive = [], []
    for b in batches(10 + rank):
        opt.zero_grad()
        model(**b).backward()
        with GatherLog() as log:
            opt.step()
        gathers.append(log.shapes)
        alive.append(log.max_alive)
    out = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    state = {
        f"{n}.{k}": torch.tensor(v.shape)
        for n, p in model.named_parameters()
        for k, v in opt.state[p].items()
        if k != "step"
    }
    return {"params": out, "state": state, "gathers": gathers, "alive": alive}


def resume(rank: int) -> dict:
    data = batches(10 + rank)
    model = sharded(toy())
    cls, param_groups = groups(model, "galore_adamw")
    opt = cls(param_groups)
    for k, b in enumerate(data):
        if k == 2:  # interrupt: a fresh model and optimizer from the saved states
            buf = io.BytesIO()
            torch.save(opt.state_dict(), buf)
            fresh = sharded(toy())
            with torch.no_grad():
                for p_new, p_old in zip(fresh.parameters(), model.parameters()):
                    local_tensor(p_new).copy_(local_tensor(p_old))
            model = fresh
            cls, param_groups = groups(model, "galore_adamw")
            opt = cls(param_groups)
            buf.seek(0)
            opt.load_state_dict(torch.load(buf, weights_only=True))
        opt.zero_grad()
        model(**b).backward()
        opt.step()
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def layerwise(name: str, rank: int) -> dict:
    """``register_layerwise_step``: each parameter steps its row shard in FSDP2's post-reduce-scatter
    hook (no optimizer.step())."""
    from loralab.golore.layerwise import register_layerwise_step

    model = sharded(toy())
    cls, param_groups = groups(model, name)
    opt = cls(param_groups)
    handle = register_layerwise_step(opt)
    left = []
    for b in batches(10 + rank):
        model(**b).backward()
        left.append(sum(p.grad is not None for p in model.parameters()))
    handle.remove()
    return {
        "params": {n: p.full_tensor().clone() for n, p in model.named_parameters()},
        "grads_left": left,
    }


def nan_step(name: str, rank: int) -> str:
    """One step with a NaN in rank 0's shard of ``lin1.weight``'s gradient: the error each rank
    raised (every rank must raise; an owner-rank form once raised on the owner alone, leaving the
    other rank waiting in the broadcast)."""
    model = sharded(toy())
    cls, param_groups = groups(model, name)
    opt = cls(param_groups)
    model(**batches(10 + rank)[0]).backward()
    if rank == 0:
        local_tensor(model.lin1.weight.grad)[0, 0] = float("nan")
    try:
        opt.step()
    except FloatingPointError as e:
        return str(e)
    return ""


def main(prefix: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {name: train(name, rank) for name in CONFIGS}
    out["layerwise"] = {name: layerwise(name, rank) for name in LAYERWISE}
    try:  # DDP-style use (a parameter not sharded by FSDP2) is refused
        from loralab.golore.layerwise import register_layerwise_step

        register_layerwise_step(GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3, 2))]}]))
        out["layerwise_refusal"] = ""
    except RuntimeError as e:
        out["layerwise_refusal"] = str(e)
    out["resume"] = resume(rank)
    out["nan"] = {name: nan_step(name, rank) for name in ("galore_adamw", "galore_adafactor")}
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
