"""``--method lora-ga``: LoRA-GA (Wang et al., 2024, arXiv 2407.05000) from ``loralab-lora-ga``.

A and B come from the SVD of the full-weight gradient averaged over ``--ga_iters`` training batches
(paper: 64 batches of 2), and W0 is offset by ``-s·B·A`` so step 0 equals the base model. The paper's
runs used rsLoRA (``--use_rslora true``). Then AdamW as for LoRA.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

from torch import nn

from loralab.runners.methods.base import LORA_DEFAULTS, Method, lora_kwargs

__all__ = ["METHOD", "LoraGA"]


class LoraGA(Method):
    name = "lora-ga"
    module = "loralab.lora_ga"
    pip_name = "loralab-lora-ga"
    requires = ("LoraGAConfig", "get_lora_ga_model")
    description = "LoRA-GA: A, B from the SVD of the estimated full gradient, W0 offset"
    needs_batches = True
    defaults: ClassVar[dict[str, Any]] = {
        **LORA_DEFAULTS,
        "ga_iters": 64,
        "ga_direction": "ArB2r",
        "ga_scale": "stable",
        "ga_stable_gamma": 16.0,
    }

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        pkg = self.package()
        if resume:
            # Same adapter structure without estimating: the checkpoint about to be loaded holds the
            # initialized A, B and the offset W0 (every weight of the model is checkpointed).
            from peft import LoraConfig, get_peft_model

            return get_peft_model(model, LoraConfig(**lora_kwargs(args)))
        config = pkg.LoraGAConfig(
            **lora_kwargs(args),
            iters=args.ga_iters,
            direction=args.ga_direction,
            scale=args.ga_scale,
            stable_gamma=args.ga_stable_gamma,
        )
        batches = list(itertools.islice(iter(train_batches), args.ga_iters))
        return pkg.get_lora_ga_model(model, config, batches, progress=args.progress)


METHOD = LoraGA()
