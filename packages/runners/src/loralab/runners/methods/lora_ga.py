"""``--method lora-ga``: LoRA-GA (Wang et al., 2024, arXiv 2407.05000) from ``loralab-lora-ga``.

A and B come from the SVD of the full-weight gradient averaged over ``--ga_iters`` training batches
(paper: 64 batches of 2), and W0 is offset by ``-s·B·A`` so step 0 equals the base model. The paper's
runs used rsLoRA (``--use_rslora true``). Then AdamW as for LoRA.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from loralab.runners.methods.base import LORA_DEFAULTS, LORA_OPTIONS, Method, Option, lora_kwargs

__all__ = ["METHOD", "LoraGA"]


class LoraGA(Method):
    name = "lora-ga"
    module = "loralab.lora_ga"
    pip_name = "loralab-lora-ga"
    requires = (
        "LoraGAConfig",
        "get_lora_ga_model",
        "save_lora_ga_adapter",
        "get_lora_ga_init_factors",
        "set_lora_ga_init_factors",
    )
    description = "LoRA-GA: A, B from the SVD of the estimated full gradient, W0 offset"
    needs_batches = True
    options = (
        *LORA_OPTIONS,
        Option("ga_iters", int, "(batches per process; averaged over all processes)",
               source="loralab.lora_ga:LoraGAConfig.iters"),
        Option("ga_direction", str, choices=("ArB2r", "ArBr", "A2rBr", "random"),
               source="loralab.lora_ga:LoraGAConfig.direction"),
        Option("ga_scale", str, choices=("stable", "gd", "unit", "weight_svd"),
               source="loralab.lora_ga:LoraGAConfig.scale"),
        Option("ga_stable_gamma", float, source="loralab.lora_ga:LoraGAConfig.stable_gamma"),
    )  # fmt: skip
    defaults: ClassVar[dict[str, Any]] = {
        **LORA_DEFAULTS,
        "ga_iters": 64,
        "ga_direction": "ArB2r",
        "ga_scale": "stable",
        "ga_stable_gamma": 16.0,
    }

    def wrap(self, model: nn.Module, args: Any, train_batches: Any, *, resume: bool) -> nn.Module:
        pkg = self.import_package()
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

    def save_final(
        self,
        model: nn.Module,
        directory: str | os.PathLike[str],
        *,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """The rank-2r plain LoRA for the *original* base (``A' = [A; A0]``, ``B' = [B, -B0]``): the
        trained rank-r adapter alone only fits the offset base ``W0 - s·B0·A0`` the run trained on."""
        self.import_package().save_lora_ga_adapter(model, directory, state_dict=state_dict)

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A0, B0 live outside the state dict; the final export needs them after a resume too
        return self.import_package().get_lora_ga_init_factors(model)

    def load_checkpoint_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        self.import_package().set_lora_ga_init_factors(model, dict(state))


METHOD = LoraGA()
