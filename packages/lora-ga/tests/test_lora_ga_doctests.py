"""Every example in the docstrings of loralab.lora_ga's modules runs."""

import doctest
import importlib

import pytest

MODULES = ["config", "maths", "model", "save", "layer", "peft_flow"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"loralab.lora_ga.{name}")
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.attempted > 0
    assert result.failed == 0, (
        f"{result.failed} of {result.attempted} examples failed in loralab.lora_ga.{name}"
    )
