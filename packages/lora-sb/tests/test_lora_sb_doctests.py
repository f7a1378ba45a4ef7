"""Every example in loralab.lora_sb's docstrings runs and prints what it says."""

import doctest
import importlib

import pytest

MODULES = ["__init__", "config", "layer", "maths", "model", "compat", "export"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(
        "loralab.lora_sb" if name == "__init__" else f"loralab.lora_sb.{name}"
    )
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0, f"loralab.lora_sb.{name} has no docstring example"
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples failed in loralab.lora_sb.{name}"
    )
