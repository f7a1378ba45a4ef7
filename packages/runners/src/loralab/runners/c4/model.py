"""LLaMA model configs for C4 pre-training (the GaLore / GoLore shapes) and building a model from one.

The shapes are the published ones (GaLore, arXiv 2403.03507, Table 11; GoLore, arXiv 2410.11289,
App. C; jiaweizzhao/GaLore ``configs/``). They are kept here as data so the wheel carries them; the
same configs ship as JSON under ``packages/runners/configs/llama_c4/`` (a test checks they agree).

Two deliberate differences from the reference JSON files, both HF-facing:

- ``max_position_embeddings`` is set (the reference writes ``max_sequence_length``, which
  ``LlamaConfig`` ignores, so its models silently got the 2048 default);
- ``pad_token_id`` is 0 (T5's ``<pad>``) instead of ``-1``: with ``-1`` HF turns the *last*
  vocabulary row into the embedding's ``padding_idx`` (zero and never trained).

Example:
    >>> from loralab.runners.c4.model import build_model
    >>> model = build_model("llama_20m", vocab_size=260)
    >>> model.config.hidden_size
    256
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "MODEL_CONFIGS",
    "build_model",
    "check_method_shapes",
    "count_parameters",
    "load_model_config",
]

logger = logging.getLogger(__name__)

_COMMON: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "use_cache": False,
    "vocab_size": 32000,
}


def _shape(hidden: int, inter: int, layers: int, heads: int, max_pos: int = 1024) -> dict[str, Any]:
    return dict(
        _COMMON,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
    )


MODEL_CONFIGS: dict[str, dict[str, Any]] = {
    "llama_20m": _shape(256, 688, 4, 4),
    "llama_60m": _shape(512, 1376, 8, 8),
    "llama_130m": _shape(768, 2048, 12, 12),
    "llama_350m": _shape(1024, 2736, 24, 16),
    "llama_1b": _shape(2048, 5461, 24, 32),
    "llama_7b": _shape(4096, 11008, 32, 32, max_pos=2048),
}
"""Name → ``LlamaConfig`` fields of the GaLore/GoLore C4 models (vocab 32000 = T5's tokenizer)."""


def load_model_config(name_or_path: str | os.PathLike[str], **overrides: Any):
    """A ``LlamaConfig`` from a preset name (``llama_60m``) or a JSON file / model directory.

    ``overrides`` (e.g. ``vocab_size``) replace fields; unknown preset names and files that are not
    LLaMA configs raise ``ValueError`` naming ``--model_config``.
    """
    from transformers import LlamaConfig

    key = str(name_or_path)
    if key in MODEL_CONFIGS:
        fields = dict(MODEL_CONFIGS[key])
    else:
        path = Path(key)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"--model_config {key!r} is neither a preset ({', '.join(MODEL_CONFIGS)}) nor an existing JSON file / model directory"
            )
        with open(path) as fh:
            fields = json.load(fh)
        if fields.get("model_type", "llama") != "llama":
            raise ValueError(
                f"--model_config {key!r}: model_type is {fields.get('model_type')!r}; only LLaMA configs are supported"
            )
        if "max_sequence_length" in fields and "max_position_embeddings" not in fields:
            # the GaLore/ReLoRA JSON files name it max_sequence_length, which LlamaConfig ignores
            fields["max_position_embeddings"] = fields["max_sequence_length"]
        if fields.get("pad_token_id") == -1:
            logger.warning(
                "--model_config %s has pad_token_id=-1 (the reference files): using 0 so the last vocabulary row stays trainable",
                key,
            )
            fields["pad_token_id"] = 0
    fields = {
        k: v for k, v in fields.items() if k not in ("transformers_version", "max_sequence_length")
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields.pop("model_type", None)
    return LlamaConfig(**fields)


def build_model(
    name_or_path: str | os.PathLike[str],
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` from :func:`load_model_config`, seeded.

    The caller's RNG is left untouched (the model is built under ``torch.random.fork_rng``).
    """
    from transformers import LlamaForCausalLM

    config = load_model_config(name_or_path, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    # transformers' decorator on PreTrainedModel.to hides its signature from the checker
    return model.to(dtype)  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def check_method_shapes(
    name_or_path: str | os.PathLike[str], method: Any, method_args: Any
) -> None:
    """``method.check_model`` (e.g. rank <= the narrowest target layer's width) on the config's model
    built on the ``meta`` device: shapes only, nothing allocated, before the real model loads."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        meta = LlamaForCausalLM(load_model_config(name_or_path))
    method.check_model(meta, method_args)
