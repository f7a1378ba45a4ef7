"""loralab.runners.data.dtype_kwargs: the from_pretrained dtype keyword, built on core's dtype_kwarg."""

from __future__ import annotations

import pytest
import torch

from loralab.core.quant import dtype_kwarg
from loralab.runners.data import dtype_kwargs


def test_dtype_kwargs_uses_core_keyword():
    assert dtype_kwargs() == {dtype_kwarg(): torch.float32}
    assert dtype_kwargs(torch.bfloat16) == {dtype_kwarg(): torch.bfloat16}


def test_dtype_kwargs_rejects_non_dtype():
    with pytest.raises(TypeError, match=r"dtype_kwargs: dtype must be a torch\.dtype.*'fp16'"):
        dtype_kwargs("fp16")


def test_load_pretrained_on_meta_builds_the_same_model_without_reading_weights(tiny_dirs):
    # FSDP2's rank-0 loading: every rank but the first builds the model from its config on the meta
    # device; the dtype goes to the model, the other keywords (num_labels) to the config
    from transformers import AutoModelForSequenceClassification

    from loralab.runners.data import load_pretrained

    path = tiny_dirs["roberta"]
    kw = {"num_labels": 2, **dtype_kwargs(torch.float32)}
    real = load_pretrained(AutoModelForSequenceClassification, path, **kw)
    meta = load_pretrained(AutoModelForSequenceClassification, path, on_meta=True, **kw)
    assert all(p.is_meta for p in meta.parameters())
    assert not any(p.is_meta for p in real.parameters())
    shapes = {n: (p.shape, p.dtype) for n, p in real.named_parameters()}
    assert {n: (p.shape, p.dtype) for n, p in meta.named_parameters()} == shapes
    assert meta.config.num_labels == 2
    with pytest.raises(ValueError, match="a quantized model is not built on the meta device"):
        load_pretrained(
            AutoModelForSequenceClassification, path, on_meta=True, quantization_config=object()
        )
