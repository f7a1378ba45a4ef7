"""The bf16 / CUDA paths of every method, on a GPU: finite training, step-0 equivalence, step time.

CI has no GPU, so this script records what the CPU test suite cannot: each method's native API on a
bf16 Llama on CUDA. For each method it builds the same random Llama (bf16 weights on the GPU, PEFT
LoRA r=16 on all linear layers where the method is an adapter), runs ``--steps`` AdamW-style steps
on four fixed random-token batches (cycled) and reports: the first and last loss, whether every loss and parameter
stayed finite, the median step time (CUDA events around forward + backward + optimizer step), and
peak GPU memory. LoRA-GA and LoRA-SB also report their init time; LoRA-GA reports how far the
initialised model's step-0 logits are from the base model's (the W0 offset is computed in fp32 and
cast back to bf16, so the gap is bf16 rounding of W0).

Run on a machine with a CUDA device: ``python benchmarks/cuda_bf16.py [--quick] [--out FILE]``.
Without one it writes nothing and exits 0 (``nox -s bench`` keeps the recorded GPU results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "cuda_bf16.md"

FULL = dict(hidden=2048, inter=5632, layers=8, heads=16, vocab=32000, seq=512, batch=4, steps=30)
QUICK = dict(hidden=256, inter=688, layers=2, heads=4, vocab=4000, seq=64, batch=2, steps=6)
METHODS = ("full", "lora", "lora-ga", "lora-fa", "lora-sb", "lora-pro", "lora-pro-full", "golore")
RANK = 16
DEVICE = "cuda"  # --device cpu only checks this script's logic (no timings worth recording)


def _llama(size: dict[str, int]) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        num_key_value_heads=size["heads"],
        max_position_embeddings=size["seq"],
        tie_word_embeddings=False,
    )
    with torch.device(DEVICE):
        model = LlamaForCausalLM(cfg)
    return model.to(torch.bfloat16)


def _batches(size: dict[str, int], n: int) -> list[dict[str, Any]]:
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, size["vocab"], (size["batch"], size["seq"]), generator=g).to(DEVICE)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _lora_config(cls: Any = None, **kw: Any) -> Any:
    import peft

    cls = cls or peft.LoraConfig
    return cls(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear", **kw)


def run_method(method: str, size: dict[str, int]) -> dict[str, Any]:
    import peft
    import torch

    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    model = _llama(size)
    # four fixed batches, cycled: random tokens are learnable only by memorising the batches
    batches = [b for _ in range(size["steps"]) for b in _batches(size, 4)][: size["steps"]]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    init_s, step0_gap = 0.0, None
    t0 = time.perf_counter()
    if method == "full":
        trained = model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    elif method == "lora":
        trained = peft.get_peft_model(model, _lora_config())
        opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-4)
    elif method == "lora-ga":
        from loralab.lora_ga import LoraGAConfig, get_lora_ga_model

        with torch.no_grad():
            base_logits = model(input_ids=batches[0]["input_ids"]).logits.float()
        trained = get_lora_ga_model(model, _lora_config(LoraGAConfig), batches[:4], progress=False)
        with torch.no_grad():
            logits = trained(input_ids=batches[0]["input_ids"]).logits.float()
        step0_gap = ((logits - base_logits).abs().max() / base_logits.abs().max()).item()
        opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=2e-4)
    elif method == "lora-fa":
        from loralab.lora_fa import create_lorafa_optimizer

        trained = peft.get_peft_model(model, _lora_config())
        opt = create_lorafa_optimizer(trained, r=RANK, lora_alpha=2 * RANK, lr=2e-4)
    elif method == "lora-sb":
        from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

        cfg = LoraSBConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear")
        trained = get_lora_sb_model(model, cfg, batches[:4], lr=1e-3, progress=False)
        opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3)
    elif method in ("lora-pro", "lora-pro-full"):
        from loralab.lora_pro import LoraProAdamW

        trained = peft.get_peft_model(model, _lora_config())
        mode = "full" if method == "lora-pro-full" else "efficient"
        opt = LoraProAdamW(trained, lr=2e-4, mode=mode)
    elif method == "golore":
        from loralab.golore import create_golore_optimizer

        trained = model
        opt = create_golore_optimizer(
            model, lr=1e-5, rank=128, update_proj_gap=10, rand_ratio=0.5, total_steps=size["steps"]
        )
    else:
        raise ValueError(method)
    if cuda:
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    trained.train()
    losses, times = [], []
    for batch in batches:
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t = time.perf_counter()
        loss = trained(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(1000 * (time.perf_counter() - t))
        losses.append(loss.item())
    finite = all(map(lambda x: x == x and abs(x) != float("inf"), losses)) and all(
        torch.isfinite(p).all().item() for p in trained.parameters() if p.requires_grad
    )
    trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    return {
        "method": method,
        "trainable": trainable,
        "init_s": init_s,
        "step0_gap": step0_gap,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "finite": finite,
        "step_ms": statistics.median(times[2:] if len(times) > 4 else times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
    }


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model, few steps")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(f"no CUDA device: {args.out} keeps the results recorded on a GPU", file=sys.stderr)
        return 0
    size = QUICK if args.quick else FULL
    rows = []
    for method in args.methods:
        try:
            rows.append(run_method(method, size))
        except Exception as exc:  # record and go on: one method's failure is a result too
            rows.append({"method": method, "error": f"{type(exc).__name__}: {exc}"[:300]})
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (logic check only)"
    n_params = sum(p.numel() for p in _llama(size).parameters()) / 1e6
    lines = [
        "# bf16 on CUDA: every method's native API on a GPU",
        "",
        f"Random Llama ({n_params:.0f}M parameters: hidden {size['hidden']}, {size['layers']} layers), "
        f"bf16 weights on the GPU, {size['steps']} steps of batch {size['batch']} x {size['seq']} "
        f"random tokens; adapters: PEFT LoRA r={RANK} on all linear layers.",
        "",
        "| method | trainable | init (s) | step (ms, median) | peak GPU memory (GiB) "
        "| first loss | last loss | all finite | LoRA-GA step-0 logit gap (rel.) |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |||||||")
            continue
        gap = f"{r['step0_gap']:.1e}" if r["step0_gap"] is not None else ""
        lines.append(
            f"| {r['method']} | {_count(r['trainable'])} | {r['init_s']:.1f} | {r['step_ms']:.1f} "
            f"| {r['peak_gib']:.1f} | {r['first_loss']:.3f} | {r['last_loss']:.3f} "
            f"| {'yes' if r['finite'] else 'NO'} | {gap} |"
        )
    lines += [
        "",
        f"Command: `python benchmarks/cuda_bf16.py{' --quick' if args.quick else ''}`. Machine: {gpu}, "
        f"torch {torch.__version__}; {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d}. "
        "Learning rates are each method's usual order of magnitude, not tuned; the losses show the "
        "bf16 paths train and stay finite, not which method is better (see `loralab compare`).",
    ]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
