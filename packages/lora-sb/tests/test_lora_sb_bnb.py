"""LoRA-SB on a bitsandbytes 4-bit (NF4) base, on the CPU."""

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from loralab.core import estimate_gradients  # noqa: E402
from loralab.core.quant import dequantize_weight, quantized_layer_names  # noqa: E402
from loralab.core.testing import make_lm_batches, save_tiny, tiny_llama  # noqa: E402
from loralab.lora_sb import (  # noqa: E402
    LoraSBConfig,
    get_lora_sb_model,
    load_lora_sb_model,
    lora_sb_layers,
    update_approximation,
)

RANK = 4
LR = 2e-4
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny_llama"), tokenizer=False)


def _load_nf4(path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=cfg, device_map="cpu", dtype=torch.float32
    )


def _float_twin(qmodel):
    # the float model whose weights are exactly the quantized model's dequantized weights
    twin = tiny_llama()
    with torch.no_grad():
        for name in quantized_layer_names(qmodel):
            twin.get_submodule(name).weight.copy_(dequantize_weight(qmodel.get_submodule(name)))
    return twin


def test_nf4_init_train_save_load(checkpoint, tmp_path):
    batches = make_lm_batches(2, seed=3)
    qmodel = _load_nf4(checkpoint)
    twin = _float_twin(qmodel)
    x = make_lm_batches(1, seed=11)[0]
    # bitsandbytes' CPU 4-bit kernels are not bit-identical to a float matmul with the dequantized weight.
    # (No torch.no_grad() forward before training: on the CPU, bitsandbytes 0.50 repacks Params4bit at a
    # no-grad forward, after which backward through the 4-bit layers gives no gradient.)
    assert torch.allclose(twin(**x).logits.detach(), qmodel(**x).logits.detach(), atol=5e-3)
    grads = estimate_gradients(twin, batches, TARGETS, progress=False)
    model = get_lora_sb_model(
        qmodel,
        LoraSBConfig(r=RANK, target_modules=TARGETS, svd_method="full"),
        batches,
        lr=LR,
        progress=False,
    )
    layers = lora_sb_layers(model)
    assert set(layers) == set(grads)
    for name, layer in layers.items():
        assert type(layer).__name__ == "LoraSBLinear4bit"
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        # the estimate runs the 4-bit model with the targets' weights swapped for their float dequantized
        # copies; the float twin's gradient differs only through the other layers' 4-bit kernel numerics,
        # which flip the sign of a few near-zero gradient entries.
        delta = update_approximation(grads[name], LR).double()
        S = torch.linalg.svdvals(delta)
        best = S[RANK:].square().sum().sqrt()
        err = torch.linalg.norm(delta - layer.get_delta_weight("default").double())
        assert err <= 1.01 * best, name
    assert model.get_nb_trainable_parameters()[0] == len(layers) * RANK**2
    # QLoRA-style backward on the CPU: only R gets gradients
    model.train()
    model(**batches[0]).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_R." in n), n
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    model.eval()
    with torch.no_grad():
        live = model(**x).logits
    model.save_pretrained(tmp_path)
    loaded = load_lora_sb_model(_load_nf4(checkpoint), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, live, atol=1e-5)


def test_int8_init_train_save_load(checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def load_int8():
        return AutoModelForCausalLM.from_pretrained(
            checkpoint,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map="cpu",
            dtype=torch.float32,
        )

    batches = make_lm_batches(2, seed=3)
    x = make_lm_batches(1, seed=11)[0]
    model = get_lora_sb_model(
        load_int8(),
        LoraSBConfig(r=RANK, target_modules=TARGETS, svd_method="full"),
        batches,
        lr=LR,
        progress=False,
    )
    layers = lora_sb_layers(model)
    assert len(layers) == 2 * len(TARGETS)
    for layer in layers.values():
        assert type(layer).__name__ == "LoraSBLinear8bitLt"
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear8bitLt)
        # initialised from the gradient: a non-zero rank-r update
        assert layer.get_delta_weight("default").abs().max() > 0
    assert model.get_nb_trainable_parameters()[0] == len(layers) * RANK**2
    model.train()
    model(**batches[0]).loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_R." in n), n
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    model.eval()
    with torch.no_grad():
        live = model(**x).logits
    model.save_pretrained(tmp_path)
    loaded = load_lora_sb_model(load_int8(), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(**x).logits, live, atol=1e-5)
