"""``--method lora``: PEFT LoRA (Hu et al., 2021, arXiv 2106.09685) with AdamW."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from loralab.runners.methods.base import LORA_DEFAULTS, LORA_OPTIONS, Method, lora_kwargs

__all__ = ["METHOD", "LoRA"]


class LoRA(Method):
    name = "lora"
    description = "PEFT LoRA (B = 0, A Kaiming-uniform) + AdamW"
    options = LORA_OPTIONS
    sharded_engines = frozenset({"deepspeed_zero", "fsdp2"})  # torch's AdamW: element-wise
    defaults: ClassVar[dict[str, Any]] = dict(LORA_DEFAULTS)

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(**lora_kwargs(args)))


METHOD = LoRA()
