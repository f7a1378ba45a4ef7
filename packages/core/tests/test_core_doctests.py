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
    # a subpackage's modules need what the subpackage needs
    need = next((v for k, v in NEEDS.items() if name == k or name.startswith(k + ".")), None)
    if need is not None:
        pytest.importorskip(need)
    run_docstring_examples(name)
