"""The seed README's quick start, with imports changed to loralab.lora_sb and its own errors fixed."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from loralab.core import estimate_gradients
from loralab.core.testing import make_lm_batches, tiny_gpt2, tiny_llama
from loralab.lora_sb import (
    LoraSBConfig,
    LoraSBInitError,
    estimate_and_process_grads_torch,
    find_and_initialize_grad,
    load_lora_sb_model,
    lora_sb_layers,
    update_approximation,
)

LORA_RANK = 4
LR = 2e-4


def _loader(model_factory=tiny_llama):
    rows = [
        {k: v[i] for k, v in b.items()}
        for b in make_lm_batches(3, batch_size=2, seed=3)
        for i in range(2)
    ]
    return DataLoader(rows, batch_size=2)


def test_quick_start_runs_with_imports_changed(tmp_path):
    model = tiny_llama()
    train_loader = _loader()
    lora_target_modules = ["q_proj", "v_proj"]
    # --- seed README quick start (fixes: lr is required; find_and_initialize_grad, not find_and_initialize;
    # peft_config, not the undefined lora_config; the YAML file becomes a dict) ---
    named_grads = estimate_and_process_grads_torch(
        model=model, dataloader=train_loader, lr=LR, num_samples=4
    )
    peft_config = LoraConfig(r=LORA_RANK, target_modules=lora_target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_config)
    reconstr_config = {"svd": {"rank": None, "n_iter": 10, "random_state": 42}}
    adapter_name = "default"
    peft_config_dict = {adapter_name: peft_config}
    reconstr_config["svd"]["rank"] = LORA_RANK
    named_grads_new = {f"base_model.model.{k}": v for k, v in named_grads.items()}
    find_and_initialize_grad(
        model=model,
        peft_config=peft_config_dict,
        adapter_name=adapter_name,
        reconstr_type="svd",
        reconstruct_config=reconstr_config,
        writer=None,
        named_grads=named_grads_new,
    )
    # --- perform training as usual ---
    assert isinstance(model.peft_config["default"], LoraSBConfig)
    layers = lora_sb_layers(model)
    assert len(layers) == 4
    assert model.get_nb_trainable_parameters()[0] == 4 * LORA_RANK**2
    # the init is the rank-r truncation of the seed's −lr·sign(Σ grads) over the first 4 samples
    grads = estimate_gradients(
        tiny_llama(), make_lm_batches(2, batch_size=2, seed=3), lora_target_modules, progress=False
    )
    for name, layer in layers.items():
        delta = update_approximation(grads[name], LR).double()
        assert torch.allclose(named_grads[f"{name}.weight"].double(), delta)
        best = torch.linalg.svdvals(delta)[LORA_RANK:].square().sum().sqrt()
        assert torch.linalg.norm(delta - layer.get_delta_weight("default").double()) <= best * (
            1 + 1e-3
        )
    x = make_lm_batches(1, seed=11)[0]
    with torch.no_grad():
        live = model(**x).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.allclose(
            load_lora_sb_model(tiny_llama(), tmp_path)(**x).logits, live, atol=1e-5
        )
    # You can merge LoRA-SB into the base model using `merge_and_unload` in PEFT
    merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(**x).logits, live, atol=1e-5)


def test_estimate_returns_storage_layout_for_conv1d():
    grads = estimate_and_process_grads_torch(
        tiny_gpt2(), _loader(), LR, num_samples=3, target_modules=["c_attn"], progress=False
    )
    w = tiny_gpt2().transformer.h[0].attn.c_attn.weight
    assert grads["transformer.h.0.attn.c_attn.weight"].shape == w.shape
    g = grads["transformer.h.0.attn.c_attn.weight"]
    assert torch.all((g == 0) | torch.isclose(g.abs(), torch.tensor(LR)))


def test_compat_errors():
    model = get_peft_model(tiny_llama(), LoraConfig(r=LORA_RANK, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="reconstr_type must be 'svd'"):
        find_and_initialize_grad(model, model.peft_config, "default", "nmf", {}, named_grads={})
    with pytest.raises(ValueError, match=r"\['svd'\]\['rank'\]=8 differs"):
        find_and_initialize_grad(
            model, model.peft_config, "default", "svd", {"svd": {"rank": 8}}, named_grads={}
        )
    with pytest.raises(ValueError, match="named_grads is required"):
        find_and_initialize_grad(
            model, model.peft_config, "default", "svd", {"svd": {"rank": LORA_RANK}}
        )
    with pytest.raises(
        LoraSBInitError, match=r"no entry for target 'model\.layers\.0\.self_attn\.q_proj'"
    ):
        find_and_initialize_grad(
            model, model.peft_config, "default", "svd", {"svd": {"rank": LORA_RANK}}, named_grads={}
        )
    with pytest.raises(ValueError, match="lr must be a positive number"):
        estimate_and_process_grads_torch(tiny_llama(), _loader(), 0.0)
