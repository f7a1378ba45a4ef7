"""LoRA-SB initialisation: identity with the rank-r truncation, α-freedom, counts, determinism, errors."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from loralab.core import estimate_gradients
from loralab.core.testing import make_lm_batches, tiny_gpt2, tiny_llama
from loralab.lora_sb import (
    LoraSBConfig,
    LoraSBInitError,
    get_lora_sb_model,
    lora_sb_layers,
    update_approximation,
)

RANK = 4
LR = 2e-4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches():
    return make_lm_batches(2, seed=3)


def _truncation(delta: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


@pytest.fixture(scope="module")
def reference_updates():
    grads = estimate_gradients(tiny_llama(), _batches(), TARGETS, progress=False)
    return {n: update_approximation(g, LR) for n, g in grads.items()}


@pytest.mark.parametrize("alpha", [1, RANK, 4 * RANK, 64])
def test_init_identity_for_every_target_and_alpha(alpha, reference_updates):
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, lora_alpha=alpha, target_modules=TARGETS, svd_method="full"),
        _batches(),
        lr=LR,
        progress=False,
    )
    layers = lora_sb_layers(model)
    assert set(layers) == set(reference_updates)
    for name, layer in layers.items():
        assert layer.scaling["default"] == alpha / RANK
        want = _truncation(reference_updates[name], RANK)
        got = layer.get_delta_weight("default").double()
        assert torch.linalg.norm(got - want) <= 1e-4 * torch.linalg.norm(want), name


def test_randomized_init_is_near_optimal(reference_updates):
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        progress=False,
    )
    for name, layer in lora_sb_layers(model).items():
        delta = reference_updates[name].double()
        best = torch.linalg.norm(delta - _truncation(delta, RANK))
        assert torch.linalg.norm(delta - layer.get_delta_weight("default").double()) <= best * (
            1 + 1e-3
        ), name


def test_base_weights_untouched_and_only_r_trains():
    base = tiny_llama()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_lora_sb_model(
        base, LoraSBConfig(r=RANK, target_modules=TARGETS), _batches(), lr=LR, progress=False
    )
    for n, p in model.base_model.model.named_parameters():
        key = n.replace(".base_layer", "")
        if key in w0:
            assert torch.equal(p, w0[key]), n
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_R." in n for n in trainable)
    n_targets = len(lora_sb_layers(model))
    assert n_targets == 2 * len(TARGETS)
    assert sum(trainable.values()) == n_targets * RANK**2
    assert model.get_nb_trainable_parameters()[0] == n_targets * RANK**2


def test_trainable_ratio_vs_lora_at_same_rank():
    sb = get_peft_model(
        tiny_llama(), LoraSBConfig(r=RANK, target_modules=TARGETS, sb_init="random")
    )
    lora = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=TARGETS))
    n_sb, n_lora = sb.get_nb_trainable_parameters()[0], lora.get_nb_trainable_parameters()[0]
    # LoRA: r (m + n) per layer; LoRA-SB: r². hidden 64, intermediate 128, kv 32.
    per_layer_lora = RANK * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 3)
    assert n_lora == 2 * per_layer_lora
    assert n_sb == 2 * 7 * RANK**2
    assert n_lora / n_sb == pytest.approx(per_layer_lora / (7 * RANK**2))


def test_init_is_deterministic_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    m1 = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        progress=False,
    )
    assert torch.equal(torch.get_rng_state(), state)
    m2 = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS),
        _batches(),
        lr=LR,
        progress=False,
    )
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    m3 = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS, sb_init="random", init_seed=1),
        _batches(),
        progress=False,
    )
    m4 = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=TARGETS, sb_init="random", init_seed=1),
        _batches(),
        progress=False,
    )
    for p3, p4 in zip(m3.parameters(), m4.parameters()):
        assert torch.equal(p3, p4)
    assert torch.equal(torch.get_rng_state(), state)


def test_lora_xs_inits():
    model = get_peft_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=["q_proj"], sb_init="weight_svd", svd_method="full"),
    )
    for name, layer in lora_sb_layers(model).items():
        W = layer.get_base_layer().weight.double()
        U, S, Vh = torch.linalg.svd(W)
        B = layer.lora_B["default"].weight.double()
        A = layer.lora_A["default"].weight.double()
        assert torch.allclose(B @ A, U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK], atol=1e-4), (
            name
        )
        assert torch.count_nonzero(layer.lora_R["default"].weight) == 0
    model = get_peft_model(
        tiny_llama(), LoraSBConfig(r=RANK, target_modules=["q_proj"], sb_init="random")
    )
    for layer in lora_sb_layers(model).values():
        B = layer.lora_B["default"].weight
        assert torch.allclose(B.T @ B, torch.eye(RANK), atol=1e-5)


def test_error_rank_larger_than_layer_names_the_layer():
    with pytest.raises(
        ValueError,
        match=r"r=40 exceeds min\(out_features, in_features\)=32 of layer 'model.layers.0.self_attn.k_proj'",
    ):
        get_peft_model(
            tiny_llama(), LoraSBConfig(r=40, target_modules=["k_proj"], sb_init="random")
        )


def test_zero_gradient_layer_errors_or_falls_back():
    # layer 1's v_proj output is multiplied by zero, so its gradient is exactly zero (sign(0) = 0)
    targets = ["v_proj", "up_proj"]
    batches = _batches()
    with pytest.raises(LoraSBInitError) as err:
        get_lora_sb_model(
            tiny_llama(),
            LoraSBConfig(r=RANK, target_modules=targets),
            batches,
            lr=LR,
            loss_fn=_dead_v_loss,
            progress=False,
        )
    assert "model.layers.1.self_attn.v_proj" in str(err.value) and "all zeros" in str(err.value)
    model = get_lora_sb_model(
        tiny_llama(),
        LoraSBConfig(r=RANK, target_modules=targets, zero_gradient="random"),
        batches,
        lr=LR,
        loss_fn=_dead_v_loss,
        progress=False,
    )
    layer = lora_sb_layers(model)["model.layers.1.self_attn.v_proj"]
    assert torch.count_nonzero(layer.lora_R["default"].weight) == 0
    for p in model.parameters():
        assert torch.isfinite(p).all()
    out = model(**batches[0]).logits
    assert torch.isfinite(out).all()


def _dead_v_loss(model, batch):
    # Layer 1's v_proj output is replaced by zeros times itself: d loss / d W_v = 0 exactly.
    inner = (
        model.base_model.model
        if hasattr(model, "base_model") and hasattr(model.base_model, "model")
        else model
    )
    v = inner.model.layers[1].self_attn.v_proj
    handle = v.register_forward_hook(lambda mod, inp, out: out * 0.0)
    try:
        return model(**batch).loss
    finally:
        handle.remove()


def test_argument_and_config_errors():
    with pytest.raises(ValueError, match="lr is required"):
        get_lora_sb_model(tiny_llama(), LoraSBConfig(r=RANK, target_modules=["q_proj"]), _batches())
    with pytest.raises(TypeError, match="must be a LoraSBConfig"):
        get_lora_sb_model(
            tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"]), _batches(), lr=LR
        )
    with pytest.raises(ValueError, match="sb_init"):
        LoraSBConfig(sb_init="pissa")
    with pytest.raises(ValueError, match="use_dora"):
        LoraSBConfig(use_dora=True)
    with pytest.raises(ValueError, match="init_lora_weights"):
        LoraSBConfig(init_lora_weights="pissa")
    with pytest.raises(ValueError, match="lora_bias"):
        LoraSBConfig(lora_bias=True)
    with pytest.raises(ValueError, match="zero_gradient"):
        LoraSBConfig(zero_gradient="nan")
    with pytest.raises(ValueError, match="svd_oversample"):
        LoraSBConfig(svd_oversample=-1)
    assert LoraSBConfig(r=16).lora_alpha == 16


def test_plain_lora_layer_refuses_a_lora_sb_adapter():
    # a plain PEFT LoRA layer asked to host a LoRA-SB adapter fails loudly (the is_lora_variant marker)
    model = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="lora_sb"):
        model.add_adapter("sb", LoraSBConfig(r=RANK, target_modules=["q_proj"]))


def test_gpt2_conv1d_init_identity():
    grads = estimate_gradients(
        tiny_gpt2(), _batches(), ["c_attn", "c_fc", "c_proj"], progress=False
    )
    model = get_lora_sb_model(
        tiny_gpt2(),
        LoraSBConfig(
            r=RANK, lora_alpha=2, target_modules=["c_attn", "c_fc", "c_proj"], svd_method="full"
        ),
        _batches(),
        lr=LR,
        progress=False,
    )
    layers = lora_sb_layers(model)
    assert set(layers) == set(grads)
    for name, layer in layers.items():
        assert layer.fan_in_fan_out
        want = _truncation(update_approximation(grads[name], LR), RANK)  # (out, in)
        got = layer.get_delta_weight("default").double().T  # stored (in, out)
        assert torch.linalg.norm(got - want) <= 1e-4 * torch.linalg.norm(want), name


def test_rank_pattern_and_rslora(reference_updates):
    # per-layer ranks (PEFT's rank_pattern) and rsLoRA scaling: still the rank-r_i truncation, Σ r_i² trainables
    cfg = LoraSBConfig(
        r=RANK,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"down_proj": 2 * RANK},
        target_modules=["q_proj", "down_proj"],
        svd_method="full",
    )
    model = get_lora_sb_model(tiny_llama(), cfg, _batches(), lr=LR, progress=False)
    total = 0
    for name, layer in lora_sb_layers(model).items():
        r = 2 * RANK if name.endswith("down_proj") else RANK
        assert layer.r["default"] == r and layer.scaling["default"] == pytest.approx(16 / r**0.5)
        want = _truncation(reference_updates[name], r)
        assert torch.linalg.norm(
            layer.get_delta_weight("default").double() - want
        ) <= 1e-4 * torch.linalg.norm(want), name
        total += r * r
    assert model.get_nb_trainable_parameters()[0] == total == 2 * (RANK**2 + (2 * RANK) ** 2)
