"""Saving a LoRA-GA model: a plain rank-2r LoRA for the *original* base model, or the offset model itself.

LoRA-GA changes the base weights at init (``W0' = W0 − s·B0·A0``, paper Eq. 13), so the trained
adapter ``(A, B)`` only fits ``W0'``. Two ways out:

- :func:`save_lora_ga_adapter`: ``W0' + s·B·A = W0 + s·(B·A − B0·A0) = W0 + s·B'·A'`` with
  ``A' = [A; A0]`` (2r × n) and ``B' = [B, −B0]`` (m × 2r): a plain PEFT LoRA adapter of rank 2r that
  loads with ``PeftModel.from_pretrained(original_model, path)`` (no loralab needed). ``s`` must not
  change: ``α' = 2α`` for ``s = α/r``, ``α' = √2·α`` for rsLoRA's ``s = α/√r`` (the reference fork
  wrote ``2α`` in both cases). The initial factors are the ones kept in memory at init, so no
  "initial checkpoint" has to be saved first (PEFT's ``path_initial_model_for_weight_conversion``
  flow needs one; the result is the same, see the tests).
- :func:`save_lora_ga_model` / :func:`load_lora_ga_model`: the offset base model (``base/``, a
  transformers checkpoint) plus the current rank-r adapter (``adapter/``, a plain LoRA config) and the
  initial factors (so :func:`save_lora_ga_adapter` still works after loading).

For a quantized base the export is exact for the *float* original; on the quantized original it
differs by ``Q(W0) − Q(W0')`` − ``s·B0·A0`` (re-quantization error), as PEFT warns for PiSSA.

Example:
    >>> import tempfile, torch
    >>> from peft import PeftModel
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.lora_ga import LoraGAConfig, get_lora_ga_model, save_lora_ga_adapter
    >>> batches = make_lm_batches(2)
    >>> cfg = LoraGAConfig(r=4, lora_alpha=8, target_modules=["q_proj"], iters=2)
    >>> model = get_lora_ga_model(tiny_llama(), cfg, batches, progress=False).eval()
    >>> path = tempfile.mkdtemp()
    >>> save_lora_ga_adapter(model, path)
    >>> plain = PeftModel.from_pretrained(tiny_llama(), path).eval()
    >>> plain.peft_config["default"].r, plain.peft_config["default"].init_lora_weights
    (8, True)
    >>> with torch.no_grad():
    ...     bool(torch.allclose(plain(**batches[0]).logits, model(**batches[0]).logits, atol=1e-5))
    True
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.lora.layer import LoraLayer
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

from loralab.core.distributed import is_main_process
from loralab.core.modules import modules_replaced

__all__ = [
    "INIT_FACTORS_FILE",
    "get_lora_ga_init_factors",
    "load_lora_ga_model",
    "plain_lora_config",
    "save_lora_ga_adapter",
    "save_lora_ga_model",
    "set_lora_ga_init_factors",
]

logger = logging.getLogger(__name__)

INIT_FACTORS_FILE = "lora_ga_init.safetensors"
"""File (inside ``adapter/``) holding the initial ``A0``, ``B0`` of every layer."""


def plain_lora_config(config: LoraConfig, *, double_rank: bool = False) -> LoraConfig:
    """A plain ``peft.LoraConfig`` (``init_lora_weights=True``, no LoRA-GA fields) with ``config``'s settings.

    With ``double_rank=True``: ``r``, ``rank_pattern`` doubled and ``α``, ``alpha_pattern`` scaled so that
    every layer's scaling ``s`` is unchanged (×2, or ×√2 with rsLoRA). A pattern's α for a layer whose
    rank comes from ``rank_pattern`` follows the same rule, so per-layer scalings are kept too.
    """
    known = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    kwargs = {k: getattr(config, k) for k in known if hasattr(config, k)}
    kwargs.update(init_lora_weights=True, lora_ga_config=None)
    if double_rank:
        factor = math.sqrt(2.0) if config.use_rslora else 2.0
        kwargs["r"] = 2 * config.r
        kwargs["rank_pattern"] = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
        # A layer whose rank is in rank_pattern but whose alpha is not gets lora_alpha: scaled below too.
        kwargs["lora_alpha"] = config.lora_alpha * factor
        kwargs["alpha_pattern"] = {k: v * factor for k, v in (config.alpha_pattern or {}).items()}
    plain = LoraConfig(**kwargs)
    return plain


def _lora_layers(model: PeftModel, adapter_name: str) -> dict[str, LoraLayer]:
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and adapter_name in m.lora_A
    }


def _init_factors(layer: LoraLayer, name: str, adapter_name: str) -> tuple[Tensor, Tensor]:
    store = layer.__dict__.get("_lora_ga_init", {})
    if adapter_name not in store:
        raise ValueError(
            f"layer {name!r} has no LoRA-GA initial factors for adapter {adapter_name!r}: the model was not initialised by "
            "loralab.lora_ga (get_lora_ga_model / LoraGAContext) nor loaded with load_lora_ga_model. For a model "
            "initialised elsewhere, use PEFT's save_pretrained(path, path_initial_model_for_weight_conversion=init_dir)"
        )
    return store[adapter_name]


def get_lora_ga_init_factors(
    model: PeftModel, *, adapter_name: str = "default"
) -> dict[str, Tensor]:
    """The initial ``A0``, ``B0`` of every layer as ``{"<layer>.lora_A.weight": A0, "<layer>.lora_B.weight": B0}``
    (the layout of :data:`INIT_FACTORS_FILE`): what a training checkpoint must keep, besides the model's
    state dict, for :func:`save_lora_ga_adapter` to work after a resume.

    Raises:
        ValueError: a layer has no initial factors (the model was not initialised by loralab).
    """
    out: dict[str, Tensor] = {}
    for name, layer in _lora_layers(model, adapter_name).items():
        A0, B0 = _init_factors(layer, name, adapter_name)
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = A0, B0
    return out


def set_lora_ga_init_factors(
    model: PeftModel, factors: dict[str, Tensor], *, adapter_name: str = "default"
) -> None:
    """Restore :func:`get_lora_ga_init_factors`'s output onto a model of the same structure.

    Raises:
        ValueError: a layer of ``model`` has no entry in ``factors``, or ``factors`` names a layer
            ``model`` does not have.
    """
    layers = _lora_layers(model, adapter_name)
    expected = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    missing, extra = sorted(expected - set(factors)), sorted(set(factors) - expected)
    if missing or extra:
        raise ValueError(
            f"LoRA-GA initial factors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for name, layer in layers.items():
        layer.__dict__.setdefault("_lora_ga_init", {})[adapter_name] = (
            factors[f"{name}.lora_A.weight"].detach().to("cpu", copy=True),
            factors[f"{name}.lora_B.weight"].detach().to("cpu", copy=True),
        )


def _check_peft(model: Any, fn: str) -> PeftModel:
    if not isinstance(model, PeftModel):
        raise TypeError(
            f"{fn} expects the PeftModel returned by get_lora_ga_model, got {type(model).__name__}"
        )
    return model


def save_lora_ga_adapter(
    model: PeftModel,
    save_directory: str | os.PathLike[str],
    *,
    adapter_name: str = "default",
    safe_serialization: bool = True,
    state_dict: dict[str, Tensor] | None = None,
) -> None:
    """Save the (trained) LoRA-GA adapter as a plain rank-2r PEFT LoRA for the original base model.

    ``A' = [A; A0]``, ``B' = [B, −B0]``, ``r' = 2r``, ``α' = 2α`` (``√2·α`` with rsLoRA): loading it on
    the unmodified base model gives exactly this model's function (for float bases). Writes
    ``adapter_config.json`` + ``adapter_model.safetensors`` (on the main process only). ``state_dict``:
    the model's whole state dict when its parameters are sharded (DeepSpeed ZeRO-3), as for PEFT's
    ``save_pretrained``.

    Raises:
        TypeError: ``model`` is not a ``PeftModel``.
        ValueError: a layer has no initial factors (the model was not initialised by loralab).
    """
    model = _check_peft(model, "save_lora_ga_adapter")
    if adapter_name not in model.peft_config:
        raise ValueError(
            f"no adapter named {adapter_name!r}; the model has {sorted(model.peft_config)}"
        )
    config = model.peft_config[adapter_name]
    if getattr(config, "use_dora", False):
        raise ValueError(
            "save_lora_ga_adapter: DoRA adapters cannot be converted (LoRA-GA does not use DoRA)"
        )
    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name)
    for name, layer in _lora_layers(model, adapter_name).items():
        A0, B0 = _init_factors(layer, name, adapter_name)
        ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if ka not in state or kb not in state:  # pragma: no cover - PEFT's key layout
            raise RuntimeError(f"unexpected PEFT state-dict layout: {ka!r} missing")
        A, B = state[ka], state[kb]
        state[ka] = torch.cat([A, A0.to(A.device, A.dtype)], dim=0).contiguous()
        state[kb] = torch.cat([B, -B0.to(B.device, B.dtype)], dim=1).contiguous()
    # a LoRA-GA PeftModel's adapter configs are LoraConfigs (LoraGAConfig is one)
    plain = plain_lora_config(cast(LoraConfig, config), double_rank=True)
    plain.base_model_name_or_path = config.base_model_name_or_path
    _write_adapter(model, plain, state, save_directory, safe_serialization)


def _write_adapter(
    model: PeftModel,
    config: LoraConfig,
    state: dict[str, Tensor],
    path: str | os.PathLike[str],
    safe: bool,
) -> None:
    if not is_main_process():
        return
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    if safe:
        from safetensors.torch import save_file

        save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(state, path / "adapter_model.bin")
    config = dataclasses.replace(config)
    config.inference_mode = True
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = (
            getattr(model.base_model.model, "name_or_path", None) or None
        )
    config.save_pretrained(str(path))


def save_lora_ga_model(
    model: PeftModel, save_directory: str | os.PathLike[str], *, adapter_name: str = "default"
) -> None:
    """Save the LoRA-GA model as it is: the offset base model and the rank-r adapter (and its init factors).

    Layout: ``save_directory/base`` (a transformers checkpoint of the base model with ``W0'``; quantized
    bases are saved quantized) and ``save_directory/adapter`` (plain LoRA config, the current ``A``,
    ``B``, and ``lora_ga_init.safetensors`` with ``A0``, ``B0``). Load with :func:`load_lora_ga_model`.

    Raises:
        TypeError: not a ``PeftModel``, or its base model has no ``save_pretrained`` (not transformers).
    """
    model = _check_peft(model, "save_lora_ga_model")
    base = model.get_base_model()
    if not hasattr(base, "save_pretrained"):
        raise TypeError(
            f"save_lora_ga_model needs a transformers base model (with save_pretrained), got {type(base).__name__}"
        )
    root = Path(save_directory)
    config = model.peft_config[adapter_name]
    init: dict[str, Tensor] = {}
    for name, layer in _lora_layers(model, adapter_name).items():
        A0, B0 = _init_factors(layer, name, adapter_name)
        init[f"{name}.lora_A.weight"] = A0
        init[f"{name}.lora_B.weight"] = B0
    _write_adapter(
        model,
        plain_lora_config(cast(LoraConfig, config)),  # a LoraConfig, as above
        get_peft_model_state_dict(model, adapter_name=adapter_name),
        root / "adapter",
        True,
    )
    if is_main_process():
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in init.items()},
            str(root / "adapter" / INIT_FACTORS_FILE),
            metadata={"format": "pt"},
        )
        with _without_adapters(base):
            # checked above: a transformers model
            cast("PreTrainedModel", base).save_pretrained(str(root / "base"))


def _without_adapters(base: nn.Module) -> AbstractContextManager[None]:
    """Temporarily put every wrapped layer's original module back (LoRA layer -> its base layer,
    modules_to_save wrapper -> original module), so ``save_pretrained`` writes the base checkpoint with
    transformers' own logic (quantized layers included)."""
    from peft.utils.other import ModulesToSaveWrapper

    def choose(mod: nn.Module) -> nn.Module | None:
        if isinstance(mod, LoraLayer):
            return mod.get_base_layer()
        if isinstance(mod, ModulesToSaveWrapper):
            return cast(nn.Module, mod.original_module)
        return None

    return modules_replaced(base, choose)


def load_lora_ga_model(
    save_directory: str | os.PathLike[str],
    *,
    model_class: Any = None,
    is_trainable: bool = False,
    adapter_name: str = "default",
    **from_pretrained_kwargs: Any,
) -> PeftModel:
    """Load a model saved by :func:`save_lora_ga_model` (offset base + adapter + initial factors).

    Args:
        save_directory: the directory given to :func:`save_lora_ga_model`.
        model_class: the transformers class of the base (default: from ``base/config.json``'s
            ``architectures``).
        is_trainable: load the adapter trainable (to continue training).
        adapter_name: name of the adapter.
        **from_pretrained_kwargs: passed to the base model's ``from_pretrained`` (``device_map``, ...).
    """
    root = Path(save_directory)
    if not (root / "base").is_dir() or not (root / "adapter" / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{root} is not a save_lora_ga_model directory (needs base/ and adapter/adapter_config.json)"
        )
    if model_class is None:
        import transformers

        arch = transformers.AutoConfig.from_pretrained(str(root / "base")).architectures
        if not arch or not hasattr(transformers, arch[0]):
            raise ValueError(
                f"cannot tell the model class of {root / 'base'} (architectures={arch}); pass model_class="
            )
        model_class = getattr(transformers, arch[0])
    base = model_class.from_pretrained(str(root / "base"), **from_pretrained_kwargs)
    model = PeftModel.from_pretrained(
        base, str(root / "adapter"), adapter_name=adapter_name, is_trainable=is_trainable
    )
    init_file = root / "adapter" / INIT_FACTORS_FILE
    if init_file.is_file():
        from safetensors.torch import load_file

        init = load_file(str(init_file))
        for name, layer in _lora_layers(model, adapter_name).items():
            ka, kb = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
            if ka in init and kb in init:
                layer.__dict__.setdefault("_lora_ga_init", {})[adapter_name] = (init[ka], init[kb])
    return model
