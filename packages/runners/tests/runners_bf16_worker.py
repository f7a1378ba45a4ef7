"""Run by test_runners_bf16_sharded.py under ``torchrun --nproc-per-node 2`` (gloo, CPU); the test
also imports it for the one-process reference (:func:`reference`).

One launch trains every method of :data:`METHODS` for :data:`STEPS` steps on a toy model (weights
13×6, 13×13, 13×13 and 3×13: every row split unevenly over the 2 ranks), each rank on its own micro-batch, in
bfloat16 with float32 master weights, under four engines in turn (the two 13×13 layers share
LoRA-Pro's batched buckets):

- ``fsdp2``: ``fully_shard`` on each layer and the root with
  ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``: float32 parameter shards
  (what the optimizer steps), all-gathered as bfloat16 for forward and backward, bfloat16 gradients
  cast to float32 and averaged;
- ``zero3``: DeepSpeed ZeRO-3 with ``bf16.enabled`` and ``communication_data_type: fp32``: bfloat16
  parameters partitioned, float32 master partitions (what the optimizer steps) made from them,
  bfloat16 gradients cast to float32 and averaged, the mean kept in bfloat16 (DeepSpeed's gradient
  accumulation dtype) and handed to the optimizer in float32, masters copied back to the bfloat16
  parameters after each step;
- ``zero1`` / ``zero2``: DeepSpeed ZeRO-1 / ZeRO-2 with the same ``bf16`` settings: the same
  arithmetic over flat float32 master partitions (each rank's contiguous slice of every parameter
  group, the whole bfloat16 parameters on every rank);
- ``zero1-fp32acc``: ZeRO-1 with ``data_types.grad_accum_dtype: fp32``, for which DeepSpeed wraps
  the optimizer in its ``BF16_Optimizer`` (other flat partitions) and keeps the averaged gradient
  in float32.

:func:`reference` runs this arithmetic in one process: float32 master weights, a bfloat16 copy of
them for forward and backward of each rank's micro-batch, the bfloat16 gradients cast to float32 and
averaged, the optimizer step on the float32 masters; for ZeRO from the bfloat16-rounded start,
with the mean rounded to bfloat16 and the frozen weights rounded to bfloat16 after each step (LoRA-Pro
full mode decays them), as DeepSpeed does.

Each rank writes ``{prefix}.{rank}.pt``: per engine and method the whole float32 master weights of the
trainable parameters, and, for the methods that update whole weight matrices (GaLore, GoLore,
LoRA-Pro full mode), the most weight matrices whole on this rank at once during ``optimizer.step``
(:class:`WholeLog`).
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import peft
import torch
import torch.distributed as dist
from torch import Tensor, nn

from loralab.core.distributed import end_process_group
from loralab.core.sharding import is_dtensor

IN, HID, OUT, RANK, ALPHA = 6, 13, 3, 2, 4
STEPS, MICRO, WORLD, LR, WD = 3, 4, 2, 1e-2, 0.1
# Adam's first steps are ~lr·sign(g): a larger eps keeps near-zero gradient entries (whose sign the
# bfloat16 rounding decides) from turning last-bit differences into whole-lr ones
EPS = 1e-4
METHODS = (
    "full",
    "lora",
    "lora_fa",
    "lora_pro_efficient",
    "lora_pro_full",
    "galore",
    "golore",
)
# the methods that hold whole weight matrices during the step (counted by WholeLog)
WHOLE_MATRIX_METHODS = ("lora_pro_full", "galore", "golore")
WEIGHT_SHAPES = {(HID, IN), (HID, HID), (OUT, HID)}
ENGINES = ("fsdp2", "zero1", "zero1-fp32acc", "zero2", "zero3")


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(IN, HID)
        self.lin2 = nn.Linear(HID, HID)
        self.lin3 = nn.Linear(HID, HID)
        self.head = nn.Linear(HID, OUT)

    def forward(self, x: Tensor, labels: Tensor) -> Tensor:
        h = torch.tanh(self.lin2(torch.tanh(self.lin1(x))))
        y = self.head(torch.tanh(self.lin3(h)))
        return ((y - labels) ** 2).mean()


def build(method: str) -> nn.Module:
    """The seeded float32 model of ``method`` (a PEFT LoRA model with random B for the LoRA methods)."""
    torch.manual_seed(0)
    model: nn.Module = Toy()
    if method in ("full", "galore", "golore"):
        return model
    config = peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["lin1", "lin2", "lin3"], modules_to_save=["head"]
    )
    model = peft.get_peft_model(model, config)
    # B = 0 at init makes LoRA-Pro's first step degenerate (BᵀB singular): start at a generic point
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def optimizer(method: str, model: nn.Module) -> torch.optim.Optimizer:
    if method in ("full", "lora"):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=LR, weight_decay=WD, eps=EPS)
    if method == "lora_fa":
        from loralab.lora_fa import create_lorafa_optimizer

        return create_lorafa_optimizer(model, RANK, ALPHA, LR, weight_decay=WD, eps=EPS)
    if method.startswith("lora_pro"):
        from loralab.lora_pro import LoraProAdamW

        mode = method.removeprefix("lora_pro_")
        return LoraProAdamW(model, lr=LR, weight_decay=WD, eps=EPS, mode=mode)
    from loralab.golore import GaLoreAdamW, GoLoreAdamW

    mats = [p for p in model.parameters() if p.dim() == 2]
    rest = [p for p in model.parameters() if p.dim() != 2]
    # refreshes at steps 0 and 2; GoLore's second one is a random projector
    sub = dict(rank=2, update_proj_gap=2)
    if method == "golore":
        return GoLoreAdamW(
            [dict(params=mats, rand_step=2, **sub), dict(params=rest)],
            lr=LR,
            weight_decay=WD,
            eps=EPS,
        )
    return GaLoreAdamW(
        [dict(params=mats, **sub), dict(params=rest)], lr=LR, weight_decay=WD, eps=EPS
    )


def batches(rank: int) -> list[dict[str, Tensor]]:
    """Rank ``rank``'s bfloat16 micro-batches (the engines and the reference read the same)."""
    g = torch.Generator().manual_seed(10 + rank)
    return [
        {
            "x": torch.randn(MICRO, IN, generator=g).bfloat16(),
            "labels": torch.randn(MICRO, OUT, generator=g).bfloat16(),
        }
        for _ in range(STEPS)
    ]


def trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def start(method: str, engine: str) -> nn.Module:
    """The float32 model ``engine`` starts from: :func:`build`'s for FSDP2 (its float32 parameters
    are the masters); for ZeRO its values rounded to bfloat16, since DeepSpeed casts the model to
    bfloat16 first and makes the float32 masters from the bfloat16 parameters."""
    model = build(method)
    if engine != "fsdp2":
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.bfloat16())
    return model


def reference(method: str, engine: str) -> dict[str, Tensor]:
    """One process, the arithmetic of both engines (see the module docstring) from ``engine``'s
    starting point (:func:`start`): the float32 masters of the trainable parameters after
    :data:`STEPS` steps on the micro-batches of all :data:`WORLD` ranks."""
    master = start(method, engine)
    compute = build(method).bfloat16()
    opt = optimizer(method, master)
    data = [batches(r) for r in range(WORLD)]
    pairs = list(zip(master.parameters(), compute.parameters()))
    for pm, pc in pairs:  # the optimizer may freeze some (LoRA-FA's A)
        pc.requires_grad_(pm.requires_grad)
    for step in range(STEPS):
        with torch.no_grad():
            for pm, pc in pairs:
                pc.copy_(pm)
        sums: dict[int, Tensor] = {}
        for r in range(WORLD):
            compute.zero_grad(set_to_none=True)
            compute(**data[r][step]).backward()
            for k, (_, pc) in enumerate(pairs):
                if pc.grad is not None:
                    g = pc.grad.float()
                    sums[k] = g if k not in sums else sums[k] + g
        for k, (pm, _) in enumerate(pairs):
            pm.grad = sums[k] / WORLD if k in sums else None
            if engine in ("zero1", "zero2", "zero3") and pm.grad is not None:
                # DeepSpeed keeps the averaged gradient in its accumulation dtype (bfloat16; float32
                # under zero1-fp32acc)
                pm.grad = pm.grad.bfloat16().float()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if engine != "fsdp2":
            # DeepSpeed keeps frozen parameters in bfloat16 only (no float32 master): LoRA-Pro full
            # mode's weight decay of the base weight (weight_decay_mode="effective") multiplies them
            # in bfloat16, rounding at every step (a no-op for every other method: they stay put)
            with torch.no_grad():
                for pm in master.parameters():
                    if not pm.requires_grad:
                        pm.copy_(pm.bfloat16())
    return {n: p.detach().clone() for n, p in master.named_parameters() if p.requires_grad}


class WholeLog:
    """Counts the weight matrices held whole on this rank while active.

    Wraps the calls that make a whole weight-sized (``WEIGHT_SHAPES``, last two dims) tensor on a rank
    during a step: the gathers (``DTensor.full_tensor`` under FSDP2, ``ZeroPartition.gather_to`` /
    ``gather_elements_to`` and ``wholes`` under ZeRO) and LoRA-Pro full mode's m×n maths (``optimal_equivalent_gradient``, the
    Adam direction). Each result is tagged with the matrix it belongs to (the parameter it was
    gathered for; a tensor computed from a tracked one keeps its tag), tracked by a weak reference,
    and at each call ``max_matrices`` records how many distinct matrices still have a live whole
    tensor (the new one included) and ``max_tensors`` how many such tensors are alive.
    """

    def __init__(self) -> None:
        self.max_matrices = 0
        self.max_tensors = 0
        self._live: list[tuple[weakref.ref, Any, int]] = []
        self._stack = ExitStack()
        self._fresh = 0

    def _alive(self) -> list[tuple[Tensor, Any]]:
        out = []
        for ref, tag, _ in self._live:
            t = ref()
            if t is not None:
                out.append((t, tag))
        return out

    def _tag_from_inputs(self, args: tuple, kwargs: dict) -> Any:
        ptrs = {ptr: tag for _, tag, ptr in self._live}
        flat: list[Any] = [*args, *kwargs.values()]
        for a in flat:
            for t in a if isinstance(a, (list, tuple)) else [a]:
                if isinstance(t, Tensor) and not is_dtensor(t):
                    if t.untyped_storage().data_ptr() in ptrs:
                        return ptrs[t.untyped_storage().data_ptr()]
        return None

    def _wrap(self, owner: Any, name: str, tag_of: Callable[..., Any] | None = None) -> None:
        orig = getattr(owner, name)
        log = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            tag = log._tag_from_inputs(args, kwargs)
            if tag is None:
                tag = tag_of(*args, **kwargs) if tag_of is not None else None
            if tag is None:
                log._fresh += 1
                tag = ("fresh", log._fresh)
            out = orig(*args, **kwargs)
            results = out.values() if isinstance(out, dict) else out
            new = [
                t
                for t in (results if isinstance(results, (list, tuple)) else [results])
                if isinstance(t, Tensor) and t.dim() >= 2 and tuple(t.shape[-2:]) in WEIGHT_SHAPES
            ]
            for t in new:
                log._live.append((weakref.ref(t), tag, t.untyped_storage().data_ptr()))
            alive = log._alive()
            if alive:
                # a batch of matrices (LoRA-Pro's buckets of equal shapes) counts as that many
                per_tag: dict[Any, int] = {}
                for t, tg in alive:
                    per_tag[tg] = max(per_tag.get(tg, 0), math.prod(t.shape[:-2]))
                log.max_tensors = max(log.max_tensors, len(alive))
                log.max_matrices = max(log.max_matrices, sum(per_tag.values()))
            del alive, new
            return out

        setattr(owner, name, wrapped)
        self._stack.callback(setattr, owner, name, orig)

    def __enter__(self) -> WholeLog:
        from torch.distributed.tensor import DTensor

        from loralab.core.zero_views import ZeroPartition

        self._wrap(DTensor, "full_tensor")
        # gather_to goes through gather_elements_to: one wrapper sees both
        self._wrap(ZeroPartition, "gather_elements_to", lambda zp, elements, p, owner: id(p))
        self._wrap(ZeroPartition, "wholes")
        # LoRA-Pro full mode's m×n tensors: built in full_mode (FSDP2, one process) and zero_steps (ZeRO)
        import loralab.lora_pro.full_mode as lp_full
        import loralab.lora_pro.zero_steps as lp_zero

        for module in (lp_full, lp_zero):
            self._wrap(module, "optimal_equivalent_gradient")
            self._wrap(module, "adamw_direction")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def run_fsdp2(method: str, rank: int) -> dict[str, Any]:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = build(method)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    inner = model.base_model.model if isinstance(model, peft.PeftModel) else model
    for name in ("lin1", "lin2", "lin3", "head"):
        fully_shard(getattr(inner, name), mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    opt = optimizer(method, model)
    names = trainable(model)  # after the optimizer, which may freeze some (LoRA-FA's A)
    matrices = tensors = 0
    for b in batches(rank):
        opt.zero_grad()
        model(**b).backward()
        with WholeLog() as log:
            opt.step()
        matrices, tensors = max(matrices, log.max_matrices), max(tensors, log.max_tensors)
    params = dict(model.named_parameters())
    out = {n: params[n].full_tensor().detach().clone() for n in names}
    return {"params": out, "max_matrices": matrices, "max_tensors": tensors}


def ds_config(stage: int, accumulate_fp32: bool = False) -> dict[str, Any]:
    extra = {"data_types": {"grad_accum_dtype": "fp32"}} if accumulate_fp32 else {}
    return {
        **extra,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": True},
        "communication_data_type": "fp32",
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,
        "steps_per_print": 10**9,
    }


def run_zero(stage: int, method: str, rank: int, accumulate_fp32: bool = False) -> dict[str, Any]:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    model = build(method)
    opt = optimizer(method, model)
    names = trainable(model)  # after the optimizer, which may freeze some (LoRA-FA's A)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=opt, config=ds_config(stage, accumulate_fp32)
    )
    matrices = tensors = 0
    for b in batches(rank):
        loss = engine(**b)
        engine.backward(loss)
        with WholeLog() as log:
            engine.step()
        matrices, tensors = max(matrices, log.max_matrices), max(tensors, log.max_tensors)
    params = dict(model.named_parameters())
    out = {n: safe_get_full_fp32_param(params[n]).detach().clone() for n in names}
    wrapper = type(engine.optimizer).__name__  # the optimizer DeepSpeed wrapped around ours
    engine.destroy()
    return {"params": out, "max_matrices": matrices, "max_tensors": tensors, "wrapper": wrapper}


def main(prefix: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    out: dict[str, dict[str, Any]] = {}
    runs: dict[str, Callable[[str, int], dict[str, Any]]] = {
        "fsdp2": run_fsdp2,
        "zero1": lambda method, rank: run_zero(1, method, rank),
        "zero1-fp32acc": lambda method, rank: run_zero(1, method, rank, True),
        "zero2": lambda method, rank: run_zero(2, method, rank),
        "zero3": lambda method, rank: run_zero(3, method, rank),
    }
    for engine in ENGINES:
        for method in METHODS:
            try:
                out[f"{engine}/{method}"] = runs[engine](method, rank)
            except Exception as e:  # reported by the test, naming the engine and method
                out[f"{engine}/{method}"] = {"error": f"{type(e).__name__}: {e}"}
            dist.barrier()
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
