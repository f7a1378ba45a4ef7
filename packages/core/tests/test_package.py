"""Packaging facts every loralab wheel must keep."""

import importlib
from pathlib import Path

import loralab


def test_namespace_is_pep420():
    # a regular package would shadow the sibling wheels' modules
    assert getattr(loralab, "__file__", None) is None
    assert not any((Path(p) / "__init__.py").exists() for p in loralab.__path__)


def test_imports_and_is_typed():
    module = importlib.import_module("loralab.core")
    assert (Path(module.__file__).parent / "py.typed").exists()
