"""estimate_gradients against float64 references, its errors, and the all-reduce under torchrun."""

from pathlib import Path

import pytest
import torch
from torch import nn

from loralab.core.gradients import GradientEstimationError, default_loss, estimate_gradients
from loralab.core.targets import find_targets
from loralab.core.testing import make_lm_batches, run_torchrun, tiny_gpt2, tiny_llama

N_BATCHES = 3
# float32 estimate vs float64 reference: round-off of a float32 forward/backward on a tiny model
RTOL_F32 = 1e-4


def _reference(model, batches, targets):
    """G = (1/N) Σ_b ∂L_b/∂W in float64, by plain autograd on a float64 copy, as (out, in) matrices."""
    import copy

    m64 = copy.deepcopy(model).double()
    names = list(targets)
    weights = [m64.get_submodule(n).weight for n in names]
    acc = [torch.zeros_like(w) for w in weights]
    for b in batches:
        loss = m64(**b).loss
        for a, g in zip(acc, torch.autograd.grad(loss, weights)):
            a += g / len(batches)
    return {n: (a.T if targets[n].kind == "conv1d" else a) for n, a in zip(names, acc)}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2-conv1d"])
def test_matches_float64_reference(build):
    model = build()
    batches = make_lm_batches(N_BATCHES, pad_last=2)
    targets = find_targets(model)
    grads = estimate_gradients(model, batches, targets, progress=False)
    ref = _reference(model, batches, targets)
    assert list(grads) == list(targets)
    for name, g in grads.items():
        assert g.dtype == torch.float32 and g.shape == targets[name].shape
        torch.testing.assert_close(g.double(), ref[name], rtol=RTOL_F32, atol=1e-7)


def test_num_batches_and_consumer():
    model = tiny_llama()
    batches = make_lm_batches(4)
    two = estimate_gradients(model, iter(batches), ["v_proj"], num_batches=2, progress=True)
    ref = estimate_gradients(model, batches[:2], ["v_proj"], progress=False)
    for n in ref:
        torch.testing.assert_close(two[n], ref[n], rtol=0, atol=0)
    got = {}
    out = estimate_gradients(
        model, batches[:2], ["v_proj"], consumer=lambda n, g: got.__setitem__(n, g), progress=False
    )
    assert out == {} and list(got) == list(ref)
    with pytest.raises(ValueError, match="num_batches must be >= 1"):
        estimate_gradients(model, batches, num_batches=0)


def test_state_restored():
    model = tiny_llama()
    model.train()
    model.lm_head.weight.requires_grad_(False)
    sentinel = torch.ones_like(model.model.norm.weight)
    model.model.norm.weight.grad = sentinel
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    estimate_gradients(model, make_lm_batches(1), ["q_proj"], progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training
    assert model.model.norm.weight.grad is sentinel
    assert model.model.layers[0].self_attn.q_proj.weight.grad is None


def test_eval_by_default_train_on_request():
    model = tiny_llama(attention_dropout=0.5)
    batches = make_lm_batches(1)
    a = estimate_gradients(model, batches, ["q_proj"], progress=False)
    b = estimate_gradients(model, batches, ["q_proj"], progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval: deterministic
    c = estimate_gradients(model, batches, ["q_proj"], train=True, progress=False)
    assert any(not torch.equal(a[n], c[n]) for n in a)  # dropout active


def test_empty_data():
    with pytest.raises(GradientEstimationError, match="no batches: the data iterable was empty"):
        estimate_gradients(tiny_llama(), [], progress=False)


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x):
        return self.used(x)


def test_unused_layer_is_named():
    model = _TwoLayers()
    with pytest.raises(
        GradientEstimationError, match=r"1 target layer\(s\) received no gradient.*: unused"
    ):
        estimate_gradients(
            model, [torch.randn(2, 4)], loss_fn=lambda m, x: m(x).sum(), progress=False
        )


def test_non_finite_gradient_names_layer():
    model = _TwoLayers()
    with torch.no_grad():
        model.used.weight.zero_()
        model.used.bias.zero_()
    # sqrt at 0: the loss is finite (0) but its gradient is not
    loss_fn = lambda m, x: torch.sqrt(m.used(x).abs()).sum()  # noqa: E731
    with pytest.raises(GradientEstimationError, match=r"non-finite gradient for layer 'used'"):
        estimate_gradients(model, [torch.randn(2, 4)], ["used"], loss_fn=loss_fn, progress=False)


def test_non_finite_loss_and_bad_batches():
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(GradientEstimationError, match="non-finite loss"):
        estimate_gradients(model, make_lm_batches(1), progress=False)
    with pytest.raises(GradientEstimationError, match="batches must be mappings"):
        default_loss(tiny_llama(), [1, 2])
    batch = make_lm_batches(1)[0]
    del batch["labels"]
    with pytest.raises(GradientEstimationError, match="include 'labels'"):
        estimate_gradients(tiny_llama(), [batch], progress=False)


def test_tied_weights_and_empty_mapping():
    model = _TwoLayers()
    model.unused.weight = model.used.weight
    with pytest.raises(GradientEstimationError, match="tied weights"):
        estimate_gradients(
            model, [torch.randn(2, 4)], loss_fn=lambda m, x: m(x).sum(), progress=False
        )
    with pytest.raises(GradientEstimationError, match="empty mapping"):
        estimate_gradients(model, [torch.randn(2, 4)], {}, progress=False)


@pytest.mark.multiprocess
def test_all_reduce_under_torchrun(tmp_path):
    worker = Path(__file__).with_name("dist_gradients_worker.py")
    prefix = tmp_path / "out"
    run_torchrun(worker, prefix, timeout=300)
    r0, r1 = (torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1))
    model = tiny_llama()
    # all-reduced = the mean over both ranks' batches (equal counts), the same on every rank
    everything = make_lm_batches(2, seed=100) + make_lm_batches(2, seed=101)
    expected = estimate_gradients(model, everything, ["q_proj", "down_proj"], progress=False)
    for name in expected:
        for r in (r0, r1):
            torch.testing.assert_close(r["plain"][name], expected[name], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(r["offload"][name], expected[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(r0["plain"][name], r1["plain"][name], rtol=0, atol=0)
        assert not torch.allclose(
            r0["local"][name], r1["local"][name]
        )  # reduce=False keeps each rank's own
    assert torch.equal(r0["broadcast"], torch.ones(2)) and torch.equal(
        r1["broadcast"], torch.ones(2)
    )
    assert torch.equal(r0["dict_mean"], torch.full((3,), 0.5))
    # the default with a consumer: block-wise on both ranks (last block first), the same mean
    short = make_lm_batches(2, batch_size=1, seq_len=4, seed=300) + make_lm_batches(
        2, batch_size=1, seq_len=4, seed=301
    )
    expected_short = estimate_gradients(model, short, ["q_proj", "down_proj"], progress=False)
    for r in (r0, r1):
        assert r["auto_order"][0].startswith("model.layers.1."), r["auto_order"]
        for name in expected_short:
            torch.testing.assert_close(r["auto"][name], expected_short[name], rtol=1e-5, atol=1e-7)
    # one rank's batches too long for the block-wise order: both ranks took the hook path (module
    # order), so the all-reduces paired the same layers
    mixed = make_lm_batches(2, batch_size=1, seq_len=4, seed=200) + make_lm_batches(
        2, batch_size=1, seq_len=64, seed=201
    )
    expected_mixed = estimate_gradients(model, mixed, ["q_proj"], progress=False)
    for r in (r0, r1):
        assert r["declined_order"] == list(expected_mixed)
        for name in expected_mixed:
            torch.testing.assert_close(
                r["declined"][name], expected_mixed[name], rtol=1e-5, atol=1e-7
            )


# ---------------------------------------------------------------------------- estimate_gradients_from_step


def test_from_step_equals_batch_estimate_and_counts_backward_passes_per_layer():
    from loralab.core.gradients import estimate_gradients_from_step

    model, batches = tiny_llama(), make_lm_batches(N_BATCHES)
    targets = ["q_proj", "down_proj"]
    want = estimate_gradients(model, batches, targets, train=True, progress=False)

    def train_step():
        for b in batches:
            model(**b).loss.backward()

    got = estimate_gradients_from_step(model, train_step, targets)
    assert list(got) == list(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL_F32, atol=1e-7)
    assert all(p.grad is None for p in model.parameters()) and model.training is False
    # a layer reached by fewer backward passes is averaged over its own passes (PEFT's contract)
    q0 = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 64)

    def uneven():
        train_step()
        q0(x).pow(2).sum().backward()

    extra = estimate_gradients_from_step(model, uneven, targets, consumer=None)
    lone = 2 * (q0.weight.detach() @ x.T @ x)  # d/dW sum((W x)^2) for each row of x, summed
    name = "model.layers.0.self_attn.q_proj"
    expected = (want[name] * N_BATCHES + lone) / (N_BATCHES + 1)
    torch.testing.assert_close(extra[name], expected, rtol=RTOL_F32, atol=1e-6)
    other = "model.layers.1.self_attn.q_proj"
    torch.testing.assert_close(extra[other], want[other], rtol=RTOL_F32, atol=1e-7)


def test_from_step_errors_name_the_layer():
    from loralab.core.gradients import estimate_gradients_from_step

    model = tiny_llama()
    x = torch.randn(2, 64)
    with pytest.raises(
        GradientEstimationError,
        match=r"3 target layer\(s\) received no gradient from train_step.*layers\.1\.self_attn\.q_proj",
    ):
        estimate_gradients_from_step(
            model,
            lambda: model.model.layers[0].self_attn.q_proj(x).sum().backward(),
            ["q_proj", "k_proj"],
        )
