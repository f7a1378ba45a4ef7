"""Every example in loralab.golore's docstrings runs and prints what it says."""

import pytest

from loralab.core.testing import package_modules, run_docstring_examples


@pytest.mark.parametrize("name", package_modules("loralab.golore"))
def test_docstring_examples(name):
    run_docstring_examples(name)
