"""Run by test_core_zero3_fetch.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

A tiny Llama partitioned by ``deepspeed.zero.Init`` (no engine: nothing fetches its partitions) runs
forward and backward passes inside ``fetching_zero3_parameters``; every rank runs the same batches,
so its gradients must equal one unpartitioned process's. Counted at every gather
(``zero3_gather_peak``): how much of the model is whole at once.
"""

import sys

import deepspeed
import torch

from loralab.core.distributed import end_process_group
from loralab.core.gradients import estimate_gradients, estimate_gradients_from_step
from loralab.core.testing import make_lm_batches, tiny_llama, tiny_model, zero3_gather_peak
from loralab.core.zero3_fetch import fetching_zero3_parameters

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
TARGETS = ["q_proj", "down_proj"]


def partitioned(model):
    deepspeed.zero.Init(module=model, config_dict_or_path=DS_CONFIG)
    assert model.model.layers[0].self_attn.q_proj.weight.numel() == 0
    return model


def whole_now(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.ds_status.name != "NOT_AVAILABLE"]


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def hook_count(model) -> int:
    modules = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    params = sum(
        len(p._backward_hooks or {}) + len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
        for p in model.parameters()
    )
    return modules + params


def backward_passes(model, batches, *, checkpointing: bool, frozen: bool) -> tuple[dict, dict]:
    """Gradients of two backward passes, and what was counted; ``frozen``: only the targets train
    (the other weights are still saved for backward, for their inputs' gradients)."""
    if checkpointing:
        model.gradient_checkpointing_enable()
        model.train()  # transformers recomputes in train mode only (tiny_llama has no dropout)
    if frozen:
        for n, p in model.named_parameters():
            p.requires_grad_(any(t in n for t in TARGETS))
    hooks_before = hook_count(model)  # transformers' checkpointing adds one of its own
    with zero3_gather_peak(model) as seen, fetching_zero3_parameters(model):
        for b in batches:
            model(**b).loss.backward()
            seen.setdefault("whole_after_backward", []).extend(whole_now(model))
    seen["whole_after"] = whole_now(model)
    seen["hooks_left"] = hook_count(model) - hooks_before
    return grads(model), seen


def main(prefix: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    batches = make_lm_batches(
        2
    )  # the same batches on every rank: each must get one process's gradient
    out = {}
    for mode, kw in {
        "plain": dict(checkpointing=False, frozen=False),
        "checkpointing": dict(checkpointing=True, frozen=False),
        "frozen": dict(checkpointing=False, frozen=True),
    }.items():
        out[mode], out[f"{mode}_seen"] = backward_passes(partitioned(tiny_llama()), batches, **kw)

    # other architectures: GPT-2 (Conv1D layers that save their weight itself, the head tied to the
    # token embeddings: one parameter read by two modules, its gradient accumulated once from both)
    # and T5 (encoder-decoder, relative position bias, tied head)
    for arch in ("gpt2", "t5"):
        model = tiny_model(arch)
        deepspeed.zero.Init(module=model, config_dict_or_path=DS_CONFIG)
        with zero3_gather_peak(model) as seen, fetching_zero3_parameters(model):
            for b in batches:
                model(**b).loss.backward()
        seen["whole_after"] = whole_now(model)
        out[arch], out[f"{arch}_seen"] = grads(model), seen

    # core's estimators on a partitioned model: the hook path (blockwise=False) and the caller's loop;
    # each rank its own batches, all-reduced (the mean over both ranks' batches)
    mine = make_lm_batches(2, seed=100 + rank)
    model = partitioned(tiny_llama())
    with zero3_gather_peak(model) as seen:
        out["hooks"] = estimate_gradients(model, mine, TARGETS, blockwise=False, progress=False)
    out["hooks_seen"] = seen

    def train_step():
        for b in mine:
            model(**b).loss.backward()

    with zero3_gather_peak(model) as seen:
        out["from_step"] = estimate_gradients_from_step(model, train_step, TARGETS)
    out["from_step_seen"] = seen
    out["whole_after_estimates"] = whole_now(model)
    torch.save(out, f"{prefix}.{rank}.pt")
    end_process_group()  # not left to the interpreter's exit (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1])
