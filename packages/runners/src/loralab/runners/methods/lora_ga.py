"""``--method lora-ga``: LoRA-GA (Wang et al., 2024, arXiv 2407.05000) from ``loralab-lora-ga``.

A and B come from the SVD of the full-weight gradient averaged over ``--ga_iters`` training batches
(paper: 64 batches of 2), and W0 is offset by ``-s·B·A`` so step 0 equals the base model. The paper's
runs used rsLoRA (``--use_rslora true``). Then AdamW as for LoRA.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from torch import nn

from loralab.runners.methods.base import (
    LORA_DEFAULTS,
    LORA_OPTIONS,
    FinalDirectory,
    Method,
    Option,
    SavesPretrained,
    lora_kwargs,
)
from loralab.runners.quantization import estimation_kwargs

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["METHOD", "OFFSET_BASE", "ORIGINAL_BASE_ADAPTER", "LoraGA", "lora_ga_readme"]

ORIGINAL_BASE_ADAPTER = "original_base_adapter"
"""Sub-directory of a quantized run's ``final/``: the rank-2r LoRA for the original checkpoint."""
OFFSET_BASE = "offset_base"
"""Sub-directory of a quantized run's ``final/``: the offset base ``W0'``, quantized as trained."""


class LoraGA(Method):
    name = "lora-ga"
    module = "loralab.lora_ga"
    pip_name = "loralab-lora-ga"
    requires = (
        "LoraGAConfig",
        "get_lora_ga_model",
        "save_lora_ga_adapter",
        "plain_lora_config",
        "get_lora_ga_init_factors",
        "set_lora_ga_init_factors",
    )
    description = "LoRA-GA: A, B from the SVD of the estimated full gradient, W0 offset"
    needs_batches = True
    sharded_engines = frozenset({"deepspeed_zero", "fsdp2"})
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
        return self._build(model, args, train_batches, resume=resume)

    def wrap_sharded(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Any,
        *,
        resume: bool,
        shard: Callable[[nn.Module], nn.Module],
    ) -> nn.Module:
        """FSDP2: the adapters are built (``B = 0``), the model sharded, and the gradient estimated on
        the sharded model (each rank writes its rows of A, B and the offset W0)."""
        if resume:
            return shard(self._build(model, args, train_batches, resume=True))
        return self._build(model, args, train_batches, resume=False, shard=shard)

    def _build(
        self,
        model: nn.Module,
        args: Any,
        train_batches: Any,
        *,
        resume: bool,
        shard: Callable[[nn.Module], nn.Module] | None = None,
    ) -> nn.Module:
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
        # Quantized base (QLoRA): the gradient is estimated on a float copy of the same checkpoint,
        # block by block, then the quantized model gets A, B and its offset W0 re-quantized with
        # each layer's own settings (the LoRA-GA seed's flow, in loralab.core.quant).
        return pkg.get_lora_ga_model(
            model,
            config,
            batches,
            progress=args.progress,
            shard=shard,
            **estimation_kwargs(model, args),
        )

    def save_final(self, model: nn.Module, out: FinalDirectory) -> None:
        """Float base: the rank-2r plain LoRA for the *original* base (``A' = [A; A0]``,
        ``B' = [B, -B0]``); the trained rank-r adapter alone only fits the offset base
        ``W0 - s·B0·A0`` (paper Eq. 13) the run trained on.

        Quantized base: the original checkpoint quantized again differs from the trained offset base by
        the re-quantization error, so ``out.path`` holds the rank-r adapter, ``out.path/offset_base``
        the offset base as trained (named in ``adapter_config.json``: bare ``PeftModel.from_pretrained``
        on it reproduces the run exactly), and ``out.path/original_base_adapter`` the rank-2r LoRA.
        A ``README.md`` says which base each adapter needs.
        """
        from loralab.core.quant import quantized_layer_names

        pkg = self.package()
        directory, state_dict = out.path, out.state_dict
        # wrap() returned get_lora_ga_model's PeftModel
        quantized = bool(quantized_layer_names(cast("PeftModel", model).get_base_model()))
        if not quantized:
            pkg.save_lora_ga_adapter(model, directory, state_dict=state_dict)
        else:
            with warnings.catch_warnings():
                # the raw rank-r adapter is meant for the offset base saved next to it (and named in
                # its config), which is what LoraGAConfig.save_pretrained's warning asks for
                warnings.filterwarnings("ignore", message="saving a raw LoRA-GA checkpoint")
                cast(SavesPretrained, model).save_pretrained(
                    directory, state_dict=state_dict, safe_serialization=True
                )
            save_offset_base(model, directory / OFFSET_BASE, state_dict)
            pkg.save_lora_ga_adapter(
                model, directory / ORIGINAL_BASE_ADAPTER, state_dict=state_dict
            )
            # a plain LoRA config (the init is spent, the settings are in run_config.json): PEFT's
            # bare load would warn about each LoRA-GA field ("Unexpected keyword arguments"); it
            # names the offset base the adapter fits
            adapter = cast("PeftModel", model).active_adapter
            plain = pkg.plain_lora_config(cast("PeftModel", model).peft_config[adapter])
            plain.base_model_name_or_path = str((out.where / OFFSET_BASE).resolve())
            plain.save_pretrained(str(directory))
        (directory / "README.md").write_text(lora_ga_readme(quantized))

    def checkpoint_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # A0, B0 live outside the state dict; the final export needs them after a resume too
        return self.package().get_lora_ga_init_factors(model)

    def load_checkpoint_state(self, model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        self.package().set_lora_ga_init_factors(model, dict(state))


def save_offset_base(
    model: nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """The PEFT model's base (``W0'``, quantized as it is) as a transformers checkpoint.

    ``state_dict``: the PEFT model's whole state dict, gathered by a sharding engine (FSDP2), whose
    parameters in ``model`` are this rank's shards only."""
    from loralab.runners.quantization import _trained_modules_in_place, base_state_dict

    base = cast("PeftModel", model).get_base_model()
    if state_dict is None:
        with _trained_modules_in_place(base, "default"):
            # a PEFT model's base is a transformers model
            cast(SavesPretrained, base).save_pretrained(str(path), safe_serialization=True)
        return
    whole = base_state_dict(state_dict, model)
    # transformers 5 replaces a given state_dict by its quantizer's (None for bitsandbytes: then the
    # model's own, here this rank's shards); without the quantizer it saves ours, and the config keeps
    # its quantization_config
    quantizer = getattr(base, "hf_quantizer", None)
    setattr(base, "hf_quantizer", None)  # noqa: B010 (nn.Module's attributes are typed Tensor | Module)
    try:
        cast(SavesPretrained, base).save_pretrained(
            str(path), state_dict=whole, safe_serialization=True
        )
    finally:
        setattr(base, "hf_quantizer", quantizer)  # noqa: B010


def lora_ga_readme(quantized: bool) -> str:
    """What ``final/`` of a LoRA-GA run holds and which base each adapter needs."""
    lines = [
        "# LoRA-GA run: which base each adapter needs",
        "",
        "LoRA-GA offsets the base weights at initialisation (`W0' = W0 - s*B0*A0`, paper Eq. 13), so",
        "the trained rank-r adapter fits the *offset* base, not the original checkpoint.",
        "",
    ]
    if quantized:
        lines += [
            f"- `./` (the rank-r adapter) + `{OFFSET_BASE}/` (the offset base, quantized as trained):",
            f"  `PeftModel.from_pretrained(AutoModel*.from_pretrained('{OFFSET_BASE}'), '.')` reproduces",
            "  the trained model exactly. `adapter_config.json` names that base.",
            f"- `{ORIGINAL_BASE_ADAPTER}/`: a plain rank-2r LoRA for the original checkpoint. On the",
            "  original *float* checkpoint it is exact; on the original checkpoint quantized again it",
            "  differs from the trained model by the re-quantization error `Q(W0) - Q(W0') - s*B0*A0`.",
        ]
    else:
        lines += [
            "- `./`: a plain rank-2r LoRA (`A' = [A; A0]`, `B' = [B, -B0]`) for the original checkpoint:",
            "  `PeftModel.from_pretrained(original_base, '.')` reproduces the trained model. The offset",
            "  base is not saved for float runs.",
        ]
    return "\n".join(lines) + "\n"


METHOD = LoraGA()
