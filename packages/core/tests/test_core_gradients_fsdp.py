"""Gradient estimation on an FSDP2 (``fully_shard``) model, in one process (a 1-rank gloo group).

The 2-rank behaviour (row shards, reduce-scatter, one layer gathered at a time) is tested through
LoRA-GA and LoRA-SB (``test_lora_ga_fsdp.py``, ``test_lora_sb_fsdp.py``); here: the DTensor path of
the hooks equals the plain estimate, FSDP2's trainable set is refreshed after the estimate (its
reduction dtypes), and the options that cannot apply to a sharded model are refused by name.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loralab.core import sharding
from loralab.core.gradients import estimate_gradients, estimate_gradients_from_step
from loralab.core.sharding import refresh_fsdp_trainable

TARGETS = ["blocks.0", "blocks.1"]


class Net(nn.Module):
    """Two blocks and a head: as a PEFT model under training, only the head trains."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 3)

    def forward(self, x, labels):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return {"loss": F.cross_entropy(self.head(x), labels)}


def batches(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, 8, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
            for _ in range(n)]  # fmt: skip


@pytest.fixture
def one_rank_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def build(mp: bool = False):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    plain = Net()
    sharded = copy.deepcopy(plain)
    kw = {}
    if mp:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for block in sharded.blocks:
        fully_shard(block, **kw)
    fully_shard(sharded, **kw)
    for model in (plain, sharded):
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return plain, sharded


def test_fsdp2_estimate_equals_the_plain_one(one_rank_group):
    plain, sharded = build()
    want = estimate_gradients(plain, batches(), TARGETS, progress=False)
    got = estimate_gradients(sharded, batches(), TARGETS, progress=False)
    assert sharding.is_dtensor(sharded.blocks[0].weight)
    assert got.keys() == want.keys()
    for name in want:
        assert not sharding.is_dtensor(got[name]) and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    # estimate_gradients_from_step (PEFT's train_step contract) takes the same path
    model = sharded

    def train_step():
        for b in batches():
            model(**b)["loss"].backward()

    got = estimate_gradients_from_step(model, train_step, TARGETS, train=False)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    # requires_grad restored: only the head trains
    assert [n for n, p in sharded.named_parameters() if p.requires_grad] == [
        "head.weight",
        "head.bias",
    ]


def _head_grad_dtype(model) -> torch.dtype:
    model(**batches(1)[0])["loss"].backward()
    dtype = model.head.weight.grad.dtype
    model.zero_grad(set_to_none=True)
    return dtype


def test_fsdp2_reduces_in_float32_after_the_estimate(one_rank_group, monkeypatch):
    # The estimate runs the first forward (FSDP2's lazy init) with only the blocks' weights trainable:
    # the root group (the head) then had no trainable parameter. Without the refresh, FSDP2 would keep
    # the head's gradient in bfloat16 (param_dtype) instead of reducing it to float32.
    _, sharded = build(mp=True)
    estimate_gradients(sharded, batches(), TARGETS, progress=False)
    assert _head_grad_dtype(sharded) == torch.float32
    import loralab.core.estimation as estimation

    monkeypatch.setattr(estimation, "refresh_fsdp_trainable", lambda model: None)
    _, stale = build(mp=True)
    estimate_gradients(stale, batches(), TARGETS, progress=False)
    try:
        stale_dtype = _head_grad_dtype(stale)
    except RuntimeError as e:  # a bfloat16 gradient refused on the float32 parameter
        stale_dtype = str(e)
    assert stale_dtype != torch.float32  # what the refresh prevents


def test_fsdp2_refuses_offload_and_reduce_false(one_rank_group):
    _, sharded = build()
    with pytest.raises(ValueError, match=r"offload=True streams .* 'blocks.0' is sharded by FSDP2"):
        estimate_gradients(sharded, batches(), TARGETS, offload=True, progress=False)
    with pytest.raises(
        ValueError, match=r"reduce=False cannot apply to target 'blocks.0', sharded by FSDP2"
    ):
        estimate_gradients(sharded, batches(), TARGETS, reduce=False, progress=False)


def test_refresh_refuses_unknown_fsdp_internals():
    class Fake(nn.Module):
        def _get_fsdp_state(self):
            return object()

    refresh_fsdp_trainable(Net())  # no FSDP2: nothing to do
    with pytest.raises(RuntimeError, match="changed FSDP2's internals"):
        refresh_fsdp_trainable(Fake())


def _llamas(shard_blocks: bool = True):
    """A tiny Llama and its FSDP2 copy: each decoder block, then the root ``fully_shard``-ed (as
    :func:`loralab.core.testing.fully_shard_model`), or the root only."""
    from torch.distributed.fsdp import fully_shard

    from loralab.core.testing import fully_shard_model, tiny_llama

    plain = tiny_llama()
    sharded = copy.deepcopy(plain)
    if shard_blocks:
        fully_shard_model(sharded)
    else:
        fully_shard(sharded)
    return plain, sharded


def _consume(into: dict):
    return lambda name, g: into.__setitem__(name, g.clone())


def test_fsdp2_estimate_runs_block_by_block(one_rank_group, caplog):
    from loralab.core.testing import gradient_sums_peak, make_lm_batches

    plain, sharded = _llamas()
    data = make_lm_batches(3)
    want = estimate_gradients(plain, data, blockwise=False, progress=False)
    got: dict = {}
    with caplog.at_level("INFO", logger="loralab.core"), gradient_sums_peak() as seen:
        assert estimate_gradients(sharded, data, consumer=_consume(got), progress=False) == {}
    assert "block-wise (in place, FSDP2): 2 blocks, 3 batches" in caplog.text
    # one block's 7 target sums at a time (the hook path holds all 14 until the last batch)
    assert (seen["peak_layers"], seen["layers"]) == (7, 14)
    assert sorted(got) == sorted(want)  # delivered block by block, the last block first
    assert next(iter(got)).startswith("model.layers.1.")
    for name in want:
        assert not sharding.is_dtensor(got[name]) and got[name].dtype == torch.float32
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7)
    # blockwise=False: the hook path on the shards, every sum at once
    with gradient_sums_peak() as seen:
        estimate_gradients(
            sharded, data, consumer=lambda n, g: None, blockwise=False, progress=False
        )
    assert (seen["peak_layers"], seen["layers"]) == (14, 14)
    # requires_grad restored (tiny_llama trains everything)
    assert all(p.requires_grad for p in sharded.parameters())


def test_fsdp2_blockwise_refused_where_it_cannot_run(one_rank_group, caplog):
    from loralab.core.testing import make_lm_batches

    data = make_lm_batches(2)
    # only the root is fully_shard-ed: a block alone has no FSDP2 hooks to gather its weights
    _, root_only = _llamas(shard_blocks=False)
    with pytest.raises(
        ValueError, match=r"blockwise=True cannot run here: block 'model.layers.0' is not an FSDP2 "
    ):
        estimate_gradients(root_only, data, ["q_proj"], blockwise=True, progress=False)
    with caplog.at_level("INFO", logger="loralab.core"):  # the default: the hook path, logged
        estimate_gradients(root_only, data, ["q_proj"], consumer=lambda n, g: None, progress=False)
    assert "plain path with hooks (FSDP2): block 'model.layers.0' is not an FSDP2" in caplog.text
    # a target outside every block (the head)
    from loralab.core.targets import find_targets

    _, sharded = _llamas()
    with_head = find_targets(sharded, ["q_proj", "lm_head"], include_heads=True)
    with pytest.raises(ValueError, match=r"target 'lm_head' is outside every block"):
        estimate_gradients(sharded, data, with_head, blockwise=True, progress=False)
    # offload's own entry points, called directly, refuse what estimate_gradients refuses first
    from loralab.core.offload import estimate_gradients_blockwise, estimate_gradients_offloaded

    targets = find_targets(sharded, ["q_proj"])
    with pytest.raises(ValueError, match=r"^reduce=False cannot apply to a model sharded by FSDP2"):
        estimate_gradients_blockwise(sharded, data, targets, reduce=False, progress=False)
    with pytest.raises(ValueError, match=r"^offload=True cannot stream a model sharded by FSDP2"):
        estimate_gradients_offloaded(sharded, data, targets, device="cpu", progress=False)


def test_fsdp2_blockwise_with_mixed_precision_equals_the_hook_path(one_rank_group):
    # bfloat16 compute, float32 reduction: the recorded block inputs are FSDP2's cast ones, and each
    # block alone runs the same bfloat16 operations as inside the model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from loralab.core.testing import make_lm_batches, tiny_llama

    def build():
        model = tiny_llama()
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model

    data = make_lm_batches(2)
    blockwise: dict = {}
    hooks: dict = {}
    estimate_gradients(build(), data, ["q_proj", "down_proj"], consumer=_consume(blockwise),
                       blockwise=True, progress=False)  # fmt: skip
    estimate_gradients(build(), data, ["q_proj", "down_proj"], consumer=_consume(hooks),
                       blockwise=False, progress=False)  # fmt: skip
    assert sorted(blockwise) == sorted(hooks) and len(hooks) == 4
    for name in hooks:
        assert blockwise[name].dtype == torch.float32
        torch.testing.assert_close(blockwise[name], hooks[name], rtol=1e-6, atol=1e-7)
