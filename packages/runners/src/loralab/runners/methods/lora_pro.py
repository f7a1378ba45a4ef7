"""``--method lora-pro``: LoRA-Pro (Wang et al., 2024, arXiv 2407.18242) from ``loralab-lora-pro``.

PEFT LoRA adapters trained by ``LoraProAdamW``, which replaces A's and B's gradients by the
"equivalent gradients" closest to full fine-tuning's (X from a Sylvester equation by default).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import (
    LORA_DEFAULTS,
    LORA_OPTIONS,
    Method,
    Option,
    lora_kwargs,
)

__all__ = ["METHOD", "LoraPro"]


class LoraPro(Method):
    name = "lora-pro"
    module = "loralab.lora_pro"
    pip_name = "loralab-lora-pro"
    requires = ("create_lora_pro_optimizer",)
    description = "LoRA-Pro: LoRA with equivalent gradients (AdamW on the adjusted A, B gradients)"
    # needs each (A, B) pair as matrices: the optimizer gathers the small factors from DeepSpeed
    # ZeRO's flat partitions (loralab.core.zero_views; full mode keeps each layer's m×n state on one
    # rank; both modes under ZeRO-1/2/3) and from FSDP2's row shards (loralab.core.sharding)
    sharded_engines = frozenset({"deepspeed_zero", "fsdp2"})
    # LoRA-Pro has no config dataclass: its options are create_lora_pro_optimizer's arguments
    options = (
        *LORA_OPTIONS,
        Option(
            "pro_mode",
            str,
            "LoRA-Pro: 'efficient' (Adam on adjusted LoRA gradients) or 'full' (full-space Adam)",
            ("efficient", "full"),
        ),
        Option(
            "pro_x_mode",
            str,
            "LoRA-Pro: how the free matrix X is chosen",
            ("sylvester", "zero", "symmetry"),
        ),
    )
    defaults: ClassVar[dict[str, Any]] = {
        **LORA_DEFAULTS,
        "pro_mode": "efficient",
        "pro_x_mode": "sylvester",
    }

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        self.import_package()
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**lora_kwargs(args)))

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        pkg = self.package()
        return pkg.create_lora_pro_optimizer(
            model,
            args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            weight_decay=args.weight_decay,
            mode=args.pro_mode,
            x_mode=args.pro_x_mode,
        )


METHOD = LoraPro()
