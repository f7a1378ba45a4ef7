"""Bytes saved for backward (``saved_tensors_hooks``, deterministic on CPU): LoRA vs PEFT LoRA-FA vs ours.

"PEFT LoRA-FA" is what ``peft.optimizers.create_lorafa_optimizer`` trains: the same LoRA model with
every ``lora_A`` frozen. Byte counts are exact properties of the autograd graph (no allocator, no
timing), so they are asserted; the sizes at ~100M parameters are in benchmarks/lora_fa_memory.py.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from loralab.core.testing import save_tiny, tiny_llama
from loralab.lora_fa.layer import apply_lorafa_layers
from loralab.lora_fa.memory import saved_tensor_bytes

RANK = 8
SEQ = 512  # a realistic fine-tuning length; the tiny model keeps it fast
TARGETS = "all-linear"


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """Bytes of activation storages a training step keeps between forward and backward."""
    model.train()
    with saved_tensor_bytes(model) as stats:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()  # the graph was complete: every saved tensor was needed
    return stats.nbytes


def three_ways(base: torch.nn.Module, dropout: float) -> dict[str, torch.nn.Module]:
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=RANK, lora_alpha=16, target_modules=TARGETS, lora_dropout=dropout)
    )
    peft_fa = copy.deepcopy(lora)
    for name, p in peft_fa.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    ours = copy.deepcopy(lora)
    apply_lorafa_layers(ours)
    return {"lora": lora, "peft_fa": peft_fa, "ours": ours}


@pytest.fixture(scope="module")
def ids():
    return torch.randint(4, 200, (1, SEQ), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_ours_saves_strictly_less_than_lora(ids, dropout):
    models = three_ways(tiny_llama(max_position_embeddings=SEQ), dropout)
    got = {k: saved_bytes(m, ids) for k, m in models.items()}
    assert got["ours"] < got["lora"], got
    if dropout:
        # PEFT LoRA-FA keeps every adapter's dropout mask (X-sized); ours keeps a seed
        assert got["ours"] < got["peft_fa"], got
    else:
        # without dropout a frozen A already spares X; ours must not keep anything more
        assert got["ours"] <= got["peft_fa"], got
    # deterministic: measuring again gives the same count
    assert saved_bytes(models["ours"], ids) == got["ours"]


def test_ours_saves_only_r_dim_products_beyond_the_frozen_model(ids):
    # the adapters' whole contribution is one (tokens × r) product per adapted layer: measured against
    # the same model with its LoRA layers switched off. The norms train in both runs so that every
    # layer's input needs a gradient (otherwise the frozen model builds no graph at all).
    ours = three_ways(tiny_llama(max_position_embeddings=SEQ), 0.05)["ours"]
    for name, p in ours.named_parameters():
        if "norm" in name:
            p.requires_grad_(True)
    with ours.disable_adapter():
        frozen = saved_bytes(ours, ids)
    adapted = saved_bytes(ours, ids)
    n_layers = sum(1 for n, _ in ours.named_modules() if n.endswith("lora_A.default"))
    assert n_layers == 2 * 7
    # every adapted layer keeps exactly its H = drop(X)·Aᵀ (float32): nothing X-sized, no mask
    assert adapted - frozen == n_layers * SEQ * RANK * 4


def test_nf4_qlora_ours_saves_less(ids, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = save_tiny(tiny_llama(max_position_embeddings=SEQ), tmp_path, tokenizer=False)
    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=q, device_map="cpu", dtype=torch.float32
    )
    models = three_ways(base, 0.05)
    got = {k: saved_bytes(m, ids) for k, m in models.items()}
    assert got["ours"] < got["peft_fa"] < got["lora"], got
