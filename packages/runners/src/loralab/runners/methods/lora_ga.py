"""``--method lora-ga``: LoRA-GA (Wang et al., 2024, arXiv 2407.05000) from ``loralab-lora-ga``.

A and B come from the SVD of the full-weight gradient averaged over ``--ga_iters`` training batches
(paper: 64 batches of 2), and W0 is offset by ``-s·B·A`` so step 0 equals the base model. The paper's
runs used rsLoRA (``--use_rslora true``). Then AdamW as for LoRA.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from loralab.runners.methods.base import LORA_DEFAULTS, Callback, Method, lora_kwargs
from loralab.runners.quantization import estimation_dtype, estimation_model

__all__ = ["METHOD", "LoraGA", "LoraGAExport"]


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
        # Quantized base (QLoRA): the gradient is estimated on a float copy of the same checkpoint,
        # block by block, then the quantized model gets A, B and its offset W0 re-quantized with
        # each layer's own settings (the LoRA-GA seed's flow, in loralab.core.quant).
        float_model = estimation_model(model, estimation_dtype(args))
        peft_model = pkg.get_lora_ga_model(
            model,
            config,
            batches,
            progress=args.progress,
            estimation_model=float_model,
            offload=float_model is not None,
        )
        del float_model
        return peft_model

    def callbacks(self, model: nn.Module, args: Any) -> list[Callback]:
        return [LoraGAExport()]


class LoraGAExport(Callback):
    """Next to final/'s adapter (which fits the *offset* base ``W0' = W0 − s·B0·A0``), write what
    loads on the original checkpoint and a README saying which base each needs:

    - ``final/original_base_adapter/``: the rank-2r plain LoRA of ``loralab.lora_ga.save_lora_ga_adapter``
      (``PeftModel.from_pretrained(original_base, path)``; exact for a float base);
    - quantized bases only: ``final/offset_base/``, the quantized offset base as trained (its
      ``config.json`` carries the ``quantization_config``), which final/'s adapter needs to reproduce
      the trained model exactly; final/'s ``adapter_config.json`` names it as its base.
    """

    def on_save(self, output_dir: str, model: nn.Module) -> None:
        from loralab.core.quant import quantized_layer_names
        from loralab.lora_ga import save_lora_ga_adapter

        out = Path(output_dir)
        save_lora_ga_adapter(model, out / ORIGINAL_BASE_ADAPTER)
        quantized = bool(quantized_layer_names(model.get_base_model()))
        if quantized:
            save_offset_base(model, out / OFFSET_BASE)
            cfg_path = out / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["base_model_name_or_path"] = str((out / OFFSET_BASE).resolve())
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (out / "README.md").write_text(lora_ga_readme(quantized))


def save_offset_base(model: nn.Module, path: Path) -> None:
    """The PEFT model's base (``W0'``, quantized as it is) as a transformers checkpoint."""
    from loralab.runners.quantization import _trained_modules_in_place

    base = model.get_base_model()
    with _trained_modules_in_place(base, "default"):
        base.save_pretrained(str(path), safe_serialization=True)


def lora_ga_readme(quantized: bool) -> str:
    lines = [
        "# LoRA-GA run: which base each adapter needs",
        "",
        "LoRA-GA offsets the base weights at initialisation (`W0' = W0 - s*B0*A0`, paper Eq. 13), so",
        "the rank-r adapter in this directory fits the *offset* base, not the original checkpoint.",
        "",
    ]
    if quantized:
        lines += [
            f"- `./` (this adapter) + `{OFFSET_BASE}/` (the offset base, quantized as trained):",
            f"  `PeftModel.from_pretrained(AutoModel*.from_pretrained('{OFFSET_BASE}'), '.')` reproduces",
            "  the trained model exactly. `adapter_config.json` names that base.",
            f"- `{ORIGINAL_BASE_ADAPTER}/`: a plain rank-2r LoRA for the original checkpoint. On the",
            "  original *float* checkpoint it is exact; on the original checkpoint quantized again it",
            "  differs from the trained model by the re-quantization error `Q(W0) - Q(W0')  - s*B0*A0`.",
        ]
    else:
        lines += [
            "- `./` (this adapter): needs the offset base, which is not saved for float runs.",
            f"- `{ORIGINAL_BASE_ADAPTER}/`: a plain rank-2r LoRA for the original checkpoint",
            "  (`PeftModel.from_pretrained(original_base, path)`), exactly the trained model.",
        ]
    return "\n".join(lines) + "\n"


ORIGINAL_BASE_ADAPTER = "original_base_adapter"
OFFSET_BASE = "offset_base"


METHOD = LoraGA()
