"""GaLore / GoLore (AdamW and momentum SGD, one- and two-sided) on matrices that ZeRO splits over
ranks: the projection algebra on each rank's elements (``_step_split_matrices``) equals the
one-process step and moves low-rank numbers only, and a projector that fails on one rank raises on
every rank (4 CPU ranks, gloo, float64, hand-made ZeRO-1/2 partitions with chosen split points; the
real DeepSpeed engines, ZeRO-3 splitting every matrix, run in test_golore_distributed.py)."""

import math
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun

WORKER = Path(__file__).with_name("golore_zero_split_worker.py")
WORLD = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import importlib.util

    spec = importlib.util.spec_from_file_location("worker", WORKER)
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    prefix = tmp_path_factory.mktemp("golore_zero_split") / "run"
    run_torchrun(WORKER, prefix, nproc=WORLD, timeout=600)
    return worker, [torch.load(f"{prefix}.{k}.pt", weights_only=True) for k in range(WORLD)]


@pytest.mark.multiprocess
def test_split_matrices_step_as_one_process(results):
    worker, ranks = results
    assert len(ranks[0]) == len(worker.LAYOUTS) * len(worker.CASES) + len(worker.NAN_CASES)
    for case, out in ranks[0].items():
        if case.startswith("nan/"):
            continue
        for rank in ranks:
            # float64: only the order of the sums differs from one process
            assert rank[case]["diff"] < 1e-11, (case, rank[case]["diff"])
            assert rank[case]["moved"] > 1e-3, case  # every matrix trained
        # the split path ran, for exactly the matrices the layout puts on more than one rank
        assert out["split"] == _matrices_over_ranks(worker, case), (case, out["split"])


def _matrices_over_ranks(worker, case):
    order, pad = worker.LAYOUTS[case.split("/")[0]]
    sizes = {k: math.prod(worker.SHAPES[k]) for k in order}
    size = (sum(sizes.values()) + pad) // WORLD
    out, off = [], 0
    for k in order:
        holders = [
            j for j in range(WORLD) if min(off + sizes[k], (j + 1) * size) > max(off, j * size)
        ]
        if len(worker.SHAPES[k]) == 2 and len(holders) > 1:
            out.append(k)
        off += sizes[k]
    return sorted(out)


@pytest.mark.multiprocess
def test_split_matrices_move_low_rank_numbers_only(results):
    # between projector refreshes no gradient or update travels whole (no gather / scatter); what
    # moves is at most the left projections' (r, n) twice (reduce-scatter, all-gather), the right
    # and two-sided ones' Q (r, n) once (all-gathered from the ranks' column blocks, padded to
    # ⌈n / world⌉ columns each) and r numbers per row a rank boundary splits (the slack: small flags)
    worker, ranks = results
    for case, out in ranks[0].items():
        if case.startswith("nan/"):
            continue
        layout = case.split("/")[0]
        kwargs = worker.CASES[case.split("/", 1)[1]][1]
        bound = 0
        for k in out["split"]:
            m, n = worker.SHAPES[k]
            r = min(3, m, n)
            q = r * WORLD * -(-n // WORLD)  # Q all-gathered
            if kwargs.get("proj_type") == "full":
                bound += r * r + q  # the (r, r) partial products, all-reduced
                continue
            left = (m < n) != (kwargs.get("proj_type") == "reverse_std")
            bound += 2 * r * n if left else 2 * r * WORLD + q
        for rank in ranks:
            for step in rank[case]["collectives"]:
                kinds = {name for name, _ in step}
                assert not kinds & {"gather", "scatter", "broadcast"}, (case, step)
                moved = sum(numel for name, numel in step if name != "all_reduce" or numel > 1)
                whole = sum(math.prod(worker.SHAPES[k]) for k in out["split"])
                assert moved <= bound + len(out["split"]) + 8 * WORLD, (case, layout, step)
                assert moved < whole * WORLD, (case, step)


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", ["split-adamw", "owner-adamw", "owner-adafactor"])
def test_a_projector_failing_on_one_rank_raises_on_every_rank(results, case):
    # a NaN in one matrix's gradient: its SVD fails where the projector is drawn (the matrix's
    # owner); the other ranks must raise too (they used to wait in the next collective: a hang)
    _worker, ranks = results
    outs = [rank[f"nan/{case}"] for rank in ranks]
    assert all(out["error"] == "FloatingPointError" for out in outs), outs
    named = [out for out in outs if "has NaN/Inf values" in out["message"]]
    assert len(named) == 1, outs  # the owner names the parameter and its step
    assert "parameter" in named[0]["message"] and "at step 0" in named[0]["message"]
    others = [out for out in outs if out is not named[0]]
    assert all("could not be computed on another rank" in out["message"] for out in others)
