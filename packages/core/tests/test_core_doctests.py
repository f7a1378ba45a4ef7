"""Every example in loralab.core's docstrings runs and prints what it says."""

import pytest

from loralab.core.testing import package_modules, run_docstring_examples

# modules whose examples need an optional dependency of loralab-core
NEEDS = {
    "loralab.core.quant": "bitsandbytes",
    "loralab.core.lora_layers": "peft",
    "loralab.core.adapter_gradients": "peft",
}


@pytest.mark.parametrize("name", package_modules("loralab.core"))
def test_docstring_examples(name):
    if name in NEEDS:
        pytest.importorskip(NEEDS[name])
    run_docstring_examples(name)
