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
