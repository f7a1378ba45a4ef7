"""``--method full``: full fine-tuning with AdamW (or momentum SGD, ``optim="sgd"``) over every parameter."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from loralab.runners.methods.base import Method

__all__ = ["METHOD", "FullFineTuning"]


class FullFineTuning(Method):
    name = "full"
    description = "full fine-tuning (AdamW on every weight)"
    optimizers = ("adamw", "sgd")
    sharded_engines = frozenset({"deepspeed_zero", "fsdp2"})  # torch's AdamW / SGD: element-wise
    # full weights train: nothing to merge, and a bitsandbytes weight gets no gradient
    has_adapter = False
    quantized_base = False
    defaults: ClassVar[dict[str, Any]] = {}

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model


METHOD = FullFineTuning()
