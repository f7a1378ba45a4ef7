"""find_and_initialize_grad honours every key of the seed's reconstruct_config, or refuses it by name.

Each init is checked against a float64 reference of what the seed's ``find_and_initialize_grad``
computes (its ``utils/initialization_utils.py``, as in the authors' Fed-SB code): it takes the SVD of
``named_grads[key].T`` (in×out) = ``U S Vᵀ``; encoder = ``U_r`` (in×r), decoder = ``V_rᵀ`` (r×out),
latent = ``diag(S_r)``; ``lora_B = decoderᵀ``, ``lora_A = encoderᵀ``. Its random draws come from the
global RNG, so those parts are compared in distribution (bounds and moments), not in value.
"""

import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear

from loralab.core.testing import make_lm_batches, tiny_llama
from loralab.lora_sb import (
    LoraSBConfig,
    find_and_initialize_grad,
    is_lora_sb_layer,
    lora_sb_layers,
)

RANK = 4
LR = 1e-3
TARGETS = ["q_proj", "v_proj"]  # 64x64 and 32x64 (2 KV heads): a square and a wide layer
SEED_YAML = {
    "reconstruction_type": "svd",
    "reconstr_mode": "separated",
    "half_init_dec": False,
    "replacement_module_random_init": False,
    "r_squared": True,
    "svd": {"rank": RANK, "n_iter": 10, "random_state": 42},
}
SVD_RTOL = (
    1e-4  # the randomized SVD (q = r + 10) vs the exact float64 SVD, on these small sign matrices
)
MOMENT_RTOL = 0.2  # sample std of >= 128 uniform/normal draws vs the exact std


def _named_grads(model):
    """A synthetic ``−lr·sign(G)`` per target, in the seed's key format (``base_model.model.<param>``)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for name, mod in model.named_modules():
        if name.endswith(tuple(TARGETS)):
            m, n = mod.weight.shape
            # a gradient with low-rank structure (as real ones have) plus noise: the sign matrix then has a
            # clear gap after the r-th singular value, so the top-r subspaces are well defined
            scales = torch.tensor([8.0, 6.0, 4.0, 3.0, 1.0, 0.5])
            grad = (torch.randn(m, 6, generator=g) * scales) @ torch.randn(6, n, generator=g)
            grad += 0.5 * torch.randn(m, n, generator=g)
            out[f"base_model.model.{name}.weight"] = -LR * torch.sign(grad)
    return out


def _seed_reference(update_storage, rank=RANK):
    """float64 (B, R, A) of the seed: SVD of the transposed update, B = V_r, R = diag(S_r), A = U_rᵀ."""
    U, S, Vh = torch.linalg.svd(update_storage.double().T, full_matrices=False)
    return Vh[:rank].T, torch.diag(S[:rank]), U[:, :rank].T


def _init(config=None, lora_alpha=RANK, **cfg):
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=RANK, lora_alpha=lora_alpha, target_modules=TARGETS, **cfg)
    )
    grads = _named_grads(model.base_model.model)
    find_and_initialize_grad(
        model,
        model.peft_config,
        "default",
        "svd",
        SEED_YAML if config is None else config,
        named_grads=grads,
    )
    return model, grads


def _with(**changes):
    cfg = {**SEED_YAML, "svd": dict(SEED_YAML["svd"])}
    svd = changes.pop("svd", None)
    cfg.update(changes)
    if svd is not None:
        cfg["svd"].update(svd)
    return cfg


def _layers(model):
    inner = model.base_model.model
    return {
        n: m for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def _factors(layer):
    A = layer.lora_A["default"].weight.detach().double()
    B = layer.lora_B["default"].weight.detach().double()
    R = layer.lora_R["default"].weight.detach().double() if is_lora_sb_layer(layer) else None
    return B, R, A


def _rel(x, y):
    return float((x - y).norm() / y.norm())


def _columns_match(X, Y, atol=1e-4):
    """X's columns equal Y's up to sign (singular vectors are defined up to sign)."""
    return torch.allclose((X * Y).sum(0).abs(), torch.ones(X.shape[1], dtype=X.dtype), atol=atol)


def _uniform_ok(x, bound):
    std = float(x.std())
    return bool(x.abs().max() <= bound) and abs(std / (bound / math.sqrt(3)) - 1) < MOMENT_RTOL


@pytest.fixture(scope="module")
def default_init():
    return _init()


def test_default_seed_config_is_lora_sb_equal_to_the_seed(default_init):
    model, grads = default_init
    assert isinstance(model.peft_config["default"], LoraSBConfig)
    layers = lora_sb_layers(model)
    assert len(layers) == 4
    for name, layer in layers.items():
        B, R, A = _factors(layer)
        Bs, Rs, As = _seed_reference(grads[f"base_model.model.{name}.weight"])
        # s = 1 (lora_alpha = r, as the seed's scripts force): s·B·R·A is the seed's B·Σ·A
        assert _rel(B @ R @ A, Bs @ Rs @ As) < SVD_RTOL
        assert _columns_match(B, Bs) and _columns_match(A.T, As.T)
        assert torch.allclose(torch.diagonal(R), torch.diagonal(Rs), rtol=SVD_RTOL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_R" in n for n in trainable)


def test_r_squared_false_is_the_seeds_plain_lora(tmp_path):
    model, grads = _init(_with(r_squared=False))
    cfg = model.peft_config["default"]
    assert type(cfg) is LoraConfig  # stays plain LoRA
    layers = _layers(model)
    assert len(layers) == 4 and not lora_sb_layers(model)
    n_params = 0
    for name, layer in layers.items():
        assert type(layer) is PeftLoraLinear and not hasattr(layer, "lora_R")
        B, _, A = _factors(layer)
        Bs, _, _ = _seed_reference(grads[f"base_model.model.{name}.weight"])
        assert _columns_match(B, Bs)  # B = the update's top-r left singular vectors
        # A ~ N(0, 1e-5²) (the seed's init_module_weights(lora_A, sigma=0.00001))
        assert abs(float(A.std()) / 1e-5 - 1) < MOMENT_RTOL
        assert abs(float(A.mean())) < 3e-6
        n_params += A.numel() + B.numel()
    # both factors train, no R: LoRA's r·(m + n) per layer
    assert model.get_nb_trainable_parameters()[0] == n_params
    assert all(
        p.requires_grad for n, p in model.named_parameters() if "lora_A" in n or "lora_B" in n
    )
    # a plain LoRA adapter: the bare PEFT round trip is exact
    x = make_lm_batches(1, seed=11)[0]
    with torch.no_grad():
        live = model(**x).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        again = PeftModel.from_pretrained(tiny_llama(), tmp_path)(**x).logits
    assert torch.equal(again, live)


def test_replacement_module_random_init_draws_a_and_b_keeps_sigma(default_init):
    model, grads = _init(_with(replacement_module_random_init=True))
    default = lora_sb_layers(default_init[0])
    for name, layer in lora_sb_layers(model).items():
        B, R, A = _factors(layer)
        _, Rs, _ = _seed_reference(grads[f"base_model.model.{name}.weight"])
        m, n = B.shape[0], A.shape[1]
        # seed: kaiming_uniform_(encoder n×r) -> A = encoderᵀ ~ U(±1/√r); decoder r×m -> B ~ U(±1/√m)
        assert _uniform_ok(A, 1 / math.sqrt(RANK))
        assert _uniform_ok(B, 1 / math.sqrt(m))
        assert not torch.allclose(A @ A.T, torch.eye(RANK, dtype=A.dtype), atol=0.1)
        # R keeps the update's singular values (the seed's latent = diag(S_r), s = 1)
        assert torch.allclose(R, Rs, rtol=SVD_RTOL, atol=1e-6 * float(Rs.max()))
        B0, _, A0 = _factors(default[name])
        assert not torch.equal(A, A0) and not torch.equal(B, B0) and n == A0.shape[1]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_R" in n for n in trainable)


def test_half_init_dec_redraws_the_last_half_of_b(default_init):
    model, grads = _init(_with(half_init_dec=True))
    default = lora_sb_layers(default_init[0])
    h = math.ceil(RANK / 2)
    for name, layer in lora_sb_layers(model).items():
        B, R, A = _factors(layer)
        Bs, Rs, As = _seed_reference(grads[f"base_model.model.{name}.weight"])
        m = B.shape[0]
        # the first ⌈r/2⌉ columns of B are the SVD's, A and R are untouched
        assert _columns_match(B[:, :h], Bs[:, :h])
        assert _columns_match(A.T, As.T)
        assert torch.allclose(R, Rs, rtol=SVD_RTOL, atol=1e-6 * float(Rs.max()))
        for j in range(h):  # the rank-one terms that survive equal the seed's
            assert (
                _rel(R[j, j] * torch.outer(B[:, j], A[j]), Rs[j, j] * torch.outer(Bs[:, j], As[j]))
                < SVD_RTOL
            )
        # the rest: seed's kaiming_uniform_ on decoder rows ⌈r/2⌉: (fan_in = m)
        assert _uniform_ok(B[:, h:], 1 / math.sqrt(m))
        B0, _, A0 = _factors(default[name])
        assert torch.equal(A, A0) and torch.equal(B[:, :h], B0[:, :h])
        assert not torch.equal(B[:, h:], B0[:, h:])


def test_r_squared_false_with_random_init():
    model, _ = _init(_with(r_squared=False, replacement_module_random_init=True))
    for layer in _layers(model).values():
        B, _, A = _factors(layer)
        assert _uniform_ok(B, 1 / math.sqrt(B.shape[0]))
        assert abs(float(A.std()) / 1e-5 - 1) < MOMENT_RTOL


def test_svd_settings_are_honoured_and_random_state_seeds_the_draws():
    cfg = _with(replacement_module_random_init=True, svd={"n_iter": 3, "random_state": 7})
    model, _ = _init(cfg)
    sb = model.peft_config["default"]
    assert (sb.svd_niter, sb.init_seed) == (3, 7)
    again, _ = _init(cfg)
    other, _ = _init(_with(replacement_module_random_init=True, svd={"random_state": 8}))
    for name, layer in lora_sb_layers(model).items():
        A = layer.lora_A["default"].weight
        assert torch.equal(A, lora_sb_layers(again)[name].lora_A["default"].weight)
        assert not torch.equal(A, lora_sb_layers(other)[name].lora_A["default"].weight)


def test_missing_keys_take_the_seed_yaml_values(default_init):
    model, _ = _init({"svd": {"rank": RANK, "random_state": 42}})
    for name, layer in lora_sb_layers(model).items():
        ref = lora_sb_layers(default_init[0])[name]
        for slot in ("lora_A", "lora_B", "lora_R"):
            assert torch.equal(
                getattr(layer, slot)["default"].weight, getattr(ref, slot)["default"].weight
            )


def test_alpha_other_than_r_gives_the_truncation_not_s_times_it():
    # documented difference: R = Σ/s, so s·B·R·A is the rank-r truncation for any lora_alpha (the seed's
    # R = Σ gives s times it; its scripts always set lora_alpha = r, where both agree)
    model, grads = _init(lora_alpha=4 * RANK)
    for name, layer in lora_sb_layers(model).items():
        Bs, Rs, As = _seed_reference(grads[f"base_model.model.{name}.weight"])
        assert _rel(layer.get_delta_weight("default").double(), Bs @ Rs @ As) < SVD_RTOL


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (
            _with(reconstr_mode="joint"),
            ValueError,
            r"\['reconstr_mode'\] must be 'separated'.*'joint'",
        ),
        (_with(r_squared="yes"), ValueError, r"\['r_squared'\] must be True or False, got 'yes'"),
        (_with(half_init_dec=1), ValueError, r"\['half_init_dec'\] must be True or False"),
        (
            _with(replacement_module_random_init=None),
            ValueError,
            r"\['replacement_module_random_init'\] must be True or False",
        ),
        (
            _with(reconstruction_type="nmf"),
            ValueError,
            r"\['reconstruction_type'\]='nmf' contradicts",
        ),
        (
            _with(learn_diagonal_only=True),
            ValueError,
            r"unknown key\(s\) \['learn_diagonal_only'\].*LoRA-XS",
        ),
        (_with(svd={"rnak": 4}), ValueError, r"\['svd'\] has unknown key\(s\) \['rnak'\]"),
        (_with(svd={"n_iter": -1}), ValueError, r"\['svd'\]\['n_iter'\] must be >= 0, got -1"),
        (
            _with(svd={"random_state": "42"}),
            ValueError,
            r"\['svd'\]\['random_state'\] must be an int",
        ),
        (_with(svd={"method": "qr"}), ValueError, r"\['svd'\]\['method'\] must be"),
        (_with(svd={"rank": 8}), ValueError, r"\['svd'\]\['rank'\]=8 differs.*would not reload"),
        ([("svd", {})], TypeError, "reconstruct_config must be a dict"),
        ({**SEED_YAML, "svd": [4]}, TypeError, r"reconstruct_config\['svd'\] must be a dict"),
    ],
)
def test_bad_seed_config_is_refused_by_name(config, error, match):
    model = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=TARGETS))
    with pytest.raises(error, match=match):
        find_and_initialize_grad(
            model,
            model.peft_config,
            "default",
            "svd",
            config,
            named_grads=_named_grads(model.base_model.model),
        )


def test_adapter_configs_that_would_break_silently_are_refused():
    # PiSSA rewrites W0 while PEFT builds the layers: re-initialising A and B afterwards would keep it
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=RANK, target_modules=TARGETS, init_lora_weights="pissa")
    )
    with pytest.raises(ValueError, match=r"init_lora_weights='pissa' cannot be used.*W0"):
        find_and_initialize_grad(
            model, model.peft_config, "default", "svd", SEED_YAML, named_grads={}
        )
    model = get_peft_model(tiny_llama(), LoraConfig(r=RANK, target_modules=TARGETS, use_dora=True))
    cfg = _with(r_squared=False)
    with pytest.raises(ValueError, match="use_dora=True, which is not plain LoRA"):
        find_and_initialize_grad(model, model.peft_config, "default", "svd", cfg, named_grads={})
    # r_squared=False asks for a plain LoRA adapter; a LoRA-SB adapter is not one
    model = get_peft_model(
        tiny_llama(), LoraSBConfig(r=RANK, target_modules=TARGETS, sb_init="random")
    )
    with pytest.raises(ValueError, match=r"\['r_squared'\]=False makes adapter 'default' a plain"):
        find_and_initialize_grad(
            model,
            model.peft_config,
            "default",
            "svd",
            cfg,
            named_grads=_named_grads(model.base_model.model),
        )


def test_embedding_targets_are_refused_not_skipped():
    model = get_peft_model(
        tiny_llama(), LoraConfig(r=RANK, target_modules=["q_proj", "embed_tokens"])
    )
    with pytest.raises(TypeError, match=r"layer 'model\.embed_tokens' \(Embedding\) hosts"):
        find_and_initialize_grad(
            model, model.peft_config, "default", "svd", SEED_YAML, named_grads={}
        )
