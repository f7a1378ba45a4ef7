"""Every example in loralab.lora_pro's docstrings runs and prints what it says (LoRA-Pro)."""

import doctest
import importlib
import pkgutil

import pytest

import loralab.lora_pro as package

MODULES = ["loralab.lora_pro"] + [
    m.name for m in pkgutil.walk_packages(package.__path__, prefix="loralab.lora_pro.")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
