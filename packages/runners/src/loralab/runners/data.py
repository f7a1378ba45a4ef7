"""Datasets from the hub (``datasets.load_dataset(name)``) or local csv/json/jsonl/parquet files, column
checks that name the file and the missing column, and padding collators.

Example:
    >>> from loralab.runners.data import pad_collate
    >>> batch = pad_collate(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
    >>> batch["attention_mask"].tolist()
    [[1, 1, 1], [1, 0, 0]]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from loralab.core.quant import dtype_kwarg
from loralab.runners.preflight import check_data_file

__all__ = ["dtype_kwargs", "load_split", "pad_collate", "require_columns", "take"]


def dtype_kwargs(dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load the weights in ``dtype``.

    Always pass one: transformers 5 loads a checkpoint in the dtype it was *saved* in by default, so
    an fp16 checkpoint would be trained with fp16 weights and optimizer states (AdamW's eps = 1e-8
    is 0 in fp16: the first steps divide by zero). Training keeps fp32 weights; ``--bf16`` autocasts.
    transformers >= 4.56 calls the argument ``dtype`` (``torch_dtype`` before):
    :func:`loralab.core.quant.dtype_kwarg` picks the name.

    Raises:
        TypeError: ``dtype`` is not a ``torch.dtype`` (e.g. the string ``"fp16"``).
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype_kwargs: dtype must be a torch.dtype (e.g. torch.float32), got {dtype!r}"
        )
    return {dtype_kwarg(): dtype}


def load_pretrained(auto_class: Any, path: str, *, on_meta: bool = False, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained(path, **kwargs)``; with ``on_meta`` the same model built from its
    config on the meta device, no weight read (FSDP2's rank-0 loading: every other rank receives its
    shards from rank 0, :class:`loralab.runners.loop.fsdp2_engine.FSDP2Engine`). The dtype keyword goes to
    the model, the others (``num_labels``) to the config; quantization is not for the meta path.

    Example:
        >>> # load_pretrained(AutoModelForCausalLM, path, on_meta=True, **dtype_kwargs())  # no weights
    """
    if not on_meta:
        return auto_class.from_pretrained(path, **kwargs)
    from transformers import AutoConfig

    if "quantization_config" in kwargs:
        raise ValueError("load_pretrained: a quantized model is not built on the meta device")
    model_kwargs = {k: kwargs.pop(k) for k in (dtype_kwarg(),) if k in kwargs}
    config = AutoConfig.from_pretrained(path, **kwargs)
    with torch.device("meta"):
        return auto_class.from_config(config, **model_kwargs)


_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def load_split(
    name: str | None, config: str | None, split: str, data_file: str | None, *, arg: str
) -> Any:
    """A ``datasets.Dataset``: ``data_file`` when given (csv/tsv/json/jsonl/parquet), else the hub's ``split``.

    ``arg`` names the command-line flag in error messages (``--train_file``).
    """
    import datasets

    if data_file:
        path = Path(data_file)
        if not path.is_file():
            raise FileNotFoundError(f"{arg} {data_file}: no such file")
        builder = _BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{arg} {data_file}: unsupported extension {path.suffix!r} (use {', '.join(_BUILDERS)})"
            )
        # names the file and line of an empty file, a non-UTF-8 byte or a broken JSON line, which
        # datasets reports as a bare StopIteration / DatasetGenerationError / UnicodeDecodeError
        check_data_file(data_file, arg)
        kw = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files={"data": str(path)}, split="data", **kw)
    if not name:
        raise ValueError(f"give {arg} or a dataset name")
    return datasets.load_dataset(name, config, split=split)


def require_columns(ds: Any, columns: Sequence[str], source: str) -> None:
    """Raise naming ``source`` (the flag and file / dataset) when a column is missing."""
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{source} lacks column(s) {', '.join(missing)} (has: {', '.join(ds.column_names)})"
        )


def take(ds: Any, n: int | None) -> Any:
    """The first ``n`` examples (``--max_train_samples`` / ``--max_eval_samples``), or all."""
    return ds if n is None or n >= len(ds) else ds.select(range(n))


def pad_collate(
    pad_id: int, *, side: str = "right"
) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Collator padding list fields (``input_ids`` with ``pad_id``, ``labels`` with -100, others with 0)
    on ``side`` and building ``attention_mask``. Scalar fields (class ``labels``) become a tensor as they are.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        out: dict[str, torch.Tensor] = {}
        for key in examples[0]:
            vals = [e[key] for e in examples]
            if isinstance(vals[0], (list, tuple)):
                fill = pad_id if key == "input_ids" else (-100 if key == "labels" else 0)
                rows = []
                for v in vals:
                    pad = [fill] * (longest - len(v))
                    rows.append(pad + list(v) if side == "left" else list(v) + pad)
                out[key] = torch.tensor(rows)
            elif isinstance(vals[0], (int, float)):
                out[key] = torch.tensor(vals)
        if "attention_mask" not in out:
            rows = []
            for e in examples:
                n = len(e["input_ids"])
                pad = [0] * (longest - n)
                rows.append(pad + [1] * n if side == "left" else [1] * n + pad)
            out["attention_mask"] = torch.tensor(rows)
        return out

    return collate
