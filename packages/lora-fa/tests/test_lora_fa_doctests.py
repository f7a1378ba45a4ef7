"""Every example in loralab.lora_fa's docstrings runs and prints what it says (LoRA-FA)."""

import doctest
import importlib
import pkgutil

import pytest

import loralab.lora_fa as package

MODULES = ["loralab.lora_fa"] + [
    m.name for m in pkgutil.walk_packages(package.__path__, prefix="loralab.lora_fa.")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
