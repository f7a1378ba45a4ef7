"""``--method galore``: GaLore (Zhao et al., 2024, arXiv 2403.03507) from ``loralab-golore``.

Full-parameter training; the target layers' gradients are projected on the top-r singular subspace
(refreshed every ``--update_proj_gap`` steps) and Adam runs in that subspace; other parameters use
plain AdamW.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import Method

__all__ = ["GALORE_DEFAULTS", "METHOD", "GaLore"]

GALORE_DEFAULTS: dict[str, Any] = dict(
    galore_rank=128,
    update_proj_gap=200,
    galore_scale=0.25,
    proj_type="std",
    target_modules="all-linear",
)


class GaLore(Method):
    name = "galore"
    module = "loralab.golore"
    pip_name = "loralab-golore"
    requires = ("create_galore_optimizer",)
    description = "GaLore: full training, Adam in a gradient SVD subspace"
    zero_partitioning = False  # projects each weight's gradient matrix; ZeRO flattens them
    defaults: ClassVar[dict[str, Any]] = dict(GALORE_DEFAULTS)

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        self.import_package()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def subspace_kwargs(self, args: Any) -> dict[str, Any]:
        return dict(
            rank=args.galore_rank,
            update_proj_gap=args.update_proj_gap,
            scale=args.galore_scale,
            proj_type=args.proj_type,
            weight_decay=args.weight_decay,
            targets=args.target_modules,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
        )

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        pkg = self.package()
        return pkg.create_galore_optimizer(model, args.learning_rate, **self.subspace_kwargs(args))


METHOD = GaLore()
