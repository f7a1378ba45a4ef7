"""``--method lora-xs``: LoRA-XS on ``loralab.lora_sb``'s layers (frozen factors from W0's SVD or
random orthonormal, only the r×r R trains), its parameter count against LoRA-SB's, training, and the
bare-PEFT reload of ``final/``."""

from __future__ import annotations

import pytest
import torch

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.runners.methods import FinalDirectory, MethodError, get_method, method_args

pytest.importorskip("loralab.lora_sb")

RANK = 4
TARGETS = "q_proj,v_proj"


def _setup(xs_init="weight_svd", **kw):
    torch.manual_seed(0)
    args = method_args(
        "lora-xs",
        lora_r=RANK,
        target_modules=TARGETS,
        xs_init=xs_init,
        learning_rate=1e-2,
        max_steps=5,
        progress=False,
        **kw,
    )
    return get_method("lora-xs").setup(tiny_llama(), args)


def test_lora_xs_factors_are_the_weights_truncated_svd_in_float64():
    from loralab.lora_sb import lora_sb_layers

    base = tiny_llama()
    setup = _setup()
    layers = lora_sb_layers(setup.model)
    assert layers
    for name, layer in layers.items():
        W = layer.get_base_layer().weight.detach().double()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        reference = U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]
        B = layer.lora_B["default"].weight.detach().double()
        A = layer.lora_A["default"].weight.detach().double()
        # rank-r truncation of W0, float32 factors: relative error ~1e-6
        assert torch.allclose(B @ A, reference, atol=1e-5 * S[0].item()), name
        assert torch.count_nonzero(layer.lora_R["default"].weight) == 0, name
        assert not layer.lora_A["default"].weight.requires_grad
        assert not layer.lora_B["default"].weight.requires_grad
        assert layer.lora_R["default"].weight.requires_grad
    # R = 0: the wrapped model computes what the base computes
    batch = make_lm_batches(1)[0]
    with torch.no_grad():
        torch.manual_seed(0)
        expected = tiny_llama()(**batch).logits
        assert torch.allclose(setup.model(**batch).logits, expected, atol=1e-6)
    del base


def test_lora_xs_trains_only_r_squared_per_layer_like_lora_sb():
    setup = _setup()
    trainable = {n: p.numel() for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_R" in n for n in trainable)
    assert set(trainable.values()) == {RANK * RANK}
    sb_args = method_args("lora-sb", lora_r=RANK, target_modules=TARGETS, progress=False)
    sb = get_method("lora-sb").setup(tiny_llama(), sb_args, make_lm_batches(2))
    sb_trainable = sum(p.numel() for p in sb.model.parameters() if p.requires_grad)
    assert sum(trainable.values()) == sb_trainable


def test_lora_xs_random_init_is_orthonormal():
    from loralab.lora_sb import lora_sb_layers

    for layer in lora_sb_layers(_setup("random").model).values():
        B = layer.lora_B["default"].weight.detach().double()
        A = layer.lora_A["default"].weight.detach().double()
        assert torch.allclose(B.T @ B, torch.eye(RANK, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(A @ A.T, torch.eye(RANK, dtype=torch.float64), atol=1e-5)


def test_lora_xs_trains_and_final_reloads_with_bare_peft(tmp_path):
    from peft import PeftModel

    setup = _setup()
    model, opt = setup.model, setup.optimizer
    batches = make_lm_batches(2)
    losses = []
    for _ in range(8):
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss))
    assert losses[-1] < losses[0]
    get_method("lora-xs").save_final(model, FinalDirectory(tmp_path / "final"))
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "final")
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batches[0]).logits, model(**batches[0]).logits, atol=1e-5)
    assert (tmp_path / "final" / "lora_sb_native" / "adapter_config.json").is_file()


def test_lora_xs_bad_init_names_the_option():
    with pytest.raises(MethodError, match="--xs_init must be one of weight_svd, random, got 'svd'"):
        method_args("lora-xs", xs_init="svd")
