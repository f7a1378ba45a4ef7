"""LoRA-SB vs PEFT LoRA at the same rank: trainable parameters, optimizer state, step time, init time.

Each variant runs in its own subprocess on the same random Llama (~106M parameters, hidden 768, 8
layers; ``--quick``: a ~6M one), adapters on every linear layer of the decoder blocks (all-linear),
AdamW (torch, foreach) on the trainable parameters:

- ``peft-lora``: ``peft.LoraConfig(r)``, default init (A kaiming, B = 0).
- ``lora-sb``: ``loralab.lora_sb.get_lora_sb_model`` at the same ``r`` (only the r×r ``R`` train);
  its init (gradient estimate over ``init_batches`` batches + one truncated SVD per layer) is timed.
- ``lora-sb-3r``: LoRA-SB at ``3r`` (the paper pairs LoRA r=32 with LoRA-SB r=96).
- ``full``: full fine-tuning with AdamW, for scale.

A training step is forward + backward + ``optimizer.step()`` on one batch (2 × seq tokens); the
optimizer step is also timed alone. Times are CPU seconds of a single-threaded process
(``time.process_time``, minimum over repeats): the machine is shared, and wall-clock time would
measure other people's jobs. Optimizer state = bytes of every tensor in ``optimizer.state`` after
the steps.

Run: ``python benchmarks/lora_sb.py [--quick]``; writes ``benchmarks/results/lora_sb.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "lora_sb.md"

FULL = dict(
    hidden=768, inter=2048, layers=8, vocab=32000, rank=32, seq=64, init_batches=4, repeats=3
)
QUICK = dict(hidden=256, inter=688, layers=4, vocab=8000, rank=8, seq=32, init_batches=2, repeats=3)

CONFIGS = {
    "peft-lora": "PEFT LoRA, r",
    "lora-sb": "loralab LoRA-SB, r",
    "lora-sb-3r": "loralab LoRA-SB, 3r",
    "full": "full fine-tuning (AdamW)",
}


def _batches(cfg, n, seed):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg["vocab"], (2, cfg["seq"]), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def worker(name: str, cfg: dict) -> None:
    import logging
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    # random models' tiny gradients square to denormals; flush them so timings measure the methods
    torch.set_flush_denormal(True)
    model = _common.random_llama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    init_s = estimate_s = None
    if name == "full":
        pass
    elif name == "peft-lora":
        from peft import LoraConfig, get_peft_model

        t0 = time.process_time()
        model = get_peft_model(
            model, LoraConfig(r=cfg["rank"], lora_alpha=cfg["rank"], target_modules=targets)
        )
        init_s = time.process_time() - t0
    else:
        from loralab.core import estimate_gradients
        from loralab.lora_sb import LoraSBConfig, get_lora_sb_model

        r = cfg["rank"] * (3 if name == "lora-sb-3r" else 1)
        # the gradient estimation alone (the same work get_lora_sb_model starts with), to split the init time
        t0 = time.process_time()
        estimate_gradients(
            model,
            _batches(cfg, cfg["init_batches"], 1),
            targets,
            consumer=lambda n, g: None,
            progress=False,
        )
        estimate_s = time.process_time() - t0
        t0 = time.process_time()
        model = get_lora_sb_model(
            model,
            LoraSBConfig(r=r, target_modules=targets),
            _batches(cfg, cfg["init_batches"], 1),
            lr=1e-3,
            progress=False,
        )
        init_s = time.process_time() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, foreach=True)
    data = _batches(cfg, cfg["repeats"] + 1, 2)
    model.train()
    steps, opt_steps = [], []
    for batch in data:
        t0 = time.process_time()
        model(**batch).loss.backward()
        t1 = time.process_time()
        opt.step()
        t2 = time.process_time()
        opt.zero_grad(set_to_none=True)
        steps.append(t2 - t0)
        opt_steps.append(t2 - t1)
    # one forward+backward of the base model (for the init time in units of training steps)
    res = dict(
        name=name,
        params=n_params,
        rank=None if name == "full" else cfg["rank"] * (3 if name == "lora-sb-3r" else 1),
        trainable=sum(p.numel() for p in trainable),
        state_bytes=_common.optimizer_state_bytes(opt),
        init_s=init_s,
        estimate_s=estimate_s,
        step_s=min(steps[1:]),  # step 0 allocates the optimizer state
        opt_step_s=min(opt_steps[1:]),
    )
    print(json.dumps(res))


def main() -> None:
    description = __doc__.split("\n\n")[0]
    args = _common.workers_parser(description, results=RESULTS, configs="variants").parse_args()
    cfg = QUICK if args.quick else FULL
    if args.worker:
        worker(args.worker, cfg)
        return
    rows = _common.run_workers(__file__, args.only or list(CONFIGS), quick=args.quick)
    _common.write_results(args.results, _table(rows, cfg, args))


def _table(rows: dict, cfg: dict, args) -> str:
    lora = rows.get("peft-lora")
    first = next(iter(rows.values()))
    lines = [
        "# loralab-lora-sb: LoRA-SB vs PEFT LoRA at the same rank",
        "",
        f"Random Llama, {first['params'] / 1e6:.0f}M parameters (hidden {cfg['hidden']}, intermediate {cfg['inter']}, "
        f"{cfg['layers']} layers, vocab {cfg['vocab']}); adapters on q/k/v/o/gate/up/down of every block "
        f"({7 * cfg['layers']} layers), r = {cfg['rank']}; AdamW on the trainable parameters; batch 2 × {cfg['seq']} tokens. "
        "Each variant in its own subprocess; times are CPU seconds of a single-threaded process (minimum over "
        f"{cfg['repeats']} steps after the first).",
        "",
        "| variant | rank | trainable params | trainable vs LoRA | optimizer state (MiB) | state vs LoRA "
        "| train step (CPU s) | step vs LoRA | optimizer.step (CPU ms) | init (CPU s) | of which gradient estimate (CPU s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():

        def ratio(key, fmt="{:.3g}×", r=r):
            return fmt.format(r[key] / lora[key]) if lora and lora[key] else "—"

        init = "—" if r["init_s"] is None else f"{r['init_s']:.2f}"
        est = "—" if r.get("estimate_s") is None else f"{r['estimate_s']:.2f}"
        lines.append(
            f"| {CONFIGS[name].replace(', r', '').replace(', 3r', '')} | {r['rank'] or '—'} | {r['trainable']:,} | {ratio('trainable')} "
            f"| {r['state_bytes'] / 2**20:.3f} | {ratio('state_bytes')} | {r['step_s']:.3f} | {ratio('step_s', '{:.2f}×')} "
            f"| {1000 * r['opt_step_s']:.2f} | {init} | {est} |"
        )
    sb = rows.get("lora-sb")
    cmd = (
        "python benchmarks/lora_sb.py"
        + (" --quick" if args.quick else "")
        + (f" --only {' '.join(args.only)}" if args.only else "")
    )
    lines += [""]
    if sb and lora:
        lines.append(
            f"**LoRA trains {lora['trainable'] / sb['trainable']:.1f}× more parameters than LoRA-SB at the same r = {cfg['rank']}** "
            f"(LoRA: r·(m+n) per layer, LoRA-SB: r²); its AdamW state is {lora['state_bytes'] / sb['state_bytes']:.1f}× larger. "
            f"LoRA-SB's init ({cfg['init_batches']} batches of gradient estimation + one randomized truncated SVD per layer) took "
            f"{sb['init_s']:.2f} CPU s ≈ {sb['init_s'] / lora['step_s']:.1f} LoRA training steps, of which the gradient estimate "
            f"(measured separately) is {sb['estimate_s']:.2f} s and the rest (SVDs, PEFT wrapping) {sb['init_s'] - sb['estimate_s']:.2f} s."
        )
        lines.append("")
    lines += [
        f"Command: `{cmd}`. Machine: {_common.machine_description()} (Python {platform.python_version()}); "
        f"{datetime.date.today().isoformat()}. The machine was shared with other engineers' jobs while this was measured, "
        "hence CPU seconds of one thread (time.process_time) rather than wall-clock time.",
        "",
        "Notes: a training step of either adapter is dominated by the frozen base model's forward/backward, so step times are "
        "close; LoRA-SB's adapter path is x·Aᵀ·Rᵀ·Bᵀ (one extra r×r matmul) and it stores no gradient for A/B. The "
        "train-step column includes that forward/backward; 'optimizer.step' is the optimizer alone.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
