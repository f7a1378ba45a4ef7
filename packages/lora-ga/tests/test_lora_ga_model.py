"""get_lora_ga_model on tiny transformers models: the reference formulas (float64), step-0 equivalence,
Conv1D / bias layers, streaming, PEFT's ``lora_ga`` parity where the definitions coincide, and errors."""

import copy
import functools
import gc
import math
import weakref

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.config import LoraGAConfig as PeftLoraGASubConfig
from peft.tuners.lora.loraga import preprocess_loraga

import loralab.core.adapter_gradients as adapter_gradients
import loralab.lora_ga.model as ga_model
from loralab.core.gradients import estimate_gradients
from loralab.core.targets import get_module, weight_matrix
from loralab.core.testing import (
    make_classification_batches,
    make_lm_batches,
    make_seq2seq_batches,
    tiny_model,
)
from loralab.lora_ga import (
    LoraGAConfig,
    LoraGAInitError,
    LoraGARankError,
    get_lora_ga_model,
    lora_ga_factors,
)

RANK = 4
ALPHA = 8
GAMMA = 16
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]
PREFIX = "base_model.model."
TOL_FP32 = 1e-4  # singular vectors of an fp32 gradient vs the float64 reference (spectral gaps ~3%)


def _cfg(**kw):
    base = dict(r=RANK, lora_alpha=ALPHA, target_modules=LLAMA_TARGETS, iters=4)
    base.update(kw)
    return LoraGAConfig(**base)


def _batches(arch, n=4):
    if arch == "roberta":
        return make_classification_batches(n)
    if arch == "t5":
        return make_seq2seq_batches(n)
    return make_lm_batches(n)


def _ref_grads(model, batches, names):
    """Float64 reference: mean over batches of ∇_W loss, each as an (out, in) matrix."""
    m64 = copy.deepcopy(model).double().eval()
    sums = {n: 0.0 for n in names}
    for b in batches:
        m64.zero_grad()
        m64(**b).loss.backward()
        for n in names:
            mod = get_module(m64, n)
            g = mod.weight.grad
            sums[n] = sums[n] + (g.T if type(mod).__name__ == "Conv1D" else g)
    return {n: s / len(batches) for n, s in sums.items()}


def _ref_factors(G, r=RANK, m_scale=True):
    """Paper ArB2r + stable scale (Eq. 12, reference code's m^(1/4)/sqrt(gamma)), exact float64 SVD,
    signs fixed as the implementation documents (largest |U[:, k]| entry positive)."""
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    idx = U.abs().argmax(0)
    sg = torch.sign(U[idx, torch.arange(U.shape[1])])
    U, Vh = U * sg, Vh * sg[:, None]
    f = G.shape[0] ** 0.25 / math.sqrt(GAMMA) if m_scale else 1.0
    return Vh[:r] * f, U[:, r : 2 * r] * f, S


def _lora_layers(peft_model):
    return {
        n[len(PREFIX) :]: m
        for n, m in peft_model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def _outputs(model, batch):
    model.eval()  # like peft.get_peft_model, get_lora_ga_model returns the model in train mode (dropout on)
    with torch.no_grad():
        out = model(**batch)
    return out.logits.double()


@pytest.fixture(scope="module")
def llama_run():
    """One LoRA-GA init of a tiny Llama shared by the read-only tests below."""
    model = tiny_model("llama")
    batches = _batches("llama")
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
    W0 = {n: weight_matrix(get_module(model, n)).double() for n in names}
    G = _ref_grads(model, batches, names)
    base_out = _outputs(model, batches[0])
    pm = get_lora_ga_model(model, _cfg(), batches, progress=False, svd_method="full")
    return pm, batches, W0, G, base_out


def test_factors_and_offset_match_float64_reference(llama_run):
    pm, _, W0, G, _ = llama_run
    layers = _lora_layers(pm)
    assert sorted(layers) == sorted(W0)
    s = ALPHA / RANK
    for name, layer in layers.items():
        A_ref, B_ref, _ = _ref_factors(G[name])
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.dtype == torch.float32 and B.dtype == torch.float32
        torch.testing.assert_close(A.double(), A_ref, atol=TOL_FP32, rtol=0, msg=name)
        torch.testing.assert_close(B.double(), B_ref, atol=TOL_FP32, rtol=0, msg=name)
        # Eq. 13 with the factors as stored, to fp32 rounding of W0
        W_ref = W0[name] - s * B.double() @ A.double()
        torch.testing.assert_close(
            weight_matrix(layer.get_base_layer()).double(), W_ref, atol=1e-6, rtol=0, msg=name
        )
        assert (
            layer.lora_A["default"].weight.requires_grad
            and not layer.get_base_layer().weight.requires_grad
        )


def test_step0_output_equals_base_fp32(llama_run):
    pm, batches, _, _, base_out = llama_run
    out = _outputs(pm, batches[0])
    assert (out - base_out).abs().max() < 1e-5 * base_out.abs().max()


def test_given_gradients_give_the_reference_factors():
    model = tiny_model("llama")
    batches = _batches("llama", 2)
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
    G = _ref_grads(model, batches, names)
    pm = get_lora_ga_model(
        model, _cfg(), None, gradients={n: g.float() for n, g in G.items()}, svd_method="full"
    )
    for name, layer in _lora_layers(pm).items():
        A_ref, B_ref, _ = _ref_factors(G[name])
        torch.testing.assert_close(
            layer.lora_A["default"].weight.double(), A_ref, atol=TOL_FP32, rtol=0
        )
        torch.testing.assert_close(
            layer.lora_B["default"].weight.double(), B_ref, atol=TOL_FP32, rtol=0
        )


@pytest.mark.parametrize(
    ("scale", "direction"), [("weight_svd", "ArB2r"), ("gd", "A2rBr"), ("unit", "ArBr")]
)
def test_other_scales_and_directions_through_the_model(scale, direction):
    """The model path hands the layer's scaling and (out, in) base weight to the maths (float64 reference there)."""
    model = tiny_model("llama")
    batches = _batches("llama", 2)
    base_out = _outputs(model, batches[0])
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]
    W0 = {n: weight_matrix(get_module(model, n)).clone() for n in names}
    G = {n: g.float() for n, g in _ref_grads(model, batches, names).items()}
    cfg = _cfg(scale=scale, direction=direction, use_rslora=True)
    pm = get_lora_ga_model(model, cfg, None, gradients=G, svd_method="full")
    s = ALPHA / math.sqrt(RANK)
    for n, layer in _lora_layers(pm).items():
        A, B = lora_ga_factors(
            G[n], RANK, scaling=s, scale=scale, direction=direction, weight=W0[n], svd_method="full"
        )
        torch.testing.assert_close(layer.lora_A["default"].weight, A, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer.lora_B["default"].weight, B, atol=1e-6, rtol=0)
    assert (_outputs(pm, batches[0]) - base_out).abs().max() < 1e-5 * base_out.abs().max()


def test_random_direction_differs_per_layer_and_is_reproducible():
    model = tiny_model("llama")
    names = [n for n, m in model.named_modules() if n.endswith("q_proj")]
    G = {
        n: torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) for n in names
    }  # same gradient
    cfg = _cfg(target_modules=["q_proj"], direction="random", scale="unit")
    a = _lora_layers(get_lora_ga_model(model, cfg, None, gradients=G))
    b = _lora_layers(get_lora_ga_model(tiny_model("llama"), cfg, None, gradients=G))
    A0, A1 = (a[n].lora_A["default"].weight for n in names)
    assert not torch.allclose(A0, A1)  # another split for another layer
    for n in names:
        assert torch.equal(a[n].lora_A["default"].weight, b[n].lora_A["default"].weight)


def test_default_randomized_svd_spans_the_exact_subspaces(llama_run):
    """The default sketch (q = 4r, 4 power iterations, as the reference's svd_lowrank) vs exact SVD."""
    _, _, _, G, _ = llama_run
    for name in list(G)[:2]:
        A, B = lora_ga_factors(G[name].float(), RANK, scaling=2.0, scale="unit")
        A_ref, B_ref, _ = _ref_factors(G[name], m_scale=False)
        # cosines of the principal angles between row spaces / column spaces
        ca = torch.linalg.svdvals(A.double() @ A_ref.T).min()
        cb = torch.linalg.svdvals(B.double().T @ B_ref).min()
        assert ca > 0.95 and cb > 0.95, (name, ca, cb)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "roberta", "t5"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_step0_equivalence_all_archs(arch, use_rslora):
    """Conv1D (GPT-2, fan_in_fan_out), Linear with bias (RoBERTa), encoder-decoder (T5); rsLoRA scaling."""
    targets = {
        "llama": ["q_proj", "v_proj"],
        "gpt2": ["c_attn", "c_fc"],
        "roberta": ["query", "value", "dense"],
        "t5": ["q", "v"],
    }[arch]
    model = tiny_model(arch)
    batches = _batches(arch, 2)
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    base_out = _outputs(model, batches[0])
    cfg = _cfg(
        target_modules=targets, use_rslora=use_rslora, iters=2, fan_in_fan_out=arch == "gpt2"
    )
    pm = get_lora_ga_model(model, cfg, batches, progress=False)
    out = _outputs(pm, batches[0])
    assert (out - base_out).abs().max() < 1e-5 * base_out.abs().max()
    s = ALPHA / math.sqrt(RANK) if use_rslora else ALPHA / RANK
    for layer in _lora_layers(pm).values():
        assert layer.scaling["default"] == pytest.approx(s)
        assert layer.lora_B["default"].weight.abs().sum() > 0
    after = {
        n.replace(PREFIX, "").replace(".base_layer", ""): p
        for n, p in pm.named_parameters()
        if n.endswith("bias")
    }
    assert set(after) == set(biases)
    for n, b in biases.items():  # only weights are offset; bias gradients never enter the factors
        assert torch.equal(after[n], b), n


def test_gpt2_conv1d_factors_are_out_in():
    """Conv1D stores (in, out): the gradient, A (r, in), B (out, r) and the offset are taken in (out, in)."""
    model = tiny_model("gpt2")
    batches = _batches("gpt2", 2)
    name = "transformer.h.0.attn.c_attn"
    W0 = get_module(model, name).weight.detach().double().clone()  # (in, out) = (64, 192)
    G = _ref_grads(model, batches, [name])[name]  # (out, in)
    pm = get_lora_ga_model(
        model, _cfg(target_modules=["c_attn"], iters=2), batches, progress=False, svd_method="full"
    )
    layer = _lora_layers(pm)[name]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.shape == (RANK, 64) and B.shape == (192, RANK)
    A_ref, B_ref, _ = _ref_factors(G)
    torch.testing.assert_close(A.double(), A_ref, atol=TOL_FP32, rtol=0)
    torch.testing.assert_close(B.double(), B_ref, atol=TOL_FP32, rtol=0)
    W_ref = W0 - (ALPHA / RANK) * (B.double() @ A.double()).T
    torch.testing.assert_close(layer.get_base_layer().weight.double(), W_ref, atol=1e-6, rtol=0)


def test_bf16_weights_step0_within_bf16_rounding():
    """bf16 base weights: W0 - s·B·A is formed in fp32 from the stored factors and rounded once to bf16
    (within half a bf16 ulp, 2^-8 relative, of the float64 value, up to fp32 accumulation); the step-0 output then
    differs from the bf16 base model by bf16 noise: at most 3x what running in bf16 instead of fp32 costs."""
    model32 = tiny_model("llama")
    batches = _batches("llama", 2)
    ref32 = _outputs(model32, batches[0])
    model = tiny_model("llama").to(torch.bfloat16)
    W0 = weight_matrix(model.model.layers[0].self_attn.q_proj).double()
    base = _outputs(model, batches[0])
    bf16_cost = (base - ref32).abs().max()
    pm = get_lora_ga_model(model, _cfg(dtype="bf16", iters=2), batches, progress=False)
    layer = _lora_layers(pm)["model.layers.0.self_attn.q_proj"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == layer.get_base_layer().weight.dtype == torch.bfloat16
    exact = W0 - (ALPHA / RANK) * B.double() @ A.double()
    err = (weight_matrix(layer.get_base_layer()).double() - exact).abs()
    assert (err <= 2**-8 * exact.abs() + 1e-6).all()  # half an ulp: 8 significant bits
    diff = (_outputs(pm, batches[0]) - base).abs().max()
    assert diff <= 3 * bf16_cost, (diff, bf16_cost)


def test_bf16_adapter_dtype_on_fp32_model_offsets_with_stored_values():
    model = tiny_model("llama")
    batches = _batches("llama", 2)
    base = _outputs(model, batches[0])
    W0 = weight_matrix(model.model.layers[0].self_attn.q_proj).double()
    pm = get_lora_ga_model(model, _cfg(dtype="bf16", iters=2), batches, progress=False)
    layer = _lora_layers(pm)["model.layers.0.self_attn.q_proj"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert A.dtype == B.dtype == torch.bfloat16
    torch.testing.assert_close(
        weight_matrix(layer.get_base_layer()).double(),
        W0 - 2.0 * B.double() @ A.double(),
        atol=1e-6,
        rtol=0,
    )
    # The offset used the bf16 values exactly: with the adapter's forward in fp32 (PEFT runs it in the
    # adapter dtype, which rounds the input x to bf16) step 0 is the base model to fp32 rounding.
    for n, p in pm.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    out = _outputs(pm, batches[0])
    assert (out - base).abs().max() < 1e-5 * base.abs().max()


@pytest.mark.parametrize("offload", [False, True])
def test_streaming_holds_one_gradient_at_a_time(monkeypatch, offload):
    """Each gradient is turned into (A, B) and released before the next one arrives (core's consumer)."""
    seen = []
    original = ga_model.factors_for

    def spy(pending, grad, name, **kw):
        assert all(r() is None for r in seen), "an earlier full gradient is still alive"
        out = original(pending, grad, name, **kw)
        seen.append(weakref.ref(grad))
        return out

    monkeypatch.setattr(ga_model, "factors_for", spy)
    model = tiny_model("llama")
    batches = _batches("llama", 2)
    pm = get_lora_ga_model(
        model,
        _cfg(iters=2),
        batches,
        progress=False,
        offload=offload,
        device="cpu" if offload else None,
    )
    assert len(seen) == 3 * 2
    if offload:  # same init as the plain path
        monkeypatch.setattr(ga_model, "factors_for", original)
        plain = get_lora_ga_model(tiny_model("llama"), _cfg(iters=2), batches, progress=False)
        a, b = _lora_layers(pm), _lora_layers(plain)
        for n in a:
            torch.testing.assert_close(
                a[n].lora_B["default"].weight, b[n].lora_B["default"].weight, atol=1e-5, rtol=0
            )
            torch.testing.assert_close(
                a[n].lora_A["default"].weight, b[n].lora_A["default"].weight, atol=1e-5, rtol=0
            )


def _live_fp32_like(shapes):
    """Live float32 tensors (not parameters) shaped like a target's gradient: what the estimator holds."""
    gc.collect()
    return sum(
        1
        for o in gc.get_objects()
        if isinstance(o, torch.Tensor)
        and not isinstance(o, torch.nn.Parameter)
        and o.dtype == torch.float32
        and tuple(o.shape) in shapes
    )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_plain_path_holds_one_block_of_gradients_at_a_time(monkeypatch):
    """Without offload, a model with decoder blocks streams block by block in place (core's
    ``blockwise`` default): when a layer's gradient arrives, at most one block's sums exist."""
    model = tiny_model("llama")
    shapes = {tuple(weight_matrix(get_module(model, n)).shape) for n in _llama_target_names(model)}
    per_block = len(LLAMA_TARGETS)
    original = ga_model.factors_for
    # short batches: on this 64-wide model the boundary activations of 2 x 16-token batches would
    # outweigh the 56 KiB of sums the block-wise order saves, and the default would (rightly) use hooks
    data = make_lm_batches(2, batch_size=1, seq_len=8)

    def run(estimator):
        seen, counts = [], []

        def spy(pending, grad, name, **kw):
            counts.append(_live_fp32_like(shapes))
            seen.append(name)
            return original(pending, grad, name, **kw)

        monkeypatch.setattr(ga_model, "factors_for", spy)
        # get_lora_ga_model estimates through core's estimate_adapter_gradients
        monkeypatch.setattr(adapter_gradients, "estimate_gradients", estimator)
        pm = get_lora_ga_model(copy.deepcopy(model), _cfg(iters=2), data, progress=False)
        return pm, seen, counts

    pm, seen, counts = run(estimate_gradients)
    assert max(counts) <= per_block, counts
    assert [n.split(".")[2] for n in seen] == ["1"] * per_block + [
        "0"
    ] * per_block  # last block first
    # the hook path (blockwise=False) holds every target's sum: the counter is not vacuous
    hooks, _, hook_counts = run(functools.partial(estimate_gradients, blockwise=False))
    assert max(hook_counts) == 2 * per_block
    a, b = _lora_layers(pm), _lora_layers(hooks)  # and both give the same init
    for n in a:
        for f in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                getattr(a[n], f)["default"].weight,
                getattr(b[n], f)["default"].weight,
                atol=1e-5,
                rtol=0,
            )


def _llama_target_names(model):
    return [n for n, _ in model.named_modules() if n.split(".")[-1] in LLAMA_TARGETS]


def test_uses_config_iters_batches():
    consumed = []

    def gen():
        for i, b in enumerate(_batches("llama", 5)):
            consumed.append(i)
            yield b

    get_lora_ga_model(tiny_model("llama"), _cfg(iters=2), gen(), progress=False)
    assert consumed == [0, 1]


def test_peft_lora_ga_parity_where_definitions_coincide():
    """PEFT's ``init_lora_weights="lora_ga"`` on the same gradients.

    Known difference (PEFT >= 0.19 vs the reference, which we follow): PEFT multiplies B by
    diag(S[r:2r]) and applies the stable factor m^(1/4)/sqrt(gamma) to B only, leaving A unscaled.
    So with the ``unit`` and ``gd`` scales A coincides exactly, and B_peft = B_ours · diag(S[r:2r]);
    with ``stable`` A_peft = A_ours / f and B_peft = B_ours · diag(S[r:2r]). Singular vectors are
    compared up to sign (PEFT's svd_lowrank has arbitrary signs). Both offsets keep step 0 exact.
    """
    model = tiny_model("llama")
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj", "v_proj")]
    gen = torch.Generator().manual_seed(0)
    G = {}
    for n in names:  # well-separated spectra: both randomized SVDs converge to fp32 accuracy
        m_, n_ = weight_matrix(get_module(model, n)).shape
        U, _ = torch.linalg.qr(torch.randn(m_, m_, generator=gen))
        V, _ = torch.linalg.qr(torch.randn(n_, n_, generator=gen))
        k = min(m_, n_)
        G[n] = (U[:, :k] * (0.7 ** torch.arange(k, dtype=torch.float32)) @ V[:, :k].T).contiguous()
    batch = _batches("llama", 1)[0]
    base = _outputs(model, batch)
    for scale, peft_scale in (("unit", "unit"), ("gd", "gd_scale"), ("stable", "stable")):
        ours = get_lora_ga_model(
            copy.deepcopy(model),
            _cfg(target_modules=["q_proj", "v_proj"], scale=scale),
            None,
            gradients=G,
        )
        theirs_model = copy.deepcopy(model)
        for n in names:
            get_module(theirs_model, n)._peft_loraga_grad = G[n].clone()
        peft_cfg = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights="lora_ga",
            lora_ga_config=PeftLoraGASubConfig(scale=peft_scale, stable_gamma=GAMMA),
        )
        theirs = get_peft_model(theirs_model, peft_cfg)
        lo, lt = _lora_layers(ours), _lora_layers(theirs)
        for n in names:
            A_o, B_o = lo[n].lora_A["default"].weight, lo[n].lora_B["default"].weight
            A_t, B_t = lt[n].lora_A["default"].weight, lt[n].lora_B["default"].weight
            m_ = B_o.shape[0]
            f = m_**0.25 / math.sqrt(GAMMA) if scale == "stable" else 1.0
            S_B = torch.linalg.svdvals(G[n].double())[RANK : 2 * RANK].float()
            A_exp, B_exp = A_o / f, B_o * S_B
            sa = torch.sign((A_t * A_exp).sum(1, keepdim=True))
            sb = torch.sign((B_t * B_exp).sum(0, keepdim=True))
            torch.testing.assert_close(A_t, A_exp * sa, atol=1e-5, rtol=1e-4, msg=f"{scale} {n} A")
            torch.testing.assert_close(B_t, B_exp * sb, atol=1e-5, rtol=1e-4, msg=f"{scale} {n} B")
        for pm in (ours, theirs):
            assert (_outputs(pm, batch) - base).abs().max() < 1e-5 * base.abs().max()


def test_gradient_estimate_matches_peft_preprocess():
    """Our streamed estimate equals PEFT's ``preprocess_loraga`` gradient (same batches, mean of batch losses)."""
    model = tiny_model("llama")
    batches = _batches("llama", 3)
    cfg = LoraConfig(
        r=RANK,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights="lora_ga",
        lora_ga_config=PeftLoraGASubConfig(),
    )

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    preprocess_loraga(model, cfg, train_step)
    ours = estimate_gradients(model, batches, ["q_proj", "v_proj"], progress=False)
    for n, g in ours.items():
        torch.testing.assert_close(g, get_module(model, n)._peft_loraga_grad, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- errors


def test_rank_error_names_the_layer_before_estimating():
    model = tiny_model("llama")

    def never():
        raise AssertionError("estimation must not start")
        yield

    with pytest.raises(
        LoraGARankError, match=r"'model.layers.0.self_attn.v_proj' \(32x64\).*r <= 16"
    ):
        get_lora_ga_model(model, _cfg(r=17, target_modules=["v_proj"]), never(), progress=False)
    # the model is given back untouched (no LoRA layers left behind)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_non_linear_targets_are_refused_not_default_initialised():
    model = tiny_model("llama")
    with pytest.raises(
        LoraGAInitError, match=r"Linear and Conv1D layers only.*model\.embed_tokens \(Embedding\)"
    ):
        get_lora_ga_model(
            model,
            _cfg(target_modules=["embed_tokens", "q_proj"]),
            _batches("llama", 1),
            progress=False,
        )
    assert not any("lora" in n for n, _ in model.named_modules())


def test_plain_get_peft_model_without_gradients_raises():
    with pytest.raises(LoraGAInitError, match=r"without gradients.*never falls back silently"):
        get_peft_model(tiny_model("llama"), _cfg())


def test_gradient_dict_errors():
    model = tiny_model("llama")
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in ("q_proj", "v_proj")]
    G = {n: torch.randn(weight_matrix(get_module(model, n)).shape) for n in names}
    missing = dict(G)
    del missing[names[1]]
    with pytest.raises(LoraGAInitError, match=f"no entry for target layer '{names[1]}'"):
        get_lora_ga_model(model, _cfg(target_modules=["q_proj", "v_proj"]), None, gradients=missing)
    wrong = dict(G)
    wrong[names[1]] = G[names[1]].T
    with pytest.raises(LoraGAInitError, match=r"must be \(out, in\) = \(32, 64\), got \(64, 32\)"):
        get_lora_ga_model(model, _cfg(target_modules=["q_proj", "v_proj"]), None, gradients=wrong)
    nan = dict(G)
    nan[names[0]] = G[names[0]].clone()
    nan[names[0]][0, 0] = float("inf")
    with pytest.raises(ValueError, match=f"{names[0]}: the gradient has non-finite values"):
        get_lora_ga_model(model, _cfg(target_modules=["q_proj", "v_proj"]), None, gradients=nan)


def test_argument_errors():
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"must be a loralab\.lora_ga\.LoraGAConfig"):
        get_lora_ga_model(model, LoraConfig(r=RANK), _batches("llama", 1))
    with pytest.raises(ValueError, match="init_lora_weights must be 'lora_ga'"):
        get_lora_ga_model(model, _cfg(init_lora_weights="gaussian"), _batches("llama", 1))
    with pytest.raises(ValueError, match="batches is None"):
        get_lora_ga_model(model, _cfg(), None)
    pm = get_peft_model(tiny_model("llama"), LoraConfig(r=RANK, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="already a PeftModel"):
        get_lora_ga_model(pm, _cfg(), _batches("llama", 1))
