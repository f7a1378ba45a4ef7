"""Every method in bfloat16 with float32 master weights, sharded over 2 ranks (gloo, CPU), against the
same arithmetic in one process; and the whole weight matrices a rank holds during a step.

One ``torchrun`` launch (:mod:`runners_bf16_worker`) trains full fine-tuning (torch AdamW), LoRA
(PEFT + torch AdamW), LoRA-FA, LoRA-Pro (efficient and full mode), GaLore and GoLore for 3 steps under
FSDP2 (``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``) and then under DeepSpeed
ZeRO-1, ZeRO-1 with float32 gradient accumulation (DeepSpeed's ``BF16_Optimizer``), ZeRO-2 and ZeRO-3,
all bf16. What "the single-process bf16 run" is (:func:`runners_bf16_worker.reference`): float32
master weights, a bfloat16 copy of them for forward and backward of each rank's micro-batch, the
bfloat16 gradients cast to float32 and averaged, the optimizer step on the float32 masters; per
engine, what that engine does in one process:

- FSDP2: from the float32 model (FSDP2's shards are the float32 parameters; it gathers them as
  bfloat16 and reduces the gradients in float32, ``reduce_dtype``);
- ZeRO (every stage): from the float32 model rounded to bfloat16 (DeepSpeed casts the model to bfloat16 and
  makes the float32 masters from it), and the averaged gradient rounded to bfloat16 (DeepSpeed keeps
  it in its gradient accumulation dtype, bfloat16, even with ``communication_data_type: fp32``; not
  under ``grad_accum_dtype: fp32``); the
  frozen weights, which DeepSpeed holds in bfloat16 only, rounded to bfloat16 after each step (LoRA-Pro
  full mode's weight decay of the base weight multiplies them in place there: without this rounding
  the reference differs from the ZeRO-3 run by 3.0e-3 of the parameter change, measured, and
  emulating it in one process moves the reference by the same 3.0e-3).

A reference without these two roundings (the float32 start and gradients of FSDP2's) differs from
the ZeRO-3 run by 0.16% to 2.1% of the parameter change (measured): they are what DeepSpeed does.

Full fine-tuning and LoRA share torch's AdamW; they are kept apart because the sharded parameters
differ (every weight vs. PEFT factors and a ``modules_to_save`` head). LoRA-Pro's two modes and
GaLore / GoLore take different paths in the sharded steps (LoRA-sized gathers vs. m×n state on an
owner rank; SVD vs. random projector refreshes), so none is merged.
"""

import sys
from pathlib import Path

import pytest
import torch

from loralab.core.testing import run_torchrun

sys.path.insert(0, str(Path(__file__).parent))
from runners_bf16_worker import (
    ENGINES,
    METHODS,
    WHOLE_MATRIX_METHODS,
    WORLD,
    reference,
    start,
)

WORKER = Path(__file__).with_name("runners_bf16_worker.py")
BF16_EPS = 2.0**-8
# The engines compute every bfloat16 forward and backward as the reference does, from the same
# bfloat16 weights, as long as the float32 masters agree bit for bit; they differ in the order of
# float32 sums (the gradient mean, LoRA-Pro's and GaLore's sums over row shards, LoRA-Pro's batched
# vs. per-layer solves) and GaLore / GoLore's ZeRO owner rounding its update D before each rank adds
# it (one process adds it in one fused addmm). A master one float32 ulp off can round to a bfloat16
# weight one bfloat16 ulp (2^-8 relative) off, and the next steps' gradients follow it at bfloat16
# precision: relative to how far the parameter moved in 3 steps, a difference of the order of 2^-8.
# Measured (worst over the parameters, 2026-12-04): 0 for the element-wise optimizers on every engine
# and for LoRA-Pro full mode under every ZeRO stage, 1.6e-6 to 8.1e-6 for GaLore / GoLore under
# ZeRO-1/2/3 (0 before the owner scattered D instead of the whole weight), 1.3e-7 for LoRA-Pro
# efficient under ZeRO-1/2/3 (0 with float32 gradient accumulation), up to 3.5e-6 for LoRA-Pro and
# GaLore / GoLore under FSDP2. LoRA-Pro full mode under ZeRO-3 differed by 3.0e-3 while the
# reference kept the decayed base weights in float32: that was the bfloat16 in-place weight decay of
# the frozen base weights (emulated in one process it accounts for 3.03e-3), not its per-layer
# solves; with the reference doing the same, 0.
TOL = 2 * BF16_EPS
WRAPPER = {
    "zero1": "DeepSpeedZeroOptimizer",
    "zero1-fp32acc": "BF16_Optimizer",
    "zero2": "DeepSpeedZeroOptimizer",
    "zero3": "DeepSpeedZeroOptimizer_Stage3",
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("deepspeed")
    prefix = tmp_path_factory.mktemp("bf16") / "out"
    run_torchrun(WORKER, prefix, timeout=900)
    return [torch.load(f"{prefix}.{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def references():
    return {(m, e): reference(m, e) for m in METHODS for e in ENGINES}


def _relative_error(got: dict, ref: dict, start: dict) -> float:
    """max over parameters of max|got − ref| / max|ref − start| (relative to the parameter change)."""
    worst = 0.0
    for name, r in ref.items():
        moved = (r - start[name]).abs().max().item()
        assert moved > 0, f"{name} did not move in the reference"
        worst = max(worst, (got[name] - r).abs().max().item() / moved)
    return worst


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", METHODS)
def test_bf16_sharded_matches_one_process_bf16(results, references, engine, method):
    outs = [res[f"{engine}/{method}"] for res in results]
    for rank, out in enumerate(outs):
        assert "error" not in out, f"rank {rank}: {out.get('error')}"
    got, ref = outs[0]["params"], references[method, engine]
    assert set(got) == set(ref)
    for name, t in got.items():
        assert t.dtype == torch.float32, f"{name}: the masters are {t.dtype}"
        assert torch.isfinite(t).all(), f"{engine}/{method}: {name} is not finite"
        # every rank gathers the same whole masters
        torch.testing.assert_close(outs[1]["params"][name], t, rtol=0, atol=0)
    # the DeepSpeed path each engine stands for (zero1-fp32acc: the bf16 optimizer's own flat
    # partitions, which DeepSpeed picks for ZeRO-1 with float32 gradient accumulation)
    assert outs[0].get("wrapper") == WRAPPER.get(engine), outs[0].get("wrapper")
    first = {n: p.detach() for n, p in start(method, engine).named_parameters()}
    err = _relative_error(got, ref, first)
    print(f"{engine}/{method}: max |sharded - one process| / max |change| = {err:.3g}")
    assert err <= TOL, f"{engine}/{method}: relative difference {err:.3g} > {TOL:.3g}"


# the most weight matrices some rank holds whole at once: one (GaLore's SVD refresh gathers one
# gradient at a time to one rank under FSDP2 and ZeRO; between refreshes a matrix ZeRO splits over
# ranks is stepped by the projection algebra on each rank's elements, none whole, and one a rank holds
# whole under ZeRO-1/2 is updated there; LoRA-Pro full mode's owner builds its g̃ and Adam direction),
# none for LoRA-Pro full mode under FSDP2 (each rank builds its rows of g̃ only)
WHOLE = {("fsdp2", "lora_pro_full"): 0}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", WHOLE_MATRIX_METHODS)
def test_at_most_one_whole_weight_matrix_per_rank_during_a_step(results, engine, method):
    counts = [res[f"{engine}/{method}"] for res in results]
    for rank, out in enumerate(counts):
        assert "error" not in out, f"rank {rank}: {out.get('error')}"
    per_rank = [out["max_matrices"] for out in counts]
    tensors = [out["max_tensors"] for out in counts]
    print(
        f"{engine}/{method}: whole weight matrices at once per rank {per_rank}, tensors {tensors}"
    )
    assert max(per_rank) <= 1, per_rank
    # exactly what the step needs: the log saw the matrix a rank does hold whole (it is not blind)
    assert max(per_rank) == WHOLE.get((engine, method), 1), per_rank
