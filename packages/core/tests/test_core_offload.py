"""Block-wise offloaded estimation equals the plain path and streams one block at a time."""

import gc
import logging

import pytest
import torch
from torch import nn

from loralab.core.gradients import GradientEstimationError, estimate_gradients
from loralab.core.offload import DEFAULT_BLOCK_CLASSES, estimate_gradients_offloaded, find_blocks
from loralab.core.targets import find_targets
from loralab.core.testing import (
    make_classification_batches,
    make_lm_batches,
    make_seq2seq_batches,
    tiny_gpt2,
    tiny_llama,
    tiny_roberta,
    tiny_t5,
)

N_BATCHES = 3
# Offload is back-propagation in another order: the same float32 operations, summed in the same
# order over batches. Measured max relative difference: 0 (Llama, GPT-2, RoBERTa), 4e-7 (T5).
RTOL = 1e-5

CASES = {
    "llama": (tiny_llama, lambda: make_lm_batches(N_BATCHES, pad_last=3)),
    "gpt2": (tiny_gpt2, lambda: make_lm_batches(N_BATCHES)),
    "roberta": (tiny_roberta, lambda: make_classification_batches(N_BATCHES)),
    "t5": (tiny_t5, lambda: make_seq2seq_batches(N_BATCHES)),
}


def _assert_same(plain, off):
    assert list(plain) == list(off)
    for name in plain:
        err = (plain[name] - off[name]).norm() / plain[name].norm()
        assert err <= RTOL, f"{name}: relative difference {err:.2e}"


@pytest.mark.parametrize("arch", list(CASES))
def test_offload_equals_plain(arch, caplog):
    build, batches = CASES[arch]
    model = build()
    data = batches()
    plain = estimate_gradients(model, data, progress=False)
    with caplog.at_level(logging.INFO, logger="loralab.core.offload"):
        off = estimate_gradients(model, data, offload=True, device="cpu", progress=False)
    _assert_same(plain, off)
    assert all(g.device.type == "cpu" and g.dtype == torch.float32 for g in off.values())
    # T5's decoder reads the encoder output through the encoder's final layer norm (glue between
    # blocks): the general mode must be the one that ran there; the others are identity-wired.
    wiring = "general" if arch == "t5" else "identity"
    assert any(wiring in r.getMessage() for r in caplog.records)


def test_default_blocks_cover_encoder_and_decoder_stacks():
    assert list(find_blocks(tiny_t5())) == [
        "encoder.block.0",
        "encoder.block.1",
        "decoder.block.0",
        "decoder.block.1",
    ]
    assert list(find_blocks(tiny_gpt2())) == ["transformer.h.0", "transformer.h.1"]
    # RoBERTa's _no_split_modules also lists its embeddings: the default is its layers only
    assert list(find_blocks(tiny_roberta())) == [
        "roberta.encoder.layer.0",
        "roberta.encoder.layer.1",
    ]
    assert {"LlamaDecoderLayer", "GPT2Block", "T5Block", "RobertaLayer", "BertLayer"} <= set(
        DEFAULT_BLOCK_CLASSES
    )


def _live_gradient_like(shapes):
    # Tensors that look like a target's fp32 gradient and are not parameters: what the estimator holds.
    n = 0
    gc.collect()
    for o in gc.get_objects():
        if (
            isinstance(o, torch.Tensor)
            and not isinstance(o, nn.Parameter)
            and o.dtype == torch.float32
            and tuple(o.shape) in shapes
        ):
            n += 1
    return n


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_counting_consumer_holds_at_most_one_block():
    model = tiny_llama(num_hidden_layers=3)
    data = make_lm_batches(N_BATCHES)
    targets = find_targets(model)
    shapes = {t.shape for t in targets.values()}
    per_block = 7

    def run(**kw):
        seen, counts = {}, []

        def consumer(name, grad):
            seen[name] = grad.double()  # float64: invisible to the fp32 counter
            del grad
            counts.append(_live_gradient_like(shapes))

        out = estimate_gradients(model, data, consumer=consumer, progress=False, **kw)
        assert out == {}
        return seen, counts

    # the hook path (the reference) holds every target's sum until the last batch: the counter
    # sees all of them at once, so the checks below are not vacuous
    reference, hook_counts = run(blockwise=False)
    assert max(hook_counts) == len(targets)
    # offload, and the plain path's default (block-wise in place on this model): one block at a time
    for kw in (dict(offload=True, device="cpu"), dict(), dict(blockwise=True)):
        seen, counts = run(**kw)
        assert max(counts) == per_block, (kw, counts)
        # called block by block, last block first, each gradient final
        blocks = [name.split(".")[2] for name in seen]
        assert blocks == ["2"] * per_block + ["1"] * per_block + ["0"] * per_block
        _assert_same(reference, {n: seen[n] for n in reference})


def test_heads_and_subset_targets_in_identity_mode():
    model = tiny_llama()
    data = make_lm_batches(2)
    targets = find_targets(model, ["q_proj", "down_proj", "lm_head"], include_heads=True)
    plain = estimate_gradients(model, data, targets, progress=False)
    off = estimate_gradients(model, data, targets, offload=True, device="cpu", progress=False)
    assert "lm_head" in off
    _assert_same(plain, off)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=1.0):
        return x + scale * torch.tanh(self.fc(x))


class _Toy(nn.Module):
    """Glue targets on both sides of the blocks, glue (a norm) between them: the general mode."""

    def __init__(self, d=8, n=3, twice=False):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, 1)
        self.twice = twice

    def forward(self, x):
        h = self.inp(x)
        for i, b in enumerate(self.blocks):
            h = b(h, scale=0.5)
            if i == 0:
                h = self.norm(h)
                if self.twice:
                    h = b(h)
        return self.out(h).pow(2).mean()


def _toy_loss(model, batch):
    return model(batch)


def test_custom_blocks_general_mode_with_glue_targets():
    torch.manual_seed(0)
    model = _Toy().double()
    data = [torch.randn(4, 8, dtype=torch.float64) for _ in range(3)]
    targets = find_targets(model, "all-linear", include_heads=True)
    assert {"inp", "out"} <= set(targets)
    plain = estimate_gradients(model, data, targets, loss_fn=_toy_loss, progress=False)
    off = estimate_gradients(
        model,
        data,
        targets,
        loss_fn=_toy_loss,
        offload=True,
        device="cpu",
        no_split_module_classes=["_Block"],
        progress=False,
    )
    _assert_same(plain, off)
    # float64 reference by plain autograd, per batch
    ref = {n: torch.zeros_like(t.weight, dtype=torch.float64) for n, t in targets.items()}
    for x in data:
        model.zero_grad()
        model(x).backward()
        for n, t in targets.items():
            ref[n] += t.weight.grad / len(data)
    for n in ref:
        torch.testing.assert_close(
            off[n].double(), ref[n], rtol=1e-5, atol=1e-7
        )  # the result is float32


def test_state_restored_after_offload():
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(True)
    model.lm_head.weight.requires_grad_(False)
    model.train()
    before = {n: (p.requires_grad, p.device) for n, p in model.named_parameters()}
    estimate_gradients(model, make_lm_batches(1), offload=True, device="cpu", progress=False)
    assert {n: (p.requires_grad, p.device) for n, p in model.named_parameters()} == before
    assert model.training and model.config.use_cache
    assert not any("forward" in vars(m) for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_offload_errors():
    model = tiny_llama()
    with pytest.raises(GradientEstimationError, match="no batches"):
        estimate_gradients(model, [], offload=True, device="cpu", progress=False)
    with pytest.raises(GradientEstimationError, match=r"found no block.*no_split_module_classes"):
        estimate_gradients(
            model,
            make_lm_batches(1),
            offload=True,
            device="cpu",
            no_split_module_classes=["NoSuchLayer"],
            progress=False,
        )
    toy = _Toy(twice=True)
    with pytest.raises(GradientEstimationError, match="ran twice"):
        estimate_gradients(
            toy,
            [torch.randn(2, 8)],
            loss_fn=_toy_loss,
            offload=True,
            device="cpu",
            no_split_module_classes=["_Block"],
            progress=False,
        )
    with pytest.raises(ValueError, match="device applies to offload=True only"):
        estimate_gradients(model, make_lm_batches(1), device="cpu", progress=False)


def test_offload_non_finite_names_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(GradientEstimationError, match="non-finite loss"):
        estimate_gradients(model, make_lm_batches(1), offload=True, device="cpu", progress=False)


def test_direct_call_keeps_targets_order():
    model = tiny_gpt2()
    targets = find_targets(model, ["c_fc", "c_attn"])
    out = estimate_gradients_offloaded(
        model, make_lm_batches(2), targets, device="cpu", progress=False
    )
    assert list(out) == list(targets)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_to_cuda_equals_plain_cpu():
    model = tiny_llama(num_hidden_layers=3)
    data = make_lm_batches(N_BATCHES)
    plain = estimate_gradients(model, data, progress=False)
    off = estimate_gradients(model, data, offload=True, device="cuda", progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    for name in plain:
        # CUDA kernels (TF32 off by default for matmul in fp32) differ from the CPU's by round-off
        torch.testing.assert_close(off[name], plain[name], rtol=1e-3, atol=1e-5)


def test_train_mode_replays_dropout_masks():
    # Dropout only inside the blocks: the recording pass draws the masks in the plain path's order,
    # and each block's recomputation replays its recorded RNG state, so train-mode offload equals
    # the plain path under the same seed (without the replay, fresh masks would make them differ).
    model = tiny_llama(attention_dropout=0.5)
    data = make_lm_batches(2)
    torch.manual_seed(123)
    plain = estimate_gradients(model, data, ["q_proj", "o_proj"], train=True, progress=False)
    torch.manual_seed(123)
    off = estimate_gradients(
        model, data, ["q_proj", "o_proj"], train=True, offload=True, device="cpu", progress=False
    )
    _assert_same(plain, off)
    evaluated = estimate_gradients(model, data, ["q_proj", "o_proj"], progress=False)
    assert any(not torch.allclose(plain[n], evaluated[n]) for n in plain)  # dropout was really on


def test_peft_model_base_weights():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    data = make_lm_batches(2)
    plain = estimate_gradients(model, data, ["q_proj", "o_proj"], progress=False)
    off = estimate_gradients(
        model, data, ["q_proj", "o_proj"], offload=True, device="cpu", progress=False
    )
    assert next(iter(off)) == "base_model.model.model.layers.0.self_attn.q_proj"
    _assert_same(plain, off)
