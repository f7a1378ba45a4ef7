"""Float copies of a quantized model for gradient estimation: a float model of the same checkpoint,
a dequantized copy of a loaded one, or float stand-ins for some of its layers inside a block.

Example:
    >>> from loralab.core.testing import tiny_llama
    >>> with float_targets(tiny_llama(), ["model.layers.0.self_attn.q_proj"]) as swapped:
    ...     swapped  # a float model: nothing to swap
    {}
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from loralab.core.modules import get_module, layer_kind, replace_module
from loralab.core.quant.layers import (
    dequantize_weight,
    is_quantized,
    quant_config_of,
    quantized_layer_names,
)

logger = logging.getLogger(__name__)


def dequantized_copy(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A deep copy of ``model`` with every quantized layer replaced by a float ``nn.Linear``.

    The copy's weights are exactly the *dequantized* weights, so gradients estimated on it are the
    gradients at the quantized model's own point (what the quantized model will train from). Use it
    when no float checkpoint is available; it holds a full float copy of the model in memory.
    """
    names = quantized_layer_names(model)
    # bitsandbytes' Linear4bit and Linear8bitLt both subclass nn.Linear
    qmods = {n: cast(nn.Linear, get_module(model, n)) for n in names}
    # deepcopy of bitsandbytes parameters is supported but wasteful; build the float layers first
    # and keep the quantized ones out of the copy.
    memo: dict[int, Any] = {}
    floats: dict[str, nn.Linear] = {}
    for n, m in qmods.items():
        lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        lin.weight = nn.Parameter(dequantize_weight(m, dtype), requires_grad=m.weight.requires_grad)
        if m.bias is not None:
            lin.bias = nn.Parameter(
                m.bias.detach().to(dtype).clone(), requires_grad=m.bias.requires_grad
            )
        floats[n] = lin
        memo[id(m)] = lin  # deepcopy puts the float layer wherever the quantized one was
    out = copy.deepcopy(model, memo)
    for n, lin in floats.items():
        if get_module(out, n) is not lin:  # pragma: no cover - deepcopy honoured the memo
            replace_module(out, n, lin)
    config = getattr(out, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:  # pragma: no cover
            config.quantization_config = None
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if attr in vars(out):
            setattr(out, attr, False)
    if hasattr(out, "hf_quantizer"):
        setattr(out, "hf_quantizer", None)  # noqa: B010 (nn.Module's attributes are typed Tensor | Module)
    if "quantization_method" in vars(out):
        setattr(out, "quantization_method", None)  # noqa: B010
    # nn.Module.to, not PreTrainedModel.to: transformers refuses dtype casts of models it loaded in bnb
    nn.Module.to(out, dtype)
    return out


class _FloatCopy(nn.Linear):
    """A float stand-in for a bitsandbytes layer: computes in its weight's dtype and returns the
    input's dtype, as ``Linear4bit`` (input cast to ``compute_dtype``) and ``Linear8bitLt`` do, so it
    fits wherever the quantized layer did (e.g. float32 activations after PEFT's
    ``prepare_model_for_kbit_training`` into a bfloat16-compute layer)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@contextmanager
def float_targets(
    model: nn.Module, names: Iterable[str], dtype: torch.dtype | None = None
) -> Iterator[dict[str, nn.Linear]]:
    """Within the block, the quantized layers among ``names`` are float ``nn.Linear`` copies (in place).

    Each bitsandbytes layer is swapped for an ``nn.Linear`` holding its *dequantized* weight (the
    point the quantized model trains from) in ``dtype`` (default: the layer's compute dtype, else the
    dtype it was quantized from, else float32), which computes in that dtype and returns its input's
    dtype (as the bitsandbytes layer does), so code that runs ``model`` itself (a user's training step) produces full-weight
    gradients for them; the quantized layers are put back on exit, unchanged. Holds the float
    copies of those layers only (not of the whole model). Yields ``{name: float layer}``.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> model = tiny_llama()
        >>> with float_targets(model, ["model.layers.0.self_attn.q_proj"]) as swapped:
        ...     swapped  # a float model: nothing to swap
        {}
    """
    swapped: dict[str, tuple[nn.Module, nn.Linear]] = {}
    try:
        for name in names:
            m = get_module(model, name)
            if not (layer_kind(m) in ("linear4bit", "linear8bit") and is_quantized(m)):
                continue
            q = cast(nn.Linear, m)  # bitsandbytes' layers subclass nn.Linear
            dt = dtype or getattr(q, "compute_dtype", None) or quant_config_of(q).dtype
            if dt is None or not dt.is_floating_point:
                dt = torch.float32
            weight = dequantize_weight(q, dt)
            lin = _FloatCopy(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
            lin.weight = nn.Parameter(weight, requires_grad=False)
            if q.bias is not None:
                lin.bias = nn.Parameter(q.bias.detach().to(dt), requires_grad=False)
            replace_module(model, name, lin)
            swapped[name] = (q, lin)
        yield {n: lin for n, (_, lin) in swapped.items()}
    finally:
        for name, (original, _) in swapped.items():
            replace_module(model, name, original)


def load_float_model_for_estimation(
    name_or_path: str | os.PathLike[str] | nn.Module,
    quantization_config: Any = None,
    *,
    torch_dtype: torch.dtype = torch.float32,
    model_class: Any = None,
    source: Literal["auto", "checkpoint", "dequantize"] = "auto",
    **from_pretrained_kwargs: Any,
) -> nn.Module:
    """A float model of the same checkpoint as a (to-be-)quantized model, for gradient estimation.

    The seed's QLoRA flow: ``G = estimate_gradients(float_model, ..., offload=True)`` on this float
    model, then load the quantized model (same ``name_or_path`` + ``quantization_config``) and
    initialise its adapters from ``G``. This function is the first step.

    Args:
        name_or_path: a checkpoint (hub id or local directory), or an already loaded quantized
            model (its ``config._name_or_path`` names the checkpoint).
        quantization_config: the ``BitsAndBytesConfig`` the quantized model uses. Only checked here
            (the float model is loaded *without* it); it must be a bitsandbytes config.
        torch_dtype: dtype of the float weights (float32 by default; bfloat16 halves the memory).
        model_class: the ``transformers`` class to load with (default: the quantized model's class,
            else ``AutoModelForCausalLM``).
        source: ``"checkpoint"`` loads float weights from ``name_or_path``; ``"dequantize"`` (a
            quantized model only) returns :func:`dequantized_copy`; ``"auto"`` loads the checkpoint
            when it is a float checkpoint and otherwise dequantizes.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``revision``, ``trust_remote_code``, …).

    Returns:
        The float model, on the CPU, in eval mode (pass ``offload=True`` to :func:`estimate_gradients`
        to stream its blocks through an accelerator).

    Example:
        >>> from transformers import BitsAndBytesConfig
        >>> bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
        >>> float_model = load_float_model_for_estimation("path/to/llama", bnb_config)  # doctest: +SKIP
        >>> grads = estimate_gradients(float_model, batches, offload=True)  # doctest: +SKIP
    """
    if source not in ("auto", "checkpoint", "dequantize"):
        raise ValueError(f"source must be 'auto', 'checkpoint' or 'dequantize', got {source!r}")
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise ValueError(f"torch_dtype must be a floating-point torch.dtype, got {torch_dtype!r}")
    if quantization_config is not None:
        _check_bnb_config(quantization_config)
    if isinstance(name_or_path, nn.Module):
        qmodel = name_or_path
        if not quantized_layer_names(qmodel):
            raise ValueError(
                f"{type(qmodel).__name__} has no quantized bitsandbytes layer: it already is a float model, "
                "estimate on it directly"
            )
        path = getattr(getattr(qmodel, "config", None), "_name_or_path", "") or ""
        if source == "dequantize" or (source == "auto" and not _is_float_checkpoint(path)):
            logger.info("float copy for estimation: dequantizing the quantized model's weights")
            return dequantized_copy(qmodel, torch_dtype).eval()
        if not path:
            raise ValueError(
                "the quantized model has no config._name_or_path to reload a float copy from; use source='dequantize'"
            )
        model_class = model_class or type(qmodel)
    else:
        if source == "dequantize":
            raise ValueError("source='dequantize' needs a loaded quantized model, got a path")
        path = os.fspath(name_or_path)
        if not _is_float_checkpoint(path):
            raise ValueError(
                f"{path!r} is a pre-quantized checkpoint (its config has a quantization_config): there are no float "
                "weights to load. Load the quantized model and pass it here (source='dequantize')"
            )
    if model_class is None:
        from transformers import AutoModelForCausalLM

        model_class = AutoModelForCausalLM
    kwargs = {dtype_kwarg(): torch_dtype, "device_map": "cpu", **from_pretrained_kwargs}
    kwargs.pop("quantization_config", None)
    logger.info("loading float copy of %s in %s for gradient estimation", path, torch_dtype)
    model = model_class.from_pretrained(path, **kwargs)
    return model.eval()


def dtype_kwarg() -> str:
    """The name of ``from_pretrained``'s weight-dtype keyword in the installed transformers.

    transformers 4.56 renamed ``torch_dtype`` to ``dtype``: this returns ``"dtype"`` from 4.56 on
    and ``"torch_dtype"`` before, so one call works across the supported versions.

    Example:
        >>> import torch
        >>> from transformers import AutoModelForCausalLM
        >>> dtype_kwarg() in ("dtype", "torch_dtype")
        True
        >>> model = AutoModelForCausalLM.from_pretrained(path, **{dtype_kwarg(): torch.float32})  # doctest: +SKIP
    """
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _check_bnb_config(cfg: Any) -> None:
    method = getattr(cfg, "quant_method", None)
    method = getattr(method, "value", method)
    if isinstance(cfg, dict):
        method = cfg.get(
            "quant_method",
            "bitsandbytes" if cfg.get("load_in_4bit") or cfg.get("load_in_8bit") else None,
        )
    if method != "bitsandbytes":
        raise ValueError(
            f"quantization_config must be a bitsandbytes config (BitsAndBytesConfig), got {type(cfg).__name__} ({method!r})"
        )


def _is_float_checkpoint(path: str) -> bool:
    """False when the checkpoint's own config carries a quantization_config (pre-quantized weights)."""
    if not path:
        return False
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return False
    return getattr(cfg, "quantization_config", None) is None
