"""PEFT's own LoRA-GA flow next to loralab: stock PEFT adapters are untouched by ``import
loralab.lora_ga``, and ``loralab.lora_ga.preprocess_loraga`` is a drop-in for ``peft.preprocess_loraga``
(PEFT's definition of the init, core's estimation, 4-bit bases, PEFT's cache files).

Tolerances: A and B against PEFT's own ``preprocess_loraga`` + ``get_peft_model`` 1e-4 (rank 16 on
64-wide layers: PEFT's ``svd_lowrank(q=min(4r, min(m, n)))`` then spans the whole space, so its SVD is
exact up to float32, and singular-vector signs are aligned per vector since PEFT's follow its random
sketch); against a float64 reference of PEFT's definition 1e-4; offsets 1e-6.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import warnings

import peft
import pytest
import torch
from peft.tuners.lora import layer as peft_lora

import loralab.lora_ga  # noqa: F401  (imported before PEFT's flow runs: it must change nothing)
from loralab.core.gradients import GradientEstimationError
from loralab.core.targets import get_module, weight_matrix
from loralab.core.testing import make_lm_batches, save_tiny, tiny_gpt2, tiny_llama
from loralab.lora_ga import (
    LoraGAConfig,
    LoraGAInitError,
    LoraGARankError,
    preprocess_loraga,
    save_lora_ga_adapter,
)
from loralab.lora_ga.layer import LoraGALinear
from loralab.lora_ga.maths import canonical_signs

RANK = 16  # 4r = 64 = the layers' width: PEFT's randomized SVD is exact
ALPHA = 8
TARGETS = ["q_proj", "o_proj", "down_proj"]
PREFIX = "base_model.model."
TOL = 1e-4


def _config(**kw):
    sub = kw.pop("lora_ga_config", None) or peft.LoraGAConfig()
    base = dict(
        r=RANK,
        lora_alpha=ALPHA,
        target_modules=TARGETS,
        init_lora_weights="lora_ga",
        lora_ga_config=sub,
    )
    base.update(kw)
    return peft.LoraConfig(**base)


def _train_step(model, batches):
    def train_step():
        for b in batches:
            model(**b).loss.backward()

    return train_step


def _build(preprocess, config, model=None, batches=None, seed=0):
    model = tiny_llama() if model is None else model
    batches = make_lm_batches(3) if batches is None else batches
    preprocess(model, config, _train_step(model, batches))
    torch.manual_seed(seed)
    return peft.get_peft_model(model, config)


def _layers(peft_model):
    return {
        n.removeprefix(PREFIX): m
        for n, m in peft_model.named_modules()
        if isinstance(m, peft_lora.LoraLayer) and "default" in m.lora_A
    }


def _factors(layer):
    return layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()


def _peft_reference(G, r, scaling, direction="ArB2r", scale="stable", gamma=16, W=None):
    """PEFT's definition in float64 with an exact SVD and canonical signs (S folded in B)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    U, Vh = canonical_signs(U, Vh)
    idx = {
        "ArB2r": (torch.arange(r), torch.arange(r, 2 * r)),
        "A2rBr": (torch.arange(r, 2 * r), torch.arange(r)),
        "ArBr": (torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)),
    }[direction]
    A, B = Vh[idx[0]], U[:, idx[1]] * S[idx[1]]
    if scale == "stable":
        B = B * G.shape[0] ** 0.25 / math.sqrt(gamma)
    elif scale == "gd_scale":
        A, B = A / scaling, B / scaling
    elif scale == "weight_svd":
        B = B * torch.linalg.svdvals(W.double())[0] / S[idx[1]][0]
    return A, B


def _ref_grads(model, batches, names):
    m64 = copy.deepcopy(model).double().train()
    sums = dict.fromkeys(names, 0.0)
    for b in batches:
        m64.zero_grad()
        m64(**b).loss.backward()
        for n in names:
            sums[n] = sums[n] + get_module(m64, n).weight.grad
    return {n: s / len(batches) for n, s in sums.items()}


# ---------------------------------------------------------------------------- stock PEFT untouched


def test_stock_peft_lora_ga_adapter_loads_without_loralab_warning(tmp_path):
    # PEFT's own flow, end to end, after `import loralab.lora_ga`: PEFT's classes, PEFT's init, and the
    # saved adapter loads with bare PEFT without anything from loralab
    model = tiny_llama()
    config = _config(r=4)
    peft.preprocess_loraga(model, config, _train_step(model, make_lm_batches(2)))
    pm = peft.get_peft_model(model, config)
    layer = _layers(pm)["model.layers.0.self_attn.q_proj"]
    assert type(layer) is peft_lora.Linear
    A, B = _factors(layer)
    assert B.abs().sum() > 0  # PEFT's LoRA-GA init ran (not the default B = 0)
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ours = [
        w
        for w in caught
        if "loralab" in str(w.filename)
        or "loralab" in str(w.message)
        or "LoRA-GA" in str(w.message)
    ]
    assert ours == []
    reloaded = _layers(loaded)["model.layers.0.self_attn.q_proj"]
    assert type(reloaded) is peft_lora.Linear
    torch.testing.assert_close(_factors(reloaded)[0], A, rtol=0, atol=0)
    torch.testing.assert_close(_factors(reloaded)[1], B, rtol=0, atol=0)


# ---------------------------------------------------------------------------- the drop-in


@pytest.mark.parametrize(
    "direction,scale",
    [("ArB2r", "stable"), ("ArBr", "unit"), ("A2rBr", "gd_scale"), ("ArB2r", "stable")],
)
def test_drop_in_yields_peft_init(direction, scale):
    sub = peft.LoraGAConfig(direction=direction, scale=scale, stable_gamma=9)
    batches = make_lm_batches(3)
    theirs = _build(peft.preprocess_loraga, _config(lora_ga_config=sub), batches=batches)
    W0 = {n: weight_matrix(get_module(tiny_llama(), n)).double() for n in _layers(theirs)}
    ours = _build(preprocess_loraga, _config(lora_ga_config=sub), batches=batches)
    mine, peft_layers = _layers(ours), _layers(theirs)
    assert sorted(mine) == sorted(peft_layers) and len(mine) == 2 * len(TARGETS)
    s = ALPHA / RANK
    for name, layer in mine.items():
        assert type(layer) is LoraGALinear and type(peft_layers[name]) is peft_lora.Linear
        A, B = _factors(layer)
        Ap, Bp = _factors(peft_layers[name])
        assert A.dtype == Ap.dtype == torch.float32
        signs_a = torch.sign((A * Ap).sum(1, keepdim=True))
        signs_b = torch.sign((B * Bp).sum(0, keepdim=True))
        torch.testing.assert_close(A * signs_a, Ap, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(B * signs_b, Bp, atol=TOL, rtol=0, msg=name)
        # W0' = W0 - s B A with each side's own (stored) factors, as PEFT does
        for lay, (a, b) in ((layer, (A, B)), (peft_layers[name], (Ap, Bp))):
            W = weight_matrix(lay.get_base_layer()).double()
            torch.testing.assert_close(W, W0[name] - s * b.double() @ a.double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "direction,scale",
    [("ArB2r", "stable"), ("A2rBr", "unit"), ("ArBr", "gd_scale"), ("ArB2r", "weight_svd")],
)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_drop_in_matches_float64_reference_of_peft_definition(direction, scale, use_rslora):
    model, batches = tiny_llama(), make_lm_batches(3)
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in TARGETS]
    G = _ref_grads(model, batches, names)
    W0 = {n: weight_matrix(get_module(model, n)).double() for n in names}
    sub = peft.LoraGAConfig(direction=direction, scale=scale, stable_gamma=16)
    r = 8
    config = _config(r=r, lora_ga_config=sub, use_rslora=use_rslora, rank_pattern={"o_proj": 4})
    pm = _build(preprocess_loraga, config, model=model, batches=batches)
    for name, layer in _layers(pm).items():
        r_layer = 4 if name.endswith("o_proj") else r
        s = ALPHA / math.sqrt(r_layer) if use_rslora else ALPHA / r_layer
        assert layer.r["default"] == r_layer and layer.scaling["default"] == pytest.approx(s)
        A_ref, B_ref = _peft_reference(G[name], r_layer, s, direction, scale, W=W0[name])
        A, B = _factors(layer)
        torch.testing.assert_close(A.double(), A_ref, atol=TOL, rtol=0, msg=name)
        torch.testing.assert_close(B.double(), B_ref, atol=TOL, rtol=0, msg=name)


def test_random_direction_is_reproducible_and_uses_one_index_set():
    sub = peft.LoraGAConfig(direction="random", scale="unit")
    a = _layers(_build(preprocess_loraga, _config(r=4, lora_ga_config=sub)))
    b = _layers(_build(preprocess_loraga, _config(r=4, lora_ga_config=sub)))
    for name in a:
        A, B = _factors(a[name])
        torch.testing.assert_close(A, _factors(b[name])[0], rtol=0, atol=0)
        # PEFT's "random": A's rows and B's columns are the same singular triplets, so B·A = U_k S_k Vh_k
        # is a sum of r rank-one terms of the gradient's SVD with A orthonormal
        torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
        gram = B.T @ B  # diag(S_k²): B's columns are orthogonal singular vectors times S_k
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), atol=1e-7, rtol=0)


def test_gpt2_conv1d_step0_and_save_export(tmp_path):
    model, batches = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), make_lm_batches(2)
    with torch.no_grad():
        base = model.eval()(**batches[0]).logits
    config = _config(r=4, target_modules=["c_attn", "c_fc"])
    pm = _build(preprocess_loraga, config, model=model, batches=batches).eval()
    with torch.no_grad():
        out = pm(**batches[0]).logits
    assert (out - base).abs().max() < 1e-5 * base.abs().max()
    # PEFT's own save: the same file as PEFT's flow writes, loading with bare PEFT (PEFT's classes)
    pm.save_pretrained(tmp_path / "raw")
    theirs = _build(
        peft.preprocess_loraga,
        _config(r=4, target_modules=["c_attn", "c_fc"]),
        model=tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        batches=batches,
    )
    theirs.save_pretrained(tmp_path / "peft")
    ours_cfg = json.loads((tmp_path / "raw" / "adapter_config.json").read_text())
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert ours_cfg == peft_cfg
    raw = peft.PeftModel.from_pretrained(tiny_gpt2(), tmp_path / "raw")
    for name, layer in _layers(raw).items():
        assert type(layer) is peft_lora.Linear
        torch.testing.assert_close(
            _factors(layer)[1], _factors(_layers(pm)[name])[1], rtol=0, atol=0
        )
    # the drop-in keeps the initial factors: the plain rank-2r export loads on the original base
    save_lora_ga_adapter(pm, tmp_path)
    fresh = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    plain = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batches[0]).logits, out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- cache_file


def test_cache_file_is_written_read_and_interchangeable_with_peft(tmp_path, monkeypatch):
    batches = make_lm_batches(2)
    cache = tmp_path / "sub" / "grads.pt"  # PEFT creates the directory
    first = _layers(_build(preprocess_loraga, _config(r=4), batches=batches))
    # PEFT's own cache format, our writer
    model = tiny_llama()
    preprocess_loraga(model, _config(r=4), _train_step(model, batches), cache_file=str(cache))
    saved = torch.load(cache, weights_only=True)
    assert sorted(saved) == sorted(f"{n}._peft_loraga_grad" for n in first)

    def never():
        raise AssertionError("train_step must not run when the cache exists")

    model = tiny_llama()
    config = _config(r=4)
    preprocess_loraga(model, config, never, cache_file=str(cache))
    cached = _layers(peft.get_peft_model(model, config))
    for name in first:
        torch.testing.assert_close(_factors(cached[name])[0], _factors(first[name])[0])
        torch.testing.assert_close(_factors(cached[name])[1], _factors(first[name])[1])
    # PEFT reads our file, and we read PEFT's (Conv1D layouts included: GPT-2)
    model = tiny_llama()
    peft.preprocess_loraga(model, _config(r=4), never, cache_file=str(cache))
    assert model.model.layers[0].self_attn.q_proj._peft_loraga_grad.shape == (64, 64)
    gpt_cache = tmp_path / "gpt2.pt"
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg = _config(r=4, target_modules=["c_fc"])
    peft.preprocess_loraga(model, cfg, _train_step(model, batches), cache_file=str(gpt_cache))
    theirs = _layers(peft.get_peft_model(model, cfg))
    model = tiny_gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg = _config(r=4, target_modules=["c_fc"])
    preprocess_loraga(model, cfg, never, cache_file=str(gpt_cache))
    for name, layer in _layers(peft.get_peft_model(model, cfg)).items():
        A, B = _factors(layer)
        Ap, Bp = _factors(theirs[name])
        assert A.shape == Ap.shape and B.shape == Bp.shape
        torch.testing.assert_close(A.abs().sum(), Ap.abs().sum(), atol=1e-3, rtol=1e-3)
    # a bare file name (PEFT's os.makedirs("") fails on it) and an empty file (estimated again)
    monkeypatch.chdir(tmp_path)
    model = tiny_llama()
    preprocess_loraga(model, _config(r=4), _train_step(model, batches), cache_file="bare.pt")
    assert (tmp_path / "bare.pt").stat().st_size > 0
    (tmp_path / "empty.pt").write_bytes(b"")
    model = tiny_llama()
    preprocess_loraga(model, _config(r=4), _train_step(model, batches), cache_file="empty.pt")
    assert (tmp_path / "empty.pt").stat().st_size > 0


# ---------------------------------------------------------------------------- quantized base


def test_4bit_base_which_peft_refuses(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loralab.core.quant import (
        dequantize_weight,
        dequantized_copy,
        quant_config_of,
        requantize_weight_,
    )

    path = save_tiny(tiny_llama(), tmp_path / "tiny", tokenizer=False)
    q = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def load():
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=q, device_map="cpu", dtype=torch.float32
        )

    batches = make_lm_batches(2)
    model = load()
    with pytest.raises(ValueError, match="LoRA-GA does not support quantized models"):
        peft.preprocess_loraga(model, _config(r=4), _train_step(model, batches))
    # the float point the 4-bit model trains from, through the same drop-in: the reference
    ref_model = dequantized_copy(load())
    ref = _layers(_build(preprocess_loraga, _config(r=4), model=ref_model, batches=batches))
    model = load()
    spec = quant_config_of(model.model.layers[0].self_attn.q_proj)
    W_deq = dequantize_weight(model.model.layers[0].self_attn.q_proj)
    pm = _build(preprocess_loraga, _config(r=4), model=model, batches=batches)
    layers = _layers(pm)
    assert sorted(layers) == sorted(ref)
    for name, layer in layers.items():
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        assert quant_config_of(layer.get_base_layer()) == spec  # NF4 stays NF4, same settings
        torch.testing.assert_close(_factors(layer)[0], _factors(ref[name])[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(_factors(layer)[1], _factors(ref[name])[1], atol=1e-5, rtol=0)
    # the stored 4-bit weight is NF4(deq(W0) - s·B·A) with the layer's own settings (core's
    # requantize_weight_, checked against bitsandbytes in test_lora_ga_quant)
    layer = layers["model.layers.0.self_attn.q_proj"]
    A, B = _factors(layer)
    fresh = load().model.layers[0].self_attn.q_proj
    requantize_weight_(fresh, W_deq - layer.scaling["default"] * B @ A)
    assert torch.equal(dequantize_weight(layer.get_base_layer()), dequantize_weight(fresh))
    assert not torch.equal(dequantize_weight(layer.get_base_layer()), W_deq)


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (
            dict(lora_ga_config=None, init_lora_weights=True),
            ValueError,
            "please initialize the LoraConfig",
        ),
        (
            dict(init_lora_weights="gaussian"),
            ValueError,
            r"init_lora_weights must be 'lora_ga'.*gaussian",
        ),
        (
            dict(lora_ga_config=peft.LoraGAConfig(direction="BrAr")),
            ValueError,
            r"lora_ga_config.direction must be one of .* got 'BrAr'",
        ),
        (
            dict(lora_ga_config=peft.LoraGAConfig(scale="gd")),
            ValueError,
            r"lora_ga_config.scale must be one of .* got 'gd'",
        ),
        (
            dict(lora_ga_config=peft.LoraGAConfig(stable_gamma=0)),
            ValueError,
            "stable_gamma must be a positive number, got 0",
        ),
        (dict(use_dora=True), ValueError, "use_dora=True is not supported"),
        (
            dict(r=40),
            LoraGARankError,
            r"layer 'model.layers.0.self_attn.q_proj' \(64x64\).*2r = 80",
        ),
        (
            dict(target_modules=["q_proj", "embed_tokens"]),
            LoraGAInitError,
            r"matched model.embed_tokens \(Embedding\)",
        ),
        (dict(target_modules=["nothing_here"]), ValueError, "No supported layers found"),
    ],
)
def test_config_errors_name_the_field(kwargs, error, match):
    model = tiny_llama()
    if kwargs.get("init_lora_weights") is True:
        config = peft.LoraConfig(r=4, target_modules=TARGETS)
    else:
        config = _config(**kwargs)
    with pytest.raises(error, match=match):
        preprocess_loraga(model, config, lambda: None)


def test_other_errors():
    model = tiny_llama()
    with pytest.raises(TypeError, match=r"is a loralab\.lora_ga\.LoraGAConfig"):
        preprocess_loraga(model, LoraGAConfig(r=4, target_modules=TARGETS), lambda: None)
    with pytest.raises(TypeError, match=r"lora_config must be a peft\.LoraConfig"):
        preprocess_loraga(model, {"r": 4}, lambda: None)
    # a target no backward pass reaches: named (PEFT would silently give it the default init)

    def only_first_layers():
        model.model.layers[0].self_attn.q_proj(torch.randn(2, 64)).sum().backward()

    with pytest.raises(GradientEstimationError, match=r"model.layers.1.self_attn.q_proj"):
        preprocess_loraga(model, _config(r=4), only_first_layers)
    # the same config object, reused without preprocessing: an error, not PEFT's default init
    config = _config(r=4)
    preprocess_loraga(model, config, _train_step(model, make_lm_batches(1)))
    with pytest.raises(
        LoraGAInitError, match=r"has no gradient: call loralab\.lora_ga\.preprocess_loraga"
    ):
        peft.get_peft_model(tiny_llama(), config)


def test_cache_without_a_target_raises(tmp_path):
    model = tiny_llama()
    cache = tmp_path / "grads.pt"
    preprocess_loraga(model, _config(r=4), _train_step(model, make_lm_batches(1)), str(cache))
    with pytest.raises(LoraGAInitError, match=r"has no gradient for target layer\(s\).*up_proj"):
        preprocess_loraga(
            tiny_llama(),
            _config(r=4, target_modules=["q_proj", "up_proj"]),
            lambda: None,
            str(cache),
        )


def test_drop_in_streams_one_full_gradient_at_a_time(monkeypatch):
    """Each finished gradient becomes (A, B) and is released before the next one is decomposed; no full
    gradient stays on the model (PEFT keeps every target's ``_peft_loraga_grad`` until get_peft_model)."""
    import weakref

    from loralab.lora_ga import peft_flow

    seen = []
    original = peft_flow.peft_lora_ga_factors

    def spy(grad, *args, **kwargs):
        assert all(r() is None for r in seen), "an earlier full gradient is still alive"
        out = original(grad, *args, **kwargs)
        seen.append(weakref.ref(grad))
        return out

    monkeypatch.setattr(peft_flow, "peft_lora_ga_factors", spy)
    model = tiny_llama()
    preprocess_loraga(model, _config(r=4), _train_step(model, make_lm_batches(2)))
    assert len(seen) == 2 * len(TARGETS)
    assert not any(hasattr(m, "_peft_loraga_grad") for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
