"""``--method lora-fa``: LoRA-FA (Zhang et al., 2023, arXiv 2308.03303) from ``loralab-lora-fa``.

PEFT LoRA adapters with A frozen at its random init and B trained by the LoRA-FA optimizer, which
projects B's gradient so the update approximates full fine-tuning's in the span of A.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn
from torch.optim import Optimizer

from loralab.runners.methods.base import LORA_DEFAULTS, LORA_OPTIONS, Method, lora_kwargs

__all__ = ["METHOD", "LoraFA"]


class LoraFA(Method):
    name = "lora-fa"
    module = "loralab.lora_fa"
    pip_name = "loralab-lora-fa"
    requires = ("create_lorafa_optimizer",)
    description = "LoRA-FA: A frozen, B updated with the projected (full-FT-equivalent) gradient"
    # pairs each B with its A: the optimizer gathers B's gradient from DeepSpeed ZeRO's flat
    # partitions (loralab.core.zero_views) and the row-sharded A under FSDP2 (loralab.core.sharding)
    sharded_engines = frozenset({"deepspeed_zero", "fsdp2"})
    options = LORA_OPTIONS
    defaults: ClassVar[dict[str, Any]] = dict(LORA_DEFAULTS)

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        self.import_package()
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**lora_kwargs(args)))

    def build_optimizer(self, model: nn.Module, args: Any) -> Optimizer:
        pkg = self.package()
        return pkg.create_lorafa_optimizer(
            model,
            args.lora_r,
            args.lora_alpha,
            args.learning_rate,
            weight_decay=args.weight_decay,
            use_rslora=args.use_rslora,
        )


METHOD = LoraFA()
