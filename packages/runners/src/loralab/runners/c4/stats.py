"""What C4 measures besides the loss: held-out cross-entropy over all ranks, and each step's tokens,
throughput and peak memory (added to the loop's ``train`` records)."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loralab.runners.c4.batches import C4Batches
from loralab.runners.loop import Callback

__all__ = ["StepStats", "evaluate", "peak_memory_mb"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    device: torch.device,
    *,
    synced_forwards: bool = False,
) -> tuple[float, int]:
    """Token-weighted mean cross-entropy over all ranks' held-out batches, and the token count.

    ``synced_forwards`` (FSDP2: every forward gathers the sharded weights, a collective): every rank
    runs as many forwards as the rank with the most batches; the extra ones are discarded.
    """
    total = torch.zeros(2, dtype=torch.float64)
    extra = 0
    if synced_forwards and dist.is_initialized() and dist.get_world_size() > 1:
        most = torch.tensor([len(batches)])
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        extra = int(most) - len(batches)
    for _ in range(extra):
        ids = torch.zeros(1, 2, dtype=torch.long, device=device)
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for batch in batches:
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
        )
        logits, target = out.logits[:, :-1].float(), batch["labels"].to(device)[:, 1:]
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), target.reshape(-1), reduction="sum"
        )  # ignore_index -100: padding
        total += torch.stack([loss.double().cpu(), (target != -100).sum().cpu().double()])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    return float(total[0] / total[1].clamp_min(1)), int(total[1])


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """Peak allocated GPU memory, or the process's peak RSS on CPU (MiB), and which one it is."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_peak_rss"


class StepStats(Callback):
    """Tokens (all ranks), wall-clock and CPU time, throughput and peak memory of each step; what C4
    adds to the loop's train records (``extras``)."""

    def __init__(self, batches: C4Batches, device: torch.device, method_callbacks: list) -> None:
        self.batches, self.device, self.method_callbacks = batches, device, method_callbacks
        self.tokens_per_s: list[float] = []  # steps after the first (the first computes projectors)
        self.tokens_per_cpu_s: list[float] = []
        self.last: dict[str, Any] = {}

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        self.t0, self.c0 = (
            time.perf_counter(),
            time.process_time(),
        )  # CPU-s: fair on a shared machine

    def on_step_end(self, step: int, model: nn.Module, optimizer: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt, dc = time.perf_counter() - self.t0, time.process_time() - self.c0
        tok = torch.tensor(float(self.batches.step_tokens))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(tok)
        self.batches.tokens_seen += int(tok)
        if step > 1:
            self.tokens_per_s.append(float(tok) / dt)
            self.tokens_per_cpu_s.append(float(tok) / max(dc, 1e-9))
        mem, kind = peak_memory_mb(self.device)
        # runs before the method's callbacks end the step: a ReLoRA refresh is still flagged
        reset = any(getattr(cb, "refreshing", False) for cb in self.method_callbacks)
        self.last = {
            "tokens_seen": self.batches.tokens_seen,
            "tokens_per_s": float(tok) / dt,
            "step_time_s": dt,
            "step_cpu_s": dc,
            "peak_mem_mb": mem,
            "mem_kind": kind,
            **({"projector_reset": True} if reset else {}),
        }

    def extras(self) -> dict[str, Any]:
        return self.last
