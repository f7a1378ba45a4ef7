"""QLoRA from the command line: a bitsandbytes 4-bit / 8-bit base for the adapter methods.

Flags (transformers' ``BitsAndBytesConfig`` names, fields of
:class:`~loralab.runners.arguments.TrainArgs`): ``--load_in_4bit`` / ``--load_in_8bit``,
``--bnb_4bit_quant_type nf4|fp4``, ``--bnb_4bit_use_double_quant``, ``--bnb_4bit_compute_dtype``,
``--bnb_4bit_quant_storage`` (the codes' dtype; every one shards under ``--fsdp full_shard``, the
FSDP-QLoRA setting) and ``--merge_and_save``. This module turns them into what the entrypoints need:

- :func:`check_quantization_args`: refuses, before any model loads, contradictory or meaningless
  combinations (both 4 and 8 bit, a 4-bit sub-option without ``--load_in_4bit``), methods that
  train full weights (``full``, ``galore``, ``golore``: a quantized weight has no gradient), and
  launch modes that were not checked with a quantized base (``--deepspeed``);
- :func:`bnb_config` / :func:`quantized_load_kwargs`: the ``from_pretrained`` keyword arguments
  (``quantization_config=BitsAndBytesConfig(...)``, ``device_map`` on this process's device);
- :func:`prepare_quantized_model`: PEFT's ``prepare_model_for_kbit_training`` (every non-quantized
  fp16/bf16 parameter, norms included, to fp32; input gradients for gradient checkpointing), with
  gradient checkpointing only when asked;
- :func:`estimation_model`: the float copy of the same checkpoint LoRA-GA / LoRA-SB estimate their
  gradients on (block by block), holding the quantized model's own non-quantized tensors (a new
  classification head included);
- :func:`merge_and_save`: a dequantized merged model (``W = deq(Q(W0)) + ΔW``) that loads with
  ``AutoModel*.from_pretrained``.

Example:
    >>> from loralab.runners.methods import method_args
    >>> args = method_args("lora")
    >>> args.load_in_4bit, args.bnb_4bit_quant_type = True, None
    >>> cfg = bnb_config(args)  # doctest: +SKIP
    >>> cfg.bnb_4bit_quant_type  # doctest: +SKIP
    'nf4'
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import torch
from torch import nn

if TYPE_CHECKING:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import PreTrainedModel

__all__ = [
    "COMPUTE_DTYPES",
    "MERGED_DIR",
    "QUANT_TYPES",
    "base_state_dict",
    "bnb_config",
    "check_quantization_args",
    "estimation_dtype",
    "estimation_kwargs",
    "estimation_model",
    "is_quantized_run",
    "merge_and_save",
    "merged_model",
    "prepare_quantized_model",
    "quantized_load_kwargs",
]

logger = logging.getLogger(__name__)

ModelT = TypeVar("ModelT", bound=nn.Module)


class _DeltaLayer(Protocol):
    """A PEFT LoRA-type layer (LoRA, LoRA-SB): its adapter's ``ΔW`` in the base weight's layout."""

    def get_delta_weight(self, adapter: str) -> torch.Tensor: ...


QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
QUANT_STORAGES: dict[str, torch.dtype] = {
    "uint8": torch.uint8,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
_SUB_OPTIONS = (
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
)
MERGED_DIR = "merged"
"""``output_dir/merged``: where ``--merge_and_save`` writes the merged model."""


def is_quantized_run(args: Any) -> bool:
    """Whether ``args`` asks for a bitsandbytes base (``--load_in_4bit`` or ``--load_in_8bit``)."""
    return bool(getattr(args, "load_in_4bit", False) or getattr(args, "load_in_8bit", False))


def _flag(args: Any) -> str:
    return "--load_in_4bit" if getattr(args, "load_in_4bit", False) else "--load_in_8bit"


def check_quantization_args(args: Any) -> None:
    """Refuse meaningless quantization settings, naming the flag; fill the 4-bit defaults.

    Called by the entrypoints before the model loads (and again by :func:`bnb_config`). With
    ``--load_in_4bit``, unset sub-options become ``nf4`` (QLoRA's; transformers' own default is
    fp4), no double quantization, and the compute dtype of the weights (``--torch_dtype``, float32
    when the entrypoint has none), so ``run_config.json`` records what ran.

    Raises:
        ValueError: both ``--load_in_4bit`` and ``--load_in_8bit``; a ``--bnb_4bit_*`` option without
            ``--load_in_4bit``; a bad quant type / compute dtype; ``--deepspeed`` with a quantized
            base; ``--merge_and_save`` without ``--save_final_model`` or for a method without adapters or under ``--fsdp``.
        loralab.runners.methods.MethodError: a method that trains full weights on a quantized base.
    """
    from loralab.runners.methods import MethodError, get_method

    four, eight = (
        bool(getattr(args, "load_in_4bit", False)),
        bool(getattr(args, "load_in_8bit", False)),
    )
    if four and eight:
        raise ValueError(
            "--load_in_4bit and --load_in_8bit are exclusive: a base is quantized one way; give one of them"
        )
    if not four:
        given = [n for n in _SUB_OPTIONS if getattr(args, n, None) is not None]
        if given:
            raise ValueError(
                f"--{given[0]} only applies with --load_in_4bit"
                + (" (this run uses --load_in_8bit)" if eight else "")
                + f", got --{given[0]} {getattr(args, given[0])}"
            )
    else:
        if getattr(args, "bnb_4bit_quant_type", None) is None:
            args.bnb_4bit_quant_type = "nf4"
        if args.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(
                f"--bnb_4bit_quant_type must be one of {', '.join(QUANT_TYPES)}, got {args.bnb_4bit_quant_type!r}"
            )
        if getattr(args, "bnb_4bit_use_double_quant", None) is None:
            args.bnb_4bit_use_double_quant = False
        if getattr(args, "bnb_4bit_compute_dtype", None) is None:
            args.bnb_4bit_compute_dtype = getattr(args, "torch_dtype", None) or "float32"
        if args.bnb_4bit_compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"--bnb_4bit_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {args.bnb_4bit_compute_dtype!r}"
            )
        if getattr(args, "bnb_4bit_quant_storage", None) is None:
            args.bnb_4bit_quant_storage = "uint8"
        storage = args.bnb_4bit_quant_storage
        if storage not in QUANT_STORAGES:
            raise ValueError(
                f"--bnb_4bit_quant_storage must be one of {', '.join(QUANT_STORAGES)}, got {storage!r}"
            )
        from loralab.core.quant import fsdp2_shards_integer_storage

        if (
            getattr(args, "fsdp", None)
            and storage == "uint8"
            and not fsdp2_shards_integer_storage()
        ):
            raise ValueError(
                f"--fsdp with --load_in_4bit: FSDP2 in torch {torch.__version__} cannot shard 4-bit codes "
                "stored as uint8 (fixed in torch 2.13): pass --bnb_4bit_quant_storage bfloat16, or use "
                "torch >= 2.13"
            )
        if (
            getattr(args, "fsdp", None)
            and getattr(args, "bf16", False)
            and storage not in ("uint8", "bfloat16")
        ):
            # FSDP2's MixedPrecisionPolicy(param_dtype=bfloat16) casts float-stored codes as numbers
            # (loralab.core.quant.check_fsdp_quantized); integer codes are never cast
            raise ValueError(
                "--fsdp full_shard with --bf16 casts float parameters to bfloat16, which would corrupt "
                "4-bit codes stored as another float: use --bnb_4bit_quant_storage uint8 or bfloat16, "
                f"got --bnb_4bit_quant_storage {storage}"
            )
    method_name = getattr(args, "method", None)
    method = get_method(method_name) if method_name is not None else None
    if four or eight:
        if method is not None and not method.quantized_base:
            raise MethodError(
                f"--method {method.name} trains full weights, which a {_flag(args)} base does not have "
                "(bitsandbytes weights get no gradient): use an adapter method (lora, lora-fa, lora-pro, "
                f"lora-sb, lora-ga) or drop {_flag(args)}"
            )
        if getattr(args, "deepspeed", None) or (
            os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        ):
            raise ValueError(
                f"{_flag(args)} with DeepSpeed is not supported by the runners (not checked): launch with "
                "torchrun / accelerate launch (DDP) instead of --deepspeed"
            )
    if getattr(args, "merge_and_save", False):
        if not getattr(args, "save_final_model", True):
            raise ValueError(
                "--merge_and_save needs --save_final_model true (the merged model is written after final/)"
            )
        if method is not None and not method.has_adapter:
            raise ValueError(
                f"--merge_and_save merges adapters into the base; --method {method.name} has none "
                "(final/ already is the full model)"
            )
        if getattr(args, "fsdp", None):
            # the merge runs on the main process over the model's weights, which FSDP2 shards
            raise ValueError(
                "--merge_and_save cannot merge an FSDP2-sharded model (--fsdp full_shard): drop it and "
                "merge final/ afterwards in one process (loralab.runners.quantization.merge_and_save "
                "on PeftModel.from_pretrained(base, final))"
            )


def bnb_config(args: Any, skip_modules: list[str] | None = None) -> Any:
    """``transformers.BitsAndBytesConfig`` from the flags, or ``None`` without a quantization flag.

    ``skip_modules`` (``llm_int8_skip_modules``, used for 4-bit too) stay float: the runners pass a
    sequence classifier's new head there so it trains as ``modules_to_save``.
    """
    check_quantization_args(args)
    if not is_quantized_run(args):
        return None
    from transformers import BitsAndBytesConfig

    extra: dict[str, Any] = {"llm_int8_skip_modules": list(skip_modules)} if skip_modules else {}
    if args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, **extra)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bool(args.bnb_4bit_use_double_quant),
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[args.bnb_4bit_compute_dtype],
        bnb_4bit_quant_storage=QUANT_STORAGES[args.bnb_4bit_quant_storage],
        **extra,
    )


def quantized_load_kwargs(quantization_config: Any) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments for a quantized base (empty for ``None``).

    bitsandbytes quantizes while loading onto the device, so the whole model goes to this process's
    device: ``cuda:LOCAL_RANK`` (one copy per DDP process, the usual QLoRA layout) or the CPU.
    """
    if quantization_config is None:
        return {}
    if torch.cuda.is_available():
        device: Any = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        device = "cpu"
    return {"quantization_config": quantization_config, "device_map": {"": device}}


def prepare_quantized_model(model: ModelT, *, gradient_checkpointing: bool = False) -> ModelT:
    """PEFT's ``prepare_model_for_kbit_training`` on a freshly loaded quantized model (no-op otherwise).

    Freezes the base, casts every non-quantized fp16/bf16 parameter (norms, embeddings, heads) to
    fp32 as PEFT does, and with ``gradient_checkpointing`` turns it on (non-reentrant) with input
    gradients enabled. PEFT's own default turns checkpointing on; here it follows the flag.

    bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first no-grad forward in
    eval mode on CPUs with AVX512-BF16 (an evaluation during training); the lora-sb tests found that
    backward gives no gradient through a repacked layer, so training models keep the unpacked layout.
    """
    from loralab.core.quant import quantized_layer_names

    names = quantized_layer_names(model)
    if not names:
        return model
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
    )
    for name in names:
        layer = model.get_submodule(name)
        if hasattr(layer, "support_avx512bf16_for_cpu"):  # bitsandbytes' Linear4bit
            cast("bnb.nn.Linear4bit", layer).support_avx512bf16_for_cpu = False
    return model


def estimation_dtype(args: Any) -> torch.dtype:
    """The float dtype of the run's weights (``--torch_dtype``; float32 where the entrypoint has none):
    the dtype of the float copy for gradient estimation and of the merged model."""
    name = getattr(args, "torch_dtype", None) or "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"--torch_dtype must be float32 or bfloat16, got {name!r}")
    return COMPUTE_DTYPES[name]


def _is_bnb_param(t: torch.Tensor) -> bool:
    return type(t).__name__ in ("Params4bit", "Int8Params")


def estimation_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module | None:
    """A float model of ``model``'s checkpoint to estimate LoRA-GA / LoRA-SB gradients on, or ``None``
    when ``model`` has no quantized layer.

    The quantized layers' weights come from the float checkpoint (``config._name_or_path``; the
    dequantized weights when it is a pre-quantized checkpoint:
    :func:`loralab.core.quant.load_float_model_for_estimation`); every other tensor is copied from
    ``model`` itself, so a freshly initialised head (GLUE's classifier) is the one that will train.
    """
    from loralab.core.quant import load_float_model_for_estimation, quantized_layer_names

    if not quantized_layer_names(model):
        return None
    float_model = load_float_model_for_estimation(model, torch_dtype=dtype)
    own: dict[str, torch.Tensor] = dict(float_model.named_parameters())
    own.update(dict(float_model.named_buffers()))
    copied = 0
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if _is_bnb_param(t) or name not in own or own[name].shape != t.shape:
                continue
            own[name].copy_(t.to(own[name].dtype))
            copied += 1
    logger.info(
        "float copy of %s for gradient estimation (%s); %d non-quantized tensors copied from the quantized model",
        getattr(model.config, "_name_or_path", "?"),
        dtype,
        copied,
    )
    return float_model.eval()


def estimation_kwargs(model: nn.Module, args: Any) -> dict[str, Any]:
    """The ``estimation_model`` / ``offload`` keywords of ``get_lora_ga_model`` / ``get_lora_sb_model``:
    on a quantized base, the float copy of :func:`estimation_model` streamed block by block (the
    LoRA-GA seed's quantized flow); on a float base, estimate on ``model`` itself."""
    float_model = estimation_model(model, estimation_dtype(args))
    return {"estimation_model": float_model, "offload": float_model is not None}


def _trained_modules_in_place(base: nn.Module, adapter_name: str) -> AbstractContextManager[None]:
    """Temporarily put each LoRA layer's base layer and each ``modules_to_save`` wrapper's *trained*
    copy where the wrappers are, so the base model looks like a plain transformers model."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import ModulesToSaveWrapper

    from loralab.core.modules import modules_replaced

    def choose(mod: nn.Module) -> nn.Module | None:
        if isinstance(mod, ModulesToSaveWrapper):
            return cast(nn.Module, mod.modules_to_save[adapter_name])
        if isinstance(mod, BaseTunerLayer):
            return mod.get_base_layer()
        return None

    return modules_replaced(base, choose)


def base_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The transformers state dict of a PEFT ``model``'s base, from the PEFT model's whole
    ``state_dict`` (what a sharding engine gathers): adapter tensors dropped, each LoRA layer's base
    layer and each ``modules_to_save`` wrapper's *trained* copy under the plain module's name, and each
    4-bit layer's quantization statistics added (bitsandbytes' packed ``weight.absmax`` / ``weight.
    quant_map`` / ... entries, as ``Linear4bit`` saves them).

    FSDP2 all-gathers a sharded 4-bit layer's codes as a plain tensor; the statistics stay on the
    layer (``layer.quant_state``, the same on every rank: :func:`loralab.core.quant.
    check_fsdp_quantized`), so they are read from there.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from loralab.core.testing import tiny_llama
        >>> peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
        >>> sd = base_state_dict(peft_model.state_dict(), peft_model)
        >>> "model.layers.0.self_attn.q_proj.weight" in sd, any("lora" in k for k in sd)
        (True, False)
    """
    from loralab.core.modules import layer_kind
    from loralab.core.quant import quantized_layer_names

    adapter_parts = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.")
    prefix = "base_model.model."
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            raise ValueError(f"not a PEFT model's state dict: {key!r} lacks the prefix {prefix!r}")
        name = key[len(prefix) :]
        if any(part in name for part in adapter_parts) or ".original_module." in name:
            continue
        name = name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter_name}.", ".")
        if ".modules_to_save." in name:  # another adapter's trained copy
            continue
        out[name] = value
    base = cast("PeftModel", model).get_base_model()
    with _trained_modules_in_place(base, adapter_name):
        for name in quantized_layer_names(base):
            layer = base.get_submodule(name)
            if layer_kind(layer) != "linear4bit":
                continue
            state = getattr(layer, "quant_state", None) or getattr(
                layer.weight, "quant_state", None
            )
            if state is None:
                raise ValueError(f"4-bit layer {name} has no quantization statistics to save")
            for k, v in state.as_dict(packed=True).items():
                out[f"{name}.weight.{k}"] = v
    return out


def merged_model(
    model: nn.Module, dtype: torch.dtype = torch.float32, adapter_name: str = "default"
) -> nn.Module:
    """A plain float transformers model computing what the PEFT ``model`` computes: every quantized
    layer dequantized, every adapter's ``ΔW`` (``get_delta_weight``: LoRA, LoRA-SB's ``s·B·R·A``)
    added, trained ``modules_to_save`` copies in place. ``model`` is left as it is.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from loralab.core.testing import tiny_llama
        >>> peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
        >>> type(merged_model(peft_model)).__name__
        'LlamaForCausalLM'
    """
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    from loralab.core.quant import dequantized_copy

    if not isinstance(model, PeftModel):
        raise TypeError(f"merged_model expects a PeftModel, got {type(model).__name__}")
    base = model.get_base_model()
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, mod in base.named_modules():
            if isinstance(mod, BaseTunerLayer) and adapter_name in getattr(mod, "lora_A", {}):
                delta = cast(_DeltaLayer, mod).get_delta_weight(adapter_name)  # it has lora_A
                deltas[name] = delta.detach().float().cpu()
    with _trained_modules_in_place(base, adapter_name):
        out = dequantized_copy(base, dtype)
    # PEFT's bookkeeping on the wrapped model: the merged copy is a plain transformers model
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        out.__dict__.pop(attr, None)
    with torch.no_grad():
        for name, delta in deltas.items():
            w = cast(torch.Tensor, out.get_submodule(name).weight)  # an adapted Linear-type layer
            if tuple(w.shape) != tuple(delta.shape):  # pragma: no cover - PEFT returns the layout
                raise RuntimeError(
                    f"merge: delta of {name} is {tuple(delta.shape)}, weight {tuple(w.shape)}"
                )
            w.copy_((w.float().cpu() + delta).to(w.device, w.dtype))
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def merge_and_save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    tokenizer: Any = None,
    adapter_name: str = "default",
) -> Path:
    """Write :func:`merged_model` with ``save_pretrained`` (safetensors) to ``path``; returns it.

    On a quantized base the result is the *dequantized* model plus the adapters: it reproduces the
    trained model's logits up to bitsandbytes' kernel numerics (4-bit: the matmul dequantizes the
    same weights; 8-bit: LLM.int8 also quantizes the activations row-wise, which the float model
    does not). It needs the memory of one float copy of the model (on the CPU).
    """
    path = Path(path)
    out = merged_model(model, dtype, adapter_name)
    # merged_model: a copy of the PEFT model's transformers base
    cast("PreTrainedModel", out).save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    (path / "README.md").write_text(
        "# Merged model\n\nWritten by `--merge_and_save`: the base model with the trained adapter added "
        "to its weights"
        + (
            ", computed from the dequantized bitsandbytes weights (a float model: load it with "
            "`AutoModel*.from_pretrained(path)`; it matches the quantized run's logits up to "
            "bitsandbytes' kernel numerics)"
            # merged_model checked that model is a PeftModel
            if getattr(
                cast("PeftModel", model).get_base_model().config, "quantization_config", None
            )
            is not None
            else ""
        )
        + ".\n"
    )
    logger.info("merged model written to %s", path)
    return path
