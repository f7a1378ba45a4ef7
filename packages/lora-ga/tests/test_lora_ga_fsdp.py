"""LoRA-GA under FSDP2 (``fully_shard``, 2 CPU ranks, gloo): ``get_lora_ga_model(..., shard=...)``
estimates on the sharded model and writes each rank's rows of ``A``, ``B`` and the offset ``W0``; PEFT's
flow with the ``preprocess_loraga`` drop-in runs on a model sharded before it.

Every rank must end with the same init, equal to one process initialising from all the batches
(``Linear`` and GPT-2 ``Conv1D`` targets), and a target that gets no gradient must raise an error
naming it on every rank. One launch runs every mode (``lora_ga_fsdp_worker.py``).
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun, tiny_gpt2, tiny_llama
from loralab.lora_ga import get_lora_ga_model


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


w = _load("lora_ga_dist_worker")
fw = _load("lora_ga_fsdp_worker")
WORKER = Path(__file__).with_name("lora_ga_fsdp_worker.py")

# FSDP2's reduce-scatter mean of per-rank means vs one mean over all batches: the same gradient up to
# float32 rounding (~1e-7), which the SVD amplifies by 1/(singular-value gap) in the factors; the same
# bound as the DDP / ZeRO-3 modes (test_lora_ga_distributed.py)
INIT_RTOL = 1e-4
BUILDS = {"llama": (tiny_llama, w.config), "gpt2": (tiny_gpt2, fw.gpt2_config)}
N_TARGETS = {"llama": 2 * len(w.TARGETS), "gpt2": 2 * len(fw.GPT2_TARGETS)}  # 2 blocks each


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("lora_ga_fsdp") / "run"
    run_torchrun(WORKER, prefix, timeout=600)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in (0, 1)]


def _rel(got, want):
    return max(((x - y).norm() / y.norm()).item() for k in want for x, y in zip(got[k], want[k]))


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", ["llama", "gpt2"])
def test_fsdp2_init_equals_one_process_on_every_rank(ranks, mode):
    r0, r1 = ranks[0][mode], ranks[1][mode]
    assert bool(ranks[0][f"{mode}_sharded"]) and bool(ranks[1][f"{mode}_sharded"])
    # the estimate ran block by block on the shards: one block's sums at a time (2 blocks)
    for out in ranks:
        assert out[f"{mode}_sums"].tolist() == [N_TARGETS[mode] // 2, N_TARGETS[mode]]
    build, config = BUILDS[mode]
    single_model = get_lora_ga_model(build(), config(), list(w.loader()), progress=False)
    single = fw.state(single_model)
    assert r0.keys() == r1.keys() == single.keys() and len(r0) == N_TARGETS[mode]
    for name in r0:  # identical on every rank: the same gathered gradient, the same SVD
        for x, y, what in zip(r0[name], r1[name], ("A", "B", "W0")):
            assert torch.equal(x, y), f"{mode} {name}: {what} differs between ranks"
    assert _rel(r0, single) < INIT_RTOL
    # the offset itself: W0' - W0 = -s·B·A, against the original weights
    base = build()
    s = single_model.base_model.model.get_submodule(next(iter(single))).scaling["default"]
    for name, (A, B, W0) in r0.items():
        w0 = base.get_submodule(name).weight.detach()
        delta = -s * (B.double() @ A.double())
        delta = delta.T if mode == "gpt2" else delta  # Conv1D stores (in, out)
        err = ((W0.double() - w0.double()) - delta).norm() / delta.norm()
        assert err < 1e-5, (name, err.item())
    # the reduction matters: rank 0's batches alone give another init
    alone = fw.state(get_lora_ga_model(build(), config(), w.rank_batches(0), progress=False))
    assert _rel(alone, single) > 100 * INIT_RTOL
    # the initial factors kept for the rank-2r export are the whole A0, B0 on every rank
    for out in ranks:
        init = out[f"{mode}_init"]
        assert init.keys() == r0.keys()
        for name, (A0, B0) in init.items():
            assert torch.equal(A0, r0[name][0]) and torch.equal(B0, r0[name][1])


@pytest.mark.multiprocess
def test_fsdp2_target_without_gradient_raises_naming_it_on_every_rank(ranks):
    for out in ranks:
        msg = out["unused_error"]
        assert msg.startswith("GradientEstimationError: 1 target layer(s) received no gradient")
        assert "base_model.model.model.layers.0.spare" in msg and "FSDP2" in msg


@pytest.mark.multiprocess
def test_fsdp2_factor_dtype_other_than_the_sharded_one_is_refused(ranks):
    for out in ranks:
        msg = out["dtype_error"]
        assert msg.startswith(
            "LoraGAInitError: LoRA-GA factors are torch.float32 in the FSDP2-sharded"
        )
        assert "LoraGAConfig.dtype asks for torch.bfloat16" in msg


def _step_rel(after, before, want_after, want_before):
    """``‖Δ − Δ*‖ / ‖Δ*‖`` of the factors' change in a step (``Δ = after − before``), all layers together."""
    num = den = 0.0
    for k in want_after:
        for i in (0, 1):  # A, B
            d, d_want = after[k][i] - before[k][i], want_after[k][i] - want_before[k][i]
            num += (d - d_want).double().norm().item() ** 2
            den += d_want.double().norm().item() ** 2
    return (num / den) ** 0.5


@pytest.mark.multiprocess
def test_peft_flow_drop_in_on_a_sharded_model_equals_one_process(ranks):
    # shard the base, preprocess_loraga with a train_step over the sharded model, get_peft_model
    r0, r1 = ranks[0]["peft_flow"], ranks[1]["peft_flow"]
    assert r0.keys() == r1.keys() and len(r0) == N_TARGETS["llama"]
    for name in r0:  # FSDP2's reduce-scatter mean, gathered whole on every rank: the same SVD
        for x, y, what in zip(r0[name], r1[name], ("A", "B", "W0")):
            assert torch.equal(x, y), f"{name}: {what} differs between ranks"
    # PEFT's definition, one process on all the batches (the DDP drop-in test's reference)
    single = w.init_state(w.peft_flow(tiny_llama(), list(w.loader())))
    assert _rel(r0, single) < INIT_RTOL
    alone = w.init_state(w.peft_flow(tiny_llama(), w.rank_batches(0)))
    assert _rel(alone, single) > 100 * INIT_RTOL
    # get_peft_model's LoRA parameters are outside FSDP2: said, naming the remedy
    for out in ranks:
        assert len(out["peft_flow_warnings"]) == N_TARGETS["llama"]
        assert "apply fully_shard to each adapter module" in out["peft_flow_warnings"][0]


@pytest.mark.multiprocess
def test_peft_flow_on_a_sharded_model_trains_like_one_process_once_adapters_are_sharded(ranks):
    # after fully_shard on each lora_A / lora_B, one SGD step (each rank its first batch) equals one
    # process stepping on the mean loss of both batches
    assert all(bool(out["peft_flow_sharded"]) for out in ranks)
    s0, s1 = ranks[0]["peft_flow_step"], ranks[1]["peft_flow_step"]
    for name in s0:
        for x, y, what in zip(s0[name], s1[name], ("A", "B", "W0")):
            assert torch.equal(x, y), f"{name}: {what} differs between ranks after the step"
    model = w.peft_flow(tiny_llama(), list(w.loader()))
    init = w.init_state(model)
    b0, b1 = (w.rank_batches(r)[0] for r in (0, 1))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=fw.STEP_LR)
    model.train()
    ((model(**b0).loss + model(**b1).loss) / 2).backward()
    opt.step()
    stepped = w.init_state(model)
    # the step itself (from each side's own init, which differ by float32 rounding only)
    assert _step_rel(s0, ranks[0]["peft_flow"], stepped, init) < INIT_RTOL
    # the frozen base weights did not move
    for name, (_, _, W0) in s0.items():
        assert torch.equal(W0, ranks[0]["peft_flow"][name][2])


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_sharded_offset_is_computed_on_the_shard_and_equals_the_whole_one(
    tmp_path, conv1d, monkeypatch
):
    """A float FSDP2 weight is offset on its own rows (no gather of the whole matrix): on a one-rank
    mesh the shard is the whole weight, so the result must equal the unsharded write bit for bit; a
    non-finite offset is refused on every rank, naming it."""
    import copy

    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from transformers.pytorch_utils import Conv1D

    import loralab.lora_ga.layer as layer_module
    from loralab.core.sharding import is_dtensor, whole
    from loralab.lora_ga.layer import write_factors

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        inner = Conv1D(12, 16) if conv1d else nn.Linear(16, 12)  # (out, in) = (12, 16)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["0"], fan_in_fan_out=conv1d)
        plain = get_peft_model(nn.Sequential(inner), cfg)
        sharded = copy.deepcopy(plain)
        fully_shard(sharded)
        A, B = torch.randn(4, 16), torch.randn(12, 4)
        layer = lambda m: m.base_model.model[0]  # noqa: E731
        assert is_dtensor(layer(sharded).get_base_layer().weight)
        write_factors(layer(plain), "default", A, B, torch.float32)
        read_whole = []  # the whole-weight read (an all-gather under FSDP2) must not happen
        dequantize = layer_module.dequantize_weight
        monkeypatch.setattr(
            layer_module, "dequantize_weight", lambda m: read_whole.append(m) or dequantize(m)
        )
        write_factors(layer(sharded), "default", A, B, torch.float32)
        assert read_whole == []
        got = whole(layer(sharded).get_base_layer().weight.detach())
        assert torch.equal(got, layer(plain).get_base_layer().weight.detach())
        with pytest.raises(ValueError, match="non-finite"):
            write_factors(layer(sharded), "default", A * 1e30, B * 1e30, torch.float32)
    finally:
        dist.destroy_process_group()
