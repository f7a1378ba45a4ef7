"""Export a LoRA-SB adapter as a plain LoRA adapter that bare PEFT (and any LoRA loader) reads exactly.

LoRA-SB adapts ``W = W0 + s·B·R·A``. Folding the trained r×r ``R`` into ``B`` gives a LoRA adapter
of the same rank, ``ΔW = s·B'·A`` with ``B' = B·R`` (m×r) and the same ``A`` (r×n) and scaling
``s = lora_alpha/r`` (``/√r`` with rsLoRA; ``rank_pattern``/``alpha_pattern`` kept), so the exported
adapter computes the same ``ΔW`` as the LoRA-SB one, up to float rounding (the product ``B·R`` is
formed in float64 and stored in float32). ``modules_to_save`` (e.g. a classifier head) and any other
state PEFT saves with the adapter are exported unchanged.

The export is for inference, merging, serving and other tools (``PeftModel.from_pretrained``, vLLM,
``merge_and_unload``); keep the native LoRA-SB checkpoint (``save_pretrained``) to continue training,
since a plain LoRA adapter trains A and B, not R.

Example:
    >>> import tempfile
    >>> import torch
    >>> from peft import PeftModel
    >>> from loralab.core.testing import make_lm_batches, tiny_llama
    >>> from loralab.lora_sb import LoraSBConfig, get_lora_sb_model, save_lora_sb_as_lora
    >>> model = get_lora_sb_model(tiny_llama(), LoraSBConfig(r=4, target_modules=["q_proj", "v_proj"]),
    ...                           make_lm_batches(2), lr=1e-3, progress=False)
    >>> out = tempfile.mkdtemp()
    >>> save_lora_sb_as_lora(model, out).peft_type
    <PeftType.LORA: 'LORA'>
    >>> plain = PeftModel.from_pretrained(tiny_llama(), out)  # bare PEFT, plain LoRA layers
    >>> x = make_lm_batches(1, seed=9)[0]
    >>> with torch.no_grad():
    ...     torch.allclose(plain(**x).logits, model(**x).logits, atol=1e-5)
    True
"""

from __future__ import annotations

import dataclasses
import os

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor

from loralab.core.targets import layer_kind
from loralab.lora_sb.config import LoraSBConfig
from loralab.lora_sb.layer import R_NAME
from loralab.lora_sb.model import lora_sb_layers

__all__ = ["lora_sb_as_lora_state_dict", "save_lora_sb_as_lora"]

_PREFIX = "base_model.model."


def _plain_config(cfg: LoraSBConfig, all_conv1d: bool) -> LoraConfig:
    """The ``LoraConfig`` with every LoRA field of ``cfg`` (LoRA-SB's own fields dropped)."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(LoraConfig) if f.init}
    fields.pop("peft_type", None)  # set by LoraConfig itself
    # A and B hold the trained values (nothing to initialise); saved adapters are inference configs.
    fields.update(init_lora_weights=True, inference_mode=True)
    if all_conv1d:
        # GPT-2 Conv1D stores (in, out): PEFT wants fan_in_fan_out=True for them (it would also set it
        # per layer with a warning)
        fields["fan_in_fan_out"] = True
    return LoraConfig(**fields)


@torch.no_grad()
def lora_sb_as_lora_state_dict(
    model: PeftModel, adapter_name: str = "default"
) -> tuple[dict[str, Tensor], LoraConfig]:
    """``(state_dict, LoraConfig)`` of ``adapter_name`` as a plain LoRA adapter (``B' = B·R``), in PEFT's
    saved-adapter format (keys without the adapter name); see :func:`save_lora_sb_as_lora`."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"model must be a PeftModel, got {type(model).__name__}")
    cfg = model.peft_config.get(adapter_name)
    if not isinstance(cfg, LoraSBConfig):
        raise ValueError(
            f"adapter {adapter_name!r} is not a LoRA-SB adapter (config: {type(cfg).__name__}); "
            "a plain LoRA adapter is saved with model.save_pretrained"
        )
    layers = lora_sb_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"model has no LoRA-SB layers for adapter {adapter_name!r}")
    merged = sorted(n for n, m in layers.items() if adapter_name in m.merged_adapters)
    if merged:
        raise ValueError(
            f"adapter {adapter_name!r} is merged into the base weights of {merged[:5]}; unmerge it "
            "(model.unmerge_adapter()) before exporting, or the export would add ΔW a second time"
        )
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    for name, layer in layers.items():
        key = f"{_PREFIX}{name}"
        A = layer.lora_A[adapter_name].weight
        B = layer.lora_B[adapter_name].weight
        R = layer.lora_R[adapter_name].weight
        dtype = torch.float64 if torch.float64 in (A.dtype, B.dtype, R.dtype) else torch.float32
        state[f"{key}.lora_A.weight"] = A.detach().to(dtype).contiguous()
        state[f"{key}.lora_B.weight"] = (B.detach().double() @ R.detach().double()).to(dtype)
        del state[f"{key}.{R_NAME}.weight"]
    leftover = sorted(k for k in state if f".{R_NAME}." in k)
    if (
        leftover
    ):  # a LoRA-SB slot this export did not fold: refuse rather than write a wrong adapter
        raise ValueError(f"could not fold R into B for {leftover[:5]}")
    all_conv1d = all(layer_kind(m.get_base_layer()) == "conv1d" for m in layers.values())
    return state, _plain_config(cfg, all_conv1d)


def save_lora_sb_as_lora(
    model: PeftModel,
    save_directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_main_process: bool = True,
) -> LoraConfig:
    """Save LoRA-SB adapter ``adapter_name`` as a plain LoRA adapter (``R`` folded into ``B``).

    Writes ``adapter_config.json`` (a ``LoraConfig``: same ``r``, ``lora_alpha``, ``use_rslora``,
    ``target_modules``, ``rank_pattern``/``alpha_pattern``, ``modules_to_save`` …) and
    ``adapter_model.safetensors`` with ``lora_A = A`` and ``lora_B = B·R`` in float32 (float64 for a
    float64 adapter), plus whatever PEFT saves with the adapter (``modules_to_save`` heads, trainable
    tokens). ``PeftModel.from_pretrained(original_base, save_directory)`` then reproduces the LoRA-SB
    model's outputs (equal to ~1e-6 relative in float32; tested at atol 1e-5 on logits).

    Args:
        model: a ``PeftModel`` whose adapter ``adapter_name`` is LoRA-SB (not merged).
        save_directory: the output folder (created if needed).
        adapter_name: which adapter to export.
        is_main_process: write files only when True (call it on every rank, pass the rank-0 flag).

    Returns the ``LoraConfig`` written. Raises ``ValueError`` for a non-LoRA-SB or merged adapter.
    """
    state, config = lora_sb_as_lora_state_dict(model, adapter_name)
    if is_main_process:
        os.makedirs(save_directory, exist_ok=True)
        # own, contiguous CPU copies: safetensors refuses tensors that share storage (tied heads)
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
        save_file(
            tensors,
            os.path.join(os.fspath(save_directory), SAFETENSORS_WEIGHTS_NAME),
            metadata={"format": "pt"},
        )
        config.save_pretrained(os.fspath(save_directory))
    return config
