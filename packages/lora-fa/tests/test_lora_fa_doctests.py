"""Every example in loralab.lora_fa's docstrings runs and prints what it says."""

import pytest

from loralab.core.testing import package_modules, run_docstring_examples


@pytest.mark.parametrize("name", package_modules("loralab.lora_fa"))
def test_docstring_examples(name):
    run_docstring_examples(name)
