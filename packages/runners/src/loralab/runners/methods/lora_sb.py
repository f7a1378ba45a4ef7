"""``--method lora-sb``: LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557) from ``loralab-lora-sb``.

``W = W0 + s·B·R·A`` with only the r×r ``R`` trainable; A, B, R come from the truncated SVD of the
first-step update approximated on ``--sb_num_batches`` training batches (``-lr·sign(G)``, Adam's
first step, with ``lr`` the first optimizer step's learning rate). ``lora_alpha`` defaults to ``r``
(s = 1) as in the reference scripts. Then AdamW on R (and any classifier head).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from loralab.runners.methods.base import LORA_DEFAULTS, Method, lora_kwargs, warmup_steps

__all__ = ["METHOD", "LoraSB", "first_step_lr"]


def first_step_lr(args: Any) -> float:
    """Learning rate of the first optimizer step: with a warm-up of w steps HF's schedulers give
    ``lr/w`` at step 1 (the paper's "first warm-up lr"), otherwise ``lr``."""
    w = warmup_steps(args)
    return args.learning_rate / w if w > 0 else args.learning_rate


class LoraSB(Method):
    name = "lora-sb"
    module = "loralab.lora_sb"
    pip_name = "loralab-lora-sb"
    requires = ("LoraSBConfig", "get_lora_sb_model")
    description = "LoRA-SB: only an r x r matrix trains; A, B, R from the first-step update's SVD"
    needs_batches = True
    defaults: ClassVar[dict[str, Any]] = {
        **LORA_DEFAULTS,
        "lora_alpha": None,
        "lora_dropout": 0.0,
        "sb_num_batches": 8,
        "sb_update_approximation": "sign",
    }

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        pkg = self.package()
        kw = lora_kwargs(args)
        if kw["lora_alpha"] is None:
            kw.pop("lora_alpha")
        config = pkg.LoraSBConfig(
            **kw,
            update_approximation=args.sb_update_approximation,
            # on resume the checkpoint restores A, B and R: build the structure without estimating
            sb_init="random" if resume else "gradient",
        )
        return pkg.get_lora_sb_model(
            model,
            config,
            train_batches if not resume else [],
            lr=first_step_lr(args),
            num_batches=args.sb_num_batches,
            progress=args.progress,
        )


METHOD = LoraSB()
