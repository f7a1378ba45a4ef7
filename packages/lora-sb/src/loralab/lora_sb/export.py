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
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from loralab.core.targets import layer_kind
from loralab.lora_sb.config import LoraSBConfig
from loralab.lora_sb.layer import R_NAME
from loralab.lora_sb.model import lora_sb_layers

__all__ = ["convert_lora_sb_checkpoint", "lora_sb_as_lora_state_dict", "save_lora_sb_as_lora"]

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


def _fold_r_into_b(state: dict[str, Tensor]) -> list[str]:
    """In place: ``lora_B ← B·R`` (float64 product, stored in float32; float64 stays float64), ``lora_A``
    in the same dtype, ``lora_R`` dropped, for every ``<layer>.lora_R.weight`` key. Returns the layers."""
    suffix = f".{R_NAME}.weight"
    layers = sorted(k[: -len(suffix)] for k in state if k.endswith(suffix))
    for layer in layers:
        A, B = state.get(f"{layer}.lora_A.weight"), state.get(f"{layer}.lora_B.weight")
        R = state.pop(f"{layer}{suffix}")
        if A is None or B is None:
            raise ValueError(f"{layer!r} has lora_R but no lora_A/lora_B weights")
        if B.shape[1] != R.shape[0] or R.shape[1] != A.shape[0]:
            raise ValueError(
                f"{layer!r}: shapes B {tuple(B.shape)}, R {tuple(R.shape)}, A {tuple(A.shape)} do not chain"
            )
        dtype = torch.float64 if torch.float64 in (A.dtype, B.dtype, R.dtype) else torch.float32
        state[f"{layer}.lora_A.weight"] = A.detach().to(dtype).contiguous()
        state[f"{layer}.lora_B.weight"] = (B.detach().double() @ R.detach().double()).to(dtype)
    leftover = sorted(k for k in state if f".{R_NAME}." in k)
    # a LoRA-SB slot this export does not know: refuse rather than write a wrong adapter
    if leftover:
        raise ValueError(f"could not fold R into B for {leftover[:5]}")
    return layers


def _write(
    state: dict[str, Tensor], config: LoraConfig, save_directory: str | os.PathLike[str]
) -> None:
    os.makedirs(save_directory, exist_ok=True)
    # own, contiguous CPU copies: safetensors refuses tensors that share storage (tied heads)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    save_file(
        tensors,
        os.path.join(os.fspath(save_directory), SAFETENSORS_WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    config.save_pretrained(os.fspath(save_directory))


@torch.no_grad()
def lora_sb_as_lora_state_dict(
    model: PeftModel,
    adapter_name: str = "default",
    *,
    state_dict: dict[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], LoraConfig]:
    """``(state_dict, LoraConfig)`` of ``adapter_name`` as a plain LoRA adapter (``B' = B·R``), in PEFT's
    saved-adapter format (keys without the adapter name); see :func:`save_lora_sb_as_lora`.
    ``state_dict``: the model's whole state dict when its parameters are sharded (FSDP2, ZeRO-3)."""
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
    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    folded = _fold_r_into_b(state)
    missing = sorted(set(layers) - {k[len(_PREFIX) :] for k in folded})
    # a LoRA-SB layer whose R is not in the state dict: refuse rather than write a wrong adapter
    if missing:
        raise ValueError(f"no lora_R in the adapter's state dict for {missing[:5]}")
    all_conv1d = all(layer_kind(m.get_base_layer()) == "conv1d" for m in layers.values())
    config = _plain_config(cfg, all_conv1d)
    if config.task_type is None:
        # as PeftModel.save_pretrained: without a task type, record the base class for AutoPeftModel
        base_class = type(model.base_model.model)
        config.auto_mapping = {
            "base_model_class": base_class.__name__,
            "parent_library": base_class.__module__,
        }
    return state, config


def save_lora_sb_as_lora(
    model: PeftModel,
    save_directory: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    is_main_process: bool = True,
    state_dict: dict[str, Tensor] | None = None,
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
        state_dict: the model's whole state dict when its parameters are sharded (FSDP2's
            ``get_model_state_dict(..., full_state_dict=True)``, ZeRO-3), as for PEFT's
            ``save_pretrained``; read instead of the model's own parameters.

    Returns the ``LoraConfig`` written. Raises ``ValueError`` for a non-LoRA-SB or merged adapter.
    """
    state, config = lora_sb_as_lora_state_dict(model, adapter_name, state_dict=state_dict)
    if is_main_process:
        _write(state, config, save_directory)
    return config


@torch.no_grad()
def convert_lora_sb_checkpoint(
    lora_sb_directory: str | os.PathLike[str], save_directory: str | os.PathLike[str]
) -> LoraConfig:
    """File to file: turn a saved native LoRA-SB adapter into a plain LoRA adapter (``B' = B·R``),
    without the base model. Same result as :func:`save_lora_sb_as_lora` on the loaded model, except
    that ``fan_in_fan_out`` is copied from the saved config (PEFT sets it per GPT-2 ``Conv1D`` layer,
    with a warning, when it is False).

    Reads ``adapter_config.json`` (with ``LoraSBConfig.from_pretrained``) and
    ``adapter_model.safetensors`` (or ``adapter_model.bin``) from ``lora_sb_directory``.
    """
    src = os.fspath(lora_sb_directory)
    cfg = LoraSBConfig.from_pretrained(src)
    path = os.path.join(src, SAFETENSORS_WEIGHTS_NAME)
    if os.path.isfile(path):
        state = load_file(path)
    elif os.path.isfile(os.path.join(src, WEIGHTS_NAME)):
        state = torch.load(os.path.join(src, WEIGHTS_NAME), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"no {SAFETENSORS_WEIGHTS_NAME} or {WEIGHTS_NAME} in {src!r} (a save_pretrained folder)"
        )
    if not _fold_r_into_b(state):
        raise ValueError(f"{src!r} holds no lora_R weights: it is not a LoRA-SB adapter checkpoint")
    config = _plain_config(cfg, all_conv1d=False)
    _write(state, config, save_directory)
    return config
