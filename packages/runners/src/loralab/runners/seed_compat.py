"""The LoRA-GA seed's example helpers (``examples/utils.py`` and ``examples/data.py`` of
Outsider565/LoRA-GA), so its MetaMathQA example runs with only its import lines changed.

- :func:`initialize_text_to_text_model` ``(model_name, model_type, dtype, tokenizer=None,
  flash_attention=False)``: a causal LM (``"CausalLM"``) or seq2seq model (``"ConditionalGeneration"``) in
  ``fp32`` / ``bf16`` / ``int8`` / ``nf4`` and its tokenizer (pad = eos when missing).
- :func:`transform_dataset` ``(model_type, tokenizer, dataset, max_length)``: an on-the-fly tokenizing
  transform of ``{"x", "y"}`` rows (causal LM: ``x + " " + y + eos`` with the loss on ``y`` only;
  seq2seq: ``x`` in, ``y`` as labels), batches right-padded.
- :data:`DATASET_MAP` ``["meta_math"]()``: ``(train, eval, eval)`` ``{"x": "Q: …\\nA: ", "y": …}`` rows of
  MetaMathQA's GSM-derived examples shorter than ``max_tokens`` tokens, the answer line cut off, as the seed
  builds them. Offline: set ``LORALAB_METAMATH_FILE`` to a local MetaMathQA json/jsonl file and
  ``LORALAB_METAMATH_TOKENIZER`` to the tokenizer used for the length filter (the seed uses
  ``meta-llama/Llama-2-7b-hf``, the default here too); ``DATASET_MAP["gsm8k"]()`` likewise
  (``LORALAB_GSM8K_FILE``).

Differences from the seed, on purpose: bad arguments raise ``ValueError`` naming the argument (the seed
asserts or prints); no pickle cache in ``./data_cache``; the seed's ``dataset.shuffle(seed=42)`` discards its
result, so its order is the file's order, kept here.

Example (the seed's ``float_llama2-7b_metamath.py``, imports changed)::

    from loralab.core.targets import find_all_linear_modules
    from loralab.lora_ga import LoraGAConfig, estimate_gradient, LoraGAContext
    from loralab.runners.seed_compat import DATASET_MAP, initialize_text_to_text_model, transform_dataset

    model, tokenizer = initialize_text_to_text_model("meta-llama/Llama-2-7b-hf", "CausalLM", "bf16")
    peft_config = LoraGAConfig(target_modules=find_all_linear_modules(model=model), r=32, lora_alpha=8)
    train_set, val_set, _ = DATASET_MAP["meta_math"]()
    temp_set = train_set.select(range(peft_config.bsz * peft_config.iters))
    transform_dataset(model_type="CausalLM", dataset=temp_set, tokenizer=tokenizer, max_length=peft_config.max_length)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from loralab.runners.data import dtype_kwargs

__all__ = [
    "DATASET_MAP",
    "MODEL_TYPES",
    "causal_lm_encode",
    "initialize_text_to_text_model",
    "load_gsm8k",
    "load_meta_math",
    "seq2seq_encode",
    "transform_dataset",
]

logger = logging.getLogger(__name__)

MODEL_TYPES = ("CausalLM", "ConditionalGeneration")
DTYPES = ("fp32", "bf16", "int8", "nf4")
METAMATH_FILE_ENV, METAMATH_TOKENIZER_ENV, GSM8K_FILE_ENV = (
    "LORALAB_METAMATH_FILE",
    "LORALAB_METAMATH_TOKENIZER",
    "LORALAB_GSM8K_FILE",
)
SEED_TOKENIZER = "meta-llama/Llama-2-7b-hf"


def _check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")


def initialize_text_to_text_model(
    model_name: str,
    model_type: str,
    dtype: str,
    tokenizer: str | None = None,
    flash_attention: bool = False,
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` as the seed loads them; ``int8`` / ``nf4`` through bitsandbytes
    (nf4: double quantization, bf16 compute, as the seed). A tokenizer without eos gets ``<|endoftext|>``
    (embeddings resized); pad defaults to eos."""
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        BitsAndBytesConfig,
    )

    _check_model_type(model_type)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cls = AutoModelForCausalLM if model_type == "CausalLM" else AutoModelForSeq2SeqLM
    kw: dict[str, Any] = {}
    if flash_attention:
        kw["attn_implementation"] = "flash_attention_2"
    if dtype in ("fp32", "bf16"):
        kw.update(dtype_kwargs(torch.float32 if dtype == "fp32" else torch.bfloat16))
    elif dtype == "int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)
    else:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )
    if "quantization_config" in kw and not torch.cuda.is_available():
        # bitsandbytes quantizes on the CPU too, when told to place it there
        kw["device_map"] = "cpu"
    model = cls.from_pretrained(model_name, **kw)
    tok = AutoTokenizer.from_pretrained(tokenizer or model_name)
    if tok.eos_token is None:
        tok.add_special_tokens({"eos_token": "<|endoftext|>"})
        model.resize_token_embeddings(len(tok))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def causal_lm_encode(
    batch: dict[str, list[str]], tokenizer: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """``x + " " + y + eos`` right-padded; labels -100 on the ``x`` tokens and on padding (the seed's
    ``causalLMEncode``)."""
    texts = [x + " " + y + tokenizer.eos_token for x, y in zip(batch["x"], batch["y"])]
    enc = tokenizer(
        texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    labels = enc["input_ids"].clone()
    for i, x in enumerate(batch["x"]):
        n = len(tokenizer(x)["input_ids"])
        if n >= max_length:
            logger.warning(
                "prompt of %d tokens >= max_length %d: no response token is trained on",
                n,
                max_length,
            )
        labels[i, :n] = -100
    labels[enc["attention_mask"] == 0] = -100
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": labels,
    }


def seq2seq_encode(
    batch: dict[str, list[str]], tokenizer: Any, max_length: int | None
) -> dict[str, torch.Tensor]:
    """``x`` as the encoder input, ``y`` as labels with their mask (the seed's ``SeqToSeqEncode``; padded
    label positions are set to -100, which the seed leaves as pad ids by default)."""
    inputs = tokenizer(
        batch["x"], return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    outputs = tokenizer(
        batch["y"], return_tensors="pt", padding=True, truncation=True, max_length=max_length
    )
    labels = outputs["input_ids"].masked_fill(outputs["attention_mask"] == 0, -100)
    return {
        "input_ids": inputs["input_ids"],
        "attention_mask": inputs["attention_mask"],
        "labels": labels,
        "decoder_attention_mask": outputs["attention_mask"],
    }


def transform_dataset(model_type: str, tokenizer: Any, dataset: Any, max_length: int) -> Any:
    """Attach the tokenizing transform to ``dataset`` (a ``datasets.Dataset`` of ``x``/``y``) in place; returned."""
    _check_model_type(model_type)
    missing = [c for c in ("x", "y") if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"transform_dataset: the dataset lacks column(s) {', '.join(missing)} (has: {', '.join(dataset.column_names)})"
        )
    encode: Callable[..., dict[str, torch.Tensor]] = (
        causal_lm_encode if model_type == "CausalLM" else seq2seq_encode
    )
    dataset.set_transform(lambda batch: encode(batch, tokenizer, max_length))
    return dataset


def _rows(hub_name: str, config: str | None, env: str) -> Any:
    import datasets

    path = os.environ.get(env)
    if path:
        from loralab.runners.data import load_split

        return load_split(None, None, "train", path, arg=env)
    return datasets.load_dataset(hub_name, config, split="train")


def load_meta_math(
    max_tokens: int = 512, *, num_train: int = 100_000, num_eval: int = 10_000
) -> tuple[Any, Any, Any]:
    """The seed's ``load_meta_math``: GSM-type MetaMathQA rows whose ``"Q: {query}\\nA: " + " " + response``
    (answer line cut) is shorter than ``max_tokens`` tokens; the first ``num_train`` train, the next
    ``num_eval`` eval. Returns ``(train, eval, eval)``."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from loralab.runners.data import require_columns

    ds = _rows("meta-math/MetaMathQA", None, METAMATH_FILE_ENV)
    require_columns(
        ds,
        ["query", "response", "type"],
        os.environ.get(METAMATH_FILE_ENV) or "meta-math/MetaMathQA",
    )
    tokenizer = AutoTokenizer.from_pretrained(
        os.environ.get(METAMATH_TOKENIZER_ENV, SEED_TOKENIZER)
    )
    train: list[dict[str, str]] = []
    evaluation: list[dict[str, str]] = []
    for row in ds:
        ex = {"x": f"Q: {row['query']}\nA: ", "y": row["response"].split("\nThe answer is:")[0]}
        if (
            "GSM" not in row["type"]
            or len(tokenizer(ex["x"] + " " + ex["y"])["input_ids"]) >= max_tokens
        ):
            continue
        if len(train) < num_train:
            train.append(ex)
        elif len(evaluation) < num_eval:
            evaluation.append(ex)
        else:
            break
    if not train:
        raise ValueError(f"meta_math: no GSM-type example shorter than max_tokens={max_tokens}")
    ev = Dataset.from_list(evaluation) if evaluation else Dataset.from_dict({"x": [], "y": []})
    return Dataset.from_list(train), ev, ev


def load_gsm8k() -> tuple[Any, Any, Any]:
    """The seed's ``load_gsm8k``: ``{"x": "Q: {question}\\nA: ", "y": answer}``; ``(train, test, test)``.
    With ``LORALAB_GSM8K_FILE`` the one local file serves as both splits."""
    import datasets

    def fmt(ds: Any) -> Any:
        return ds.map(lambda e: {"x": f"Q: {e['question']}\nA: ", "y": e["answer"]})

    path = os.environ.get(GSM8K_FILE_ENV)
    if path:
        ds = fmt(_rows("openai/gsm8k", "main", GSM8K_FILE_ENV))
        return ds, ds, ds
    d = datasets.load_dataset("openai/gsm8k", "main")
    return fmt(d["train"]), fmt(d["test"]), fmt(d["test"])


DATASET_MAP: dict[str, Callable[..., tuple[Any, Any, Any]]] = {
    "meta_math": load_meta_math,
    "gsm8k": load_gsm8k,
}
"""The seed's ``data.DATASET_MAP`` entries the LoRA-GA examples use."""
