"""``--method galore``: GaLore (Zhao et al., 2024, arXiv 2403.03507) from ``loralab-golore``.

Full-parameter training; the target layers' gradients are projected on the top-r singular subspace
(refreshed every ``--update_proj_gap`` steps) and Adam (or momentum SGD, ``optim="sgd"``) runs in that
subspace; other parameters use the plain optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import TARGET_MODULES, Method, MethodError, Option, option_flag

__all__ = ["GALORE_DEFAULTS", "GALORE_OPTIONS", "METHOD", "GaLore", "largest_rank"]

# GaLore has no config dataclass: its options are create_galore_optimizer's param-group keys
GALORE_OPTIONS: tuple[Option, ...] = (
    Option("galore_rank", int, "GaLore/GoLore: projection rank"),
    Option("update_proj_gap", int, "GaLore/GoLore: steps between projector updates (T)"),
    Option("galore_scale", float, "GaLore/GoLore: scale alpha applied to the projected update"),
    Option(
        "proj_type",
        str,
        "GaLore/GoLore: projection side",
        ("std", "reverse_std", "left", "right", "full"),
    ),
    TARGET_MODULES,
)

GALORE_DEFAULTS: dict[str, Any] = dict(
    galore_rank=128,
    update_proj_gap=200,
    galore_scale=0.25,
    proj_type="std",
    target_modules="all-linear",
)


def largest_rank(
    model: nn.Module, targets: Any, proj_type: str = "std"
) -> tuple[int, str, tuple[int, int]]:
    """The largest projection rank every target layer can take: ``(rank, narrowest layer, its (out, in))``.

    A projector of rank r spans r directions of the projected side of the (out, in) gradient
    (``proj_type`` decides the side as galore-torch: ``std`` = the smaller one), so r can be at most
    that side's width; galore-torch and ``ReLoRaLinear`` silently clip a larger r, which is then not
    the run that was asked for. Reads shapes only (works on a ``meta``-device model).

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> largest_rank(tiny_llama(), "all-linear")  # k_proj: 32 outputs (grouped-query attention)
        (32, 'model.layers.0.self_attn.k_proj', (32, 64))
    """
    from loralab.core.targets import find_targets
    from loralab.golore.projector import projector_side

    best: tuple[int, str, tuple[int, int]] | None = None
    for name, t in find_targets(model, targets).items():
        m, n = t.shape
        width = {"left": m, "right": n, "full": min(m, n)}[projector_side((m, n), proj_type)]
        if best is None or width < best[0]:
            best = (width, name, (m, n))
    assert best is not None  # find_targets raises when nothing matches
    return best


def check_rank(
    model: nn.Module, rank: int, targets: Any, proj_type: str = "std", flag: str = "--galore_rank"
) -> None:
    """Raise :class:`MethodError` naming ``flag``, the narrowest layer and the largest valid rank."""
    limit, name, (m, n) = largest_rank(model, targets, proj_type)
    if rank > limit:
        side = "" if proj_type == "std" else f" with proj_type {proj_type}"
        raise MethodError(
            f"{flag} {rank} is larger than layer {name} ({m} x {n}; its projected side{side} is "
            f"{limit} wide) can take: the largest valid rank for this model is {limit}"
        )


class GaLore(Method):
    name = "galore"
    module = "loralab.golore"
    pip_name = "loralab-golore"
    extra = "golore"
    requires = ("create_galore_optimizer",)
    description = "GaLore: full training, Adam in a gradient SVD subspace"
    # projects each weight's gradient matrix: under DeepSpeed ZeRO-1/2/3 the optimizer finds each matrix
    # in the flat partitions and updates it whole on one owner rank, its low-rank state on that rank
    # only (loralab.core.zero_views); FSDP2's row shards are projected with the row-shard algebra
    # (GaLoreAdamW / GaLoreSGD, loralab.golore.projector). DeepSpeed's bf16 (bfloat16 weights over
    # float32 master partitions, its BF16_Optimizer at ZeRO-1 with float32 gradient accumulation)
    # steps the float32 masters exactly as one process does (runners_bf16_worker.py)
    sharded_engines: ClassVar[frozenset[str]] = frozenset({"deepspeed_zero", "fsdp2"})
    # adamw8bit: bitsandbytes' block-wise 8-bit low-rank moments (galore-torch's GaLoreAdamW8bit; the
    # C4 runner's --optimizer galore_adamw8bit / golore_adamw8bit)
    optimizers = ("adamw", "adamw8bit", "sgd")
    options = GALORE_OPTIONS
    # full weights train: nothing to merge, and a bitsandbytes weight gets no gradient
    has_adapter = False
    quantized_base = False
    defaults: ClassVar[dict[str, Any]] = dict(GALORE_DEFAULTS)

    def check_model(self, model: nn.Module, args: Any) -> None:
        self.import_package()
        check_rank(
            model,
            args.galore_rank,
            args.target_modules,
            args.proj_type,
            flag=option_flag(args, "galore_rank"),
        )

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        self.import_package()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def subspace_kwargs(self, args: Any) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            rank=args.galore_rank,
            update_proj_gap=args.update_proj_gap,
            scale=args.galore_scale,
            proj_type=args.proj_type,
            weight_decay=args.weight_decay,
            targets=args.target_modules,
            optimizer=args.optim,
            seed=args.seed,
        )
        if args.optim == "sgd":
            kw["momentum"] = args.momentum
        else:
            kw.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
        return kw

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        pkg = self.package()
        return pkg.create_galore_optimizer(model, args.learning_rate, **self.subspace_kwargs(args))


METHOD = GaLore()
