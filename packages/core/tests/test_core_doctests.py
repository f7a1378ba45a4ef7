"""Every example in loralab.core's docstrings runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = [
    "__init__",
    "adamw",
    "adapter_gradients",
    "demo",
    "distributed",
    "estimation",
    "gradient_sums",
    "gradients",
    "host_memory",
    "linalg",
    "lora_layers",
    "modules",
    "offload",
    "quant",
    "sharding",
    "targets",
    "testing",
    "zero3_fetch",
    "zero_views",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    if name in ("quant",):
        pytest.importorskip("bitsandbytes")
    if name in ("lora_layers", "adapter_gradients"):
        pytest.importorskip("peft")
    module = importlib.import_module(
        "loralab.core" if name == "__init__" else f"loralab.core.{name}"
    )
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples failed in loralab.core.{name}"
    )
