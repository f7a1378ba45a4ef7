"""Every example in loralab.runners' docstrings runs and prints what it says (``__main__`` modules,
which run a command when imported, aside)."""

import doctest
import importlib
import pkgutil

import pytest

import loralab.runners as package

MODULES = ["loralab.runners"] + [
    m.name
    for m in pkgutil.walk_packages(package.__path__, prefix="loralab.runners.")
    if not m.name.endswith(".__main__")
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
