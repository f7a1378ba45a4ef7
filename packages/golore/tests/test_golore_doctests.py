"""Every example in loralab.golore's docstrings runs and prints what it says (GaLore / GoLore)."""

import doctest
import importlib
import pkgutil

import pytest

import loralab.golore as package

MODULES = ["loralab.golore"] + [
    m.name for m in pkgutil.walk_packages(package.__path__, prefix="loralab.golore.")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
