"""GaLore/GoLore under DDP and as a DeepSpeed ZeRO-0/1/2/3 client optimizer (2 CPU ranks, gloo).

One torchrun launch (module fixture) trains the same seeded tiny Llama for 4 steps in every mode, each
rank on different data; the tests compare the results.
"""

from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun, tiny_llama

WORKER = Path(__file__).with_name("golore_dist_worker.py")
ATOL = 2e-5  # DDP's all-reduce and ZeRO's reduce-scatter sum in different orders (float32)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    prefix = tmp_path_factory.mktemp("golore_dist") / "run"
    run_torchrun(WORKER, prefix, timeout=900)

    def load(mode, rank):
        return torch.load(f"{prefix}.{mode}.{rank}.pt", weights_only=True)

    return load


def _assert_same(a, b, atol=0.0):
    assert "error" not in a and "error" not in b, (a.get("error"), b.get("error"))
    assert a.keys() == b.keys()
    for name in a:
        if atol:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)
        else:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.multiprocess
def test_ddp_ranks_stay_identical_with_random_projectors(results):
    # same averaged gradient, same seeded projectors
    _assert_same(results("ddp", 0), results("ddp", 1))


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_zero_client_optimizer_equals_ddp(results, stage):
    mode = f"zero{stage}"
    _assert_same(results(mode, 0), results(mode, 1))  # every rank ends with the same weights
    ddp, zero = results("ddp", 0), results(mode, 0)
    _assert_same(ddp, zero, atol=ATOL)
    init = {n: p.detach() for n, p in tiny_llama().named_parameters()}
    # the projected matrices moved (not a silent no-op / element-wise fallback equal only by accident)
    moved = [n for n in zero if n.endswith("proj.weight") and not torch.allclose(zero[n], init[n])]
    assert len(moved) == sum(n.endswith("proj.weight") for n in zero)


@pytest.mark.multiprocess
def test_deepspeed_zero3_sub_groups_equal_ddp(results):
    # a small sub_group_size: DeepSpeed steps each param group in several partitions
    _assert_same(results("zero3subgroups", 0), results("zero3subgroups", 1))
    _assert_same(results("ddp", 0), results("zero3subgroups", 0), atol=ATOL)


@pytest.mark.multiprocess
def test_deepspeed_zero3_momentum_sgd_equals_ddp(results):
    # GoLoreSGD: its weight decay is added to the gradient before projecting, on each rank's elements
    _assert_same(results("zero3-sgd", 0), results("zero3-sgd", 1))
    _assert_same(results("ddp-sgd", 0), results("zero3-sgd", 0), atol=ATOL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_cpu_offload_equals_the_same_stage_without(results, stage):
    # offload_optimizer (and, at ZeRO-3, offload_param) on the CPU: GoLore's own optimizer steps the
    # CPU partitions, the same arithmetic as without offload (bit for bit on these CPU ranks; on GPUs
    # the collectives run on the GPU and the results come back to the CPU partitions)
    for rank in (0, 1):
        _assert_same(results(f"zero{stage}offload", rank), results(f"zero{stage}", rank))


@pytest.mark.multiprocess
def test_deepspeed_round_robin_gradients_equals_zero2(results):
    # round_robin_gradients reorders the parameters inside DeepSpeed's flat buffers
    for rank in (0, 1):
        _assert_same(results("zero2roundrobin", rank), results("zero2", rank))


@pytest.mark.multiprocess
def test_deepspeed_zero3_checkpoint_resume_is_exact(results):
    # the split matrices' state (each rank's rows / column blocks, momentum SGD) in ZeRO-3 checkpoints
    for rank in (0, 1):
        _assert_same(results("zero3resume-sgd", rank), results("zero3-sgd", rank))


@pytest.mark.multiprocess
def test_deepspeed_zero2_checkpoint_resume_is_exact(results):
    # the low-rank states live in ZeRO's partition state; a DeepSpeed checkpoint must carry them
    for rank in (0, 1):
        _assert_same(results("zero2resume", rank), results("zero2", rank))


@pytest.mark.parametrize(
    "cls",
    [
        "GaLoreAdamW",
        "GaLoreAdamW-torch",
        "GoLoreAdamW",
        "GaLoreSGD",
        "GaLoreAdafactor",
        "GaLoreAdamW8bit",
    ],
)
def test_zero12_partition_in_one_process_equals_the_plain_step(cls):
    """The ZeRO path (each matrix found in the flat partition, updated whole on its owner rank,
    vectors element-wise on the partition) against the plain path, 4 steps with a projector refresh,
    float64; the real engines (2 ranks, ZeRO-1/2/3) run in the multi-process tests above."""
    import loralab.golore as golore
    from loralab.core.testing import as_zero12_partition, make_lm_batches

    # the AdamW forms: the owner computes the weight-free update D and each rank decays and adds it
    # (torch style: decay first; hf, the default: after)
    kwargs = {
        "GaLoreAdamW-torch": {"adamw_style": "torch"},
        "GaLoreSGD": {"momentum": 0.9},
        "GoLoreAdamW": {"rand_ratio": 0.5, "total_steps": 4},
        "GaLoreAdafactor": {"relative_step": False, "scale_parameter": False},
    }.get(cls, {})
    batches = make_lm_batches(4, batch_size=2, seq_len=8, seed=1)
    out = []
    for zero in (False, True):
        model = tiny_llama().double()
        params = list(model.parameters())
        opt = getattr(golore, cls.split("-")[0])(
            [{"params": params, "rank": 4, "update_proj_gap": 2}],
            lr=1e-2,
            **({} if cls == "GaLoreAdafactor" else {"weight_decay": 0.1}),
            **kwargs,
        )
        if zero:
            hand_gradient, copy_back = as_zero12_partition(opt, params)
        for b in batches:
            model(**b).loss.backward()
            if zero:
                hand_gradient()
            opt.step()
            opt.zero_grad()
            if zero:
                copy_back()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    plain, zero = out
    for n in plain:
        torch.testing.assert_close(zero[n], plain[n], rtol=1e-10, atol=1e-12, msg=n)


def test_a_partition_state_saved_with_other_owners_is_refused():
    # a checkpoint whose partition state holds the low-rank state of a matrix this rank no longer
    # owns (an older owner assignment): stepping on would restart that matrix silently
    from types import SimpleNamespace

    from loralab.golore import GaLoreAdamW

    w = torch.nn.Parameter(torch.zeros(4, 4))
    opt = GaLoreAdamW([{"params": [w], "rank": 2}], lr=1e-2)
    piece = SimpleNamespace(index=0, param=w)
    zp = SimpleNamespace(pieces=[piece], rank=0, all_agree=lambda ok: ok)
    state = {"param0.exp_avg": torch.zeros(2, 4)}
    where = "GaLoreAdamW param group 0"
    group = opt.param_groups[0]
    opt._check_owned_state(zp, {}, {id(w): 1}, 0, where, [], group)  # nothing foreign: fine
    opt._check_owned_state(zp, state, {id(w): 0}, 1, where, [], group)  # its own: fine
    opt._check_owned_state(zp, state, {id(w): 1}, 1, where, [], group)  # once per group: not again
    with pytest.raises(
        RuntimeError, match=r"param group 0: .*parameters \[0\].*another owner assignment"
    ):
        opt._check_owned_state(zp, state, {id(w): 1}, 2, where, [], group)


@pytest.mark.parametrize("cls", ["GaLoreAdamW", "GaLoreSGD"])
@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_a_split_matrix_state_in_the_owner_layout_is_refused(side, cls):
    # a matrix split over ranks keeps, since 2026-12-05, each rank's rows (right) or column block
    # (left) of its moments, and (later that day) a column block of Q (right, full) on every rank; a
    # checkpoint from before held the state whole on the owner, or Q whole: refused, not stepped on
    # with state of the wrong shape (or restarted). The form's own layout passes (SGD's
    # momentum_buffer included)
    import loralab.golore as golore
    from loralab.core.zero_views import Piece, ZeroPartition

    w = torch.nn.Parameter(torch.zeros(4, 6) if side == "left" else torch.zeros(6, 4))
    proj_type = "full" if side == "full" else "std"
    opt = getattr(golore, cls)([{"params": [w], "rank": 2, "proj_type": proj_type}], lr=1e-2)
    group = opt.param_groups[0]
    flat = torch.zeros(13)
    piece = Piece(w, 0, w.shape, ((0, 13, 0), (13, 24, 0)))  # rank 0: 13 elements, inside a row
    zp = ZeroPartition(flat, [piece], 3, 0, 2, None)
    zp.all_agree = lambda ok: ok  # one process stands in for the two ranks' vote
    zp.all_reduce_sum_ = lambda t: t
    mine = opt._split_layout(zp, piece, group)[2]
    rows = 3 if side == "left" else 4  # 13 elements touch rows 0-2 (6 wide) / 0-3 (4 wide)
    moments = {"left": (2, 3), "right": (rows, 2), "full": (2, 2)}[side]
    projectors = {
        "left": {"proj_left": (rows, 2)},
        "right": {"proj_right": (2, 2)},  # rank 0's block of Q's 4 columns
        "full": {"proj_left": (rows, 2), "proj_right": (2, 2)},
    }[side]
    assert mine == {**projectors, **dict.fromkeys(opt._moment_keys, moments)}
    where = f"{cls} param group 0"
    ok = {f"param0.{k}": torch.zeros(s) for k, s in mine.items()} | {
        "param0.step": torch.tensor(3.0)
    }
    # its own layout: fine, nothing to refresh out of turn
    assert opt._check_owned_state(zp, ok, {id(w): 1}, 0, where, [piece], group) == set()
    no_projector = {k: v for k, v in ok.items() if not k.startswith("param0.proj")}
    opt._owned_state_checked.clear()
    assert opt._check_owned_state(zp, no_projector, {id(w): 1}, 0, where, [piece], group) == {0}
    assert opt._check_owned_state(zp, no_projector, {id(w): 1}, 0, where, [piece], group) == set()
    whole = {"left": (2, 6), "right": (6, 2), "full": (3, 3)}[side]  # the owner's whole state
    old = {**ok, f"param0.{opt._moment_keys[0]}": torch.zeros(whole)}
    with pytest.raises(
        RuntimeError, match=r"another layout.*parameters \[0\].*older loralab-golore"
    ):
        opt._check_owned_state(zp, old, {id(w): 0}, 1, where, [piece], group)
    if side != "left":  # Q whole on every holder (the layout before Q's column blocks)
        whole_q = {**ok, "param0.proj_right": torch.zeros(2, 4)}
        with pytest.raises(RuntimeError, match=r"another layout.*parameters \[0\]"):
            opt._check_owned_state(zp, whole_q, {id(w): 0}, 2, where, [piece], group)
