"""LoRA-FA optimizer: step time and peak RSS, loralab's LoraFAAdamW vs PEFT's LoraFAOptimizer.

Each configuration runs in its own single-threaded subprocess on the same random Llama with LoRA on
every linear layer of the decoder (``--quick``: 15 layers × 7 = 105 LoRA layers; full: 16 × 7 = 112),
built the same way and given the same real gradients (one backward on random tokens; the gradients are
left in place, so only the optimizer is timed). Step 1 (state allocation; our ``(A·Aᵀ)⁻¹`` cache) is
reported separately, then the minimum CPU time of ``repeats`` further steps (CPU seconds of one thread:
the machine is shared, wall-clock would measure other people's jobs).

Configurations:

- ``peft``: ``peft.optimizers.create_lorafa_optimizer`` (Python loop, pinv per layer per step under
  bf16 autocast when available — it is on this CPU);
- ``ours``: ``loralab.lora_fa.create_lorafa_optimizer`` (cached float64 ``(A·Aᵀ)⁺``, batched bmm,
  ``torch._foreach`` AdamW);
- ``adamw``: ``torch.optim.AdamW(foreach=True)`` on the same trainable parameters (plain LoRA, no
  correction: the floor).

Peak RSS of a training step: a fresh process per configuration builds the model and optimizer, then
runs two full steps (forward, backward, optimizer step; the first allocates the state) while a thread
samples the RSS every 2 ms; reported as the peak and as the increase over the RSS before the steps.
(Activation memory of the memory-saving layer: ``benchmarks/lora_fa_memory.py``.)

Run: ``python benchmarks/lora_fa.py [--quick]``; writes ``benchmarks/results/lora_fa.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "lora_fa.md"

FULL = dict(hidden=256, inter=688, layers=16, vocab=8000, rank=16, seq=128, batch=2, repeats=5)
QUICK = dict(hidden=128, inter=344, layers=15, vocab=4000, rank=8, seq=64, batch=2, repeats=5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "peft": "PEFT 0.21 create_lorafa_optimizer (LoraFAOptimizer)",
    "ours": "loralab create_lorafa_optimizer (LoraFAAdamW)",
    "adamw": "torch.optim.AdamW(foreach) on the LoRA params (no correction, floor)",
}


def _build(cfg, which):
    import peft
    import torch

    model = peft.get_peft_model(
        _common.random_llama(cfg, head_dim=32),
        peft.LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules=TARGETS),
    )
    lr = 1e-4
    if which == "peft":
        from peft.optimizers import create_lorafa_optimizer

        opt = create_lorafa_optimizer(model, cfg["rank"], 2 * cfg["rank"], lr)
    elif which == "ours":
        from loralab.lora_fa import create_lorafa_optimizer

        opt = create_lorafa_optimizer(model, cfg["rank"], 2 * cfg["rank"], lr)
    else:
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, eps=1e-6, foreach=True
        )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    n_lora = sum(1 for n, _ in model.named_modules() if n.endswith("lora_B.default"))
    return model, opt, {"input_ids": ids, "labels": ids}, n_lora


def _child_time(cfg, which):
    import time

    import torch

    torch.set_num_threads(1)
    model, opt, batch, n_lora = _build(cfg, which)
    model(**batch).loss.backward()
    t0 = time.process_time()
    opt.step()
    first = time.process_time() - t0
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.process_time()
        opt.step()
        times.append(time.process_time() - t0)
    return {"first": first, "step": min(times), "n_lora": n_lora}


def _child_rss(cfg, which):
    import gc
    import threading
    import time

    import psutil
    import torch

    torch.set_num_threads(1)
    model, opt, batch, _ = _build(cfg, which)
    proc = psutil.Process()
    gc.collect()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    done.set()
    th.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    return {"peak_mib": peak[0] / 2**20, "increase_mib": (peak[0] - base) / 2**20}


def _run_child(mode, cfg, which):
    return _common.run_in_subprocess(
        [__file__, "--child", mode, "--which", which, "--cfg", json.dumps(cfg)],
        label=f"{mode}/{which}",
        env={"OMP_NUM_THREADS": "1"},
        timeout=None,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model (105 LoRA layers)")
    parser.add_argument("--child", choices=["time", "rss"], help=argparse.SUPPRESS)
    parser.add_argument("--which", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--cfg", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown results file")
    args = parser.parse_args()
    if args.child:
        cfg = json.loads(args.cfg)
        res = _child_time(cfg, args.which) if args.child == "time" else _child_rss(cfg, args.which)
        print(json.dumps(res))
        return

    cfg = QUICK if args.quick else FULL
    load = os.getloadavg()[0]
    rows = {}
    for which in CONFIGS:
        rows[which] = {**_run_child("time", cfg, which), **_run_child("rss", cfg, which)}
        print(which, rows[which], flush=True)
    n_lora = rows["ours"]["n_lora"]
    p, o = rows["peft"], rows["ours"]
    lines = [
        "# loralab-lora-fa: LoRA-FA optimizer step time and peak RSS (ours vs PEFT)",
        "",
        f"Random Llama (hidden {cfg['hidden']}, intermediate {cfg['inter']}, {cfg['layers']} layers, vocab {cfg['vocab']}), float32, "
        f"LoRA r={cfg['rank']} (alpha {2 * cfg['rank']}) on all {len(TARGETS)} linear layers of every decoder layer = **{n_lora} LoRA layers**; "
        f"batch {cfg['batch']}×{cfg['seq']} tokens. Each configuration in its own single-threaded process.",
        "",
        "| optimizer | first step (CPU ms) | step (CPU ms, min of "
        f"{cfg['repeats']}) | speed-up vs PEFT | peak RSS of a training step (MiB) | RSS increase during 2 steps (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for which, label in CONFIGS.items():
        r = rows[which]
        lines.append(
            f"| {label} | {1e3 * r['first']:.1f} | {1e3 * r['step']:.1f} | {p['step'] / r['step']:.1f}× | {r['peak_mib']:.0f} | {r['increase_mib']:.0f} |"
        )
    lines += [
        "",
        f"**Optimizer step: ours is {p['step'] / o['step']:.1f}× faster than PEFT's** (target ≥ 3×); first step {p['first'] / o['first']:.1f}× "
        f"(ours computes and caches every layer's (A·Aᵀ)⁺ then). Peak RSS of a training step: ours {o['peak_mib']:.0f} MiB vs PEFT "
        f"{p['peak_mib']:.0f} MiB ({o['peak_mib'] / p['peak_mib']:.2f}×). The optimizer state is the same size in both (two moments per B); "
        "the activation saving of the memory-saving layer is measured in `lora_fa_memory.md`.",
        "",
        f"Command: `python benchmarks/lora_fa.py{' --quick' if args.quick else ''}`. Machine: {_common.machine_description()} "
        f"({platform.python_version()}); {datetime.date.today().isoformat()}. Timings are CPU seconds of one thread (process_time), "
        f"taken while the machine was shared with other engineers' test runs (1-min load average {load:.1f} on 2 cores at the start): "
        "ratios are meaningful, absolute numbers indicative. RSS is sampled every 2 ms with psutil.",
    ]
    _common.write_results(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
