"""``--method golore``: GoLore (He et al., 2024, arXiv 2410.11289) from ``loralab-golore``.

GaLore whose projectors become random (Stiefel) once ``step / max_steps >= --rand_ratio`` (the GoLore
code's convention: ``0`` = random from the start, ``0.8`` = SVD for the first 80 % of the steps, as in
their C4 runs, ``1`` = GaLore). Random projectors make the projected gradient unbiased, which fixes
GaLore's non-convergence under noisy gradients.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import Option
from loralab.runners.methods.galore import GALORE_DEFAULTS, GALORE_OPTIONS, GaLore

__all__ = ["METHOD", "GoLore"]


class GoLore(GaLore):
    name = "golore"
    requires = ("create_golore_optimizer",)
    description = "GoLore: GaLore with random projectors after a fraction rand_ratio of the steps"
    options = (
        *GALORE_OPTIONS,
        Option(
            "rand_ratio",
            float,
            "GoLore: fraction of training that uses SVD projectors before switching to random ones "
            "(GoLore code's convention: random when step/total_steps >= rand_ratio; 0 = random from the start)",
        ),
    )
    defaults: ClassVar[dict[str, Any]] = {**GALORE_DEFAULTS, "rand_ratio": 0.0}

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        pkg = self.package()
        return pkg.create_golore_optimizer(
            model,
            args.learning_rate,
            rand_ratio=args.rand_ratio,
            total_steps=args.max_steps,
            **self.subspace_kwargs(args),
        )


METHOD = GoLore()
