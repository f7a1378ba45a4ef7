"""LoRA-FA activation memory: bytes saved for backward and peak RSS of a training step.

Three ways to train the same random Llama (~106M parameters; ``--quick``: ~7M) with LoRA on every
linear layer of the decoder:

* ``lora``    — PEFT LoRA, A and B trainable;
* ``peft-fa`` — PEFT LoRA with every ``lora_A`` frozen: what ``peft.optimizers.create_lorafa_optimizer``
  trains (it only sets ``requires_grad=False`` on A; the layers are PEFT's own);
* ``ours``    — the same model after ``loralab.lora_fa.layer.apply_lorafa_layers`` (backward keeps
  ``drop(X)·Aᵀ`` only; the dropout mask is regenerated from a seed).

Each configuration runs in its own subprocess: build the model, reset the kernel's peak-RSS mark
(``/proc/self/clear_refs``), then one training step (forward, backward, AdamW step on the trainable
parameters) on one sequence. Reported: the bytes of activation storages autograd saved for backward
(``saved_tensors_hooks``, each storage once, parameters excluded: deterministic), per token; the
process's peak RSS during the step and its increase over the RSS before the step (allocator-dependent,
so only indicative); and CPU seconds of the step (the machine is shared). With gradient
checkpointing the checkpoint keeps each block's inputs outside autograd's saved tensors, so only RSS
is reported for those rows.

Run: ``python benchmarks/lora_fa_memory.py [--quick] [--out FILE]``; writes ``benchmarks/results/lora_fa_memory.md``
(``--quick`` only prints unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "lora_fa_memory.md"

FULL = dict(hidden=768, inter=2048, layers=8, vocab=32000, seq=512, rank=16)
QUICK = dict(hidden=256, inter=688, layers=4, vocab=8000, seq=256, rank=8)

NOTE = (
    "Reading: the ≤ 0.7× LoRA target holds with dropout (saved bytes 0.53×, step RSS increase 0.67×); "
    "without dropout ours equals PEFT LoRA-FA (0.81× LoRA): freezing A already spares X, and what remains"
    " is the frozen model's own activations (attention, MLP, norms, the 32k-vocabulary loss), which no "
    "adapter can remove. The layer's gain is the dropout masks. With gradient checkpointing the step's "
    "peak is set by the LM head and loss, so all three are equal."
)

RUNS = [  # (method, lora_dropout, gradient checkpointing)
    ("lora", 0.05, False),
    ("peft-fa", 0.05, False),
    ("ours", 0.05, False),
    ("lora", 0.0, False),
    ("peft-fa", 0.0, False),
    ("ours", 0.0, False),
    ("lora", 0.05, True),
    ("peft-fa", 0.05, True),
    ("ours", 0.05, True),
]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(cfg: dict, method: str, dropout: float, checkpointing: bool) -> dict:
    import gc

    import peft
    import torch

    from loralab.lora_fa.layer import apply_lorafa_layers
    from loralab.lora_fa.memory import saved_tensor_bytes

    base = _common.random_llama(cfg, max_position_embeddings=cfg["seq"], attn_implementation="sdpa")
    n_params = sum(p.numel() for p in base.parameters())
    lcfg = peft.LoraConfig(
        r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules="all-linear", lora_dropout=dropout
    )
    model = peft.get_peft_model(base, lcfg)
    if method in ("peft-fa", "ours"):
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    if method == "ours":
        apply_lorafa_layers(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(
        4, cfg["vocab"], (1, cfg["seq"]), generator=torch.Generator().manual_seed(0)
    )
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    rss_before = _rss_kib("VmRSS")
    t0 = time.process_time()
    with saved_tensor_bytes(model) as stats:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    seconds = time.process_time() - t0
    peak = _rss_kib("VmHWM")
    return dict(
        params=n_params,
        saved_bytes=None if checkpointing else stats.nbytes,
        tokens=cfg["seq"],
        rss_before_mib=rss_before / 1024,
        peak_rss_mib=peak / 1024,
        step_increase_mib=(peak - rss_before) / 1024,
        cpu_s=seconds,
        loss=float(loss),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model and sequence (a smoke run)")
    ap.add_argument(
        "--out",
        type=Path,
        help=f"results file (default: {RESULTS.relative_to(ROOT.parent)}; --quick only prints)",
    )
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.worker:
        method, dropout, ckpt = json.loads(args.worker)
        print("RESULT " + json.dumps(worker(cfg, method, dropout, ckpt)))
        return

    # glibc: one arena, and a fixed mmap threshold (no dynamic raise), so every tensor >= 1 MiB is mapped on
    # allocation and unmapped on free; RSS then follows the live tensors rather than the allocator's cache
    env = dict(
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
        MALLOC_ARENA_MAX="1",
        MALLOC_MMAP_THRESHOLD_=str(1 << 20),
    )
    rows = []
    for method, dropout, ckpt in RUNS:
        cmd = [__file__, "--worker", json.dumps([method, dropout, ckpt])] + (
            ["--quick"] if args.quick else []
        )
        res = _common.run_in_subprocess(
            cmd,
            label=f"{method} dropout={dropout} checkpointing={ckpt}",
            env=env,
            timeout=1800,
            result_prefix="RESULT ",
        )
        rows.append((method, dropout, ckpt, res))
        print(method, dropout, ckpt, res, flush=True)

    def ref(dropout, ckpt, method):
        return next(r for m, d, c, r in rows if m == method and d == dropout and c == ckpt)

    names = {
        "lora": "PEFT LoRA (A, B trained)",
        "peft-fa": "PEFT LoRA-FA (A frozen)",
        "ours": "loralab LoRA-FA layer",
    }
    table = [
        "| method | lora_dropout | grad. checkpointing | saved for backward (bytes/token) | vs LoRA | vs PEFT LoRA-FA "
        "| peak RSS of the step (MiB) | step increase (MiB) | vs LoRA | step (CPU s) |",
        "|---|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, dropout, ckpt, r in rows:
        lora, fa = ref(dropout, ckpt, "lora"), ref(dropout, ckpt, "peft-fa")
        if r["saved_bytes"] is None:
            per_tok = vs_lora = vs_fa = "—"
        else:
            per_tok = f"{r['saved_bytes'] / r['tokens']:,.0f}"
            vs_lora = f"{r['saved_bytes'] / lora['saved_bytes']:.2f}"
            vs_fa = f"{r['saved_bytes'] / fa['saved_bytes']:.2f}"
        table.append(
            f"| {names[method]} | {dropout} | {'yes' if ckpt else 'no'} | {per_tok} | {vs_lora} | {vs_fa} "
            f"| {r['peak_rss_mib']:,.0f} | {r['step_increase_mib']:,.0f} | {r['step_increase_mib'] / lora['step_increase_mib']:.2f} "
            f"| {r['cpu_s']:.1f} |"
        )
    p = rows[0][3]["params"]
    head = (
        f"# loralab-lora-fa: activation memory of a training step (LoRA vs PEFT LoRA-FA vs ours)\n\n"
        f"Random Llama, {p / 1e6:.0f}M parameters (hidden {cfg['hidden']}, intermediate {cfg['inter']}, {cfg['layers']} layers, "
        f"vocab {cfg['vocab']}, sdpa attention), float32, LoRA r={cfg['rank']} (alpha {2 * cfg['rank']}) on all linear layers of the "
        f"decoder, one sequence of {cfg['seq']} tokens; one forward + backward + AdamW step per run, each in its own process.\n"
    )
    cmd = "python benchmarks/lora_fa_memory.py" + (" --quick" if args.quick else "")
    foot = (
        f"\nCommand: `{cmd}`. Machine: {_common.machine_description()} ({platform.python_version()}); "
        f"{datetime.date.today().isoformat()}. The machine was shared with other engineers' test runs: CPU seconds are "
        "indicative only.\n\n"
        "'saved for backward' = bytes of the distinct storages autograd keeps between forward and backward "
        "(`torch.autograd.graph.saved_tensors_hooks`, parameters excluded): an exact property of the graph. "
        "'step increase' = peak RSS during the step minus RSS before it (includes transient buffers and allocator "
        "behaviour, so it is noisier; workers run with MALLOC_ARENA_MAX=1 and MALLOC_MMAP_THRESHOLD_=1048576 so freed tensors leave RSS). With gradient checkpointing the blocks' inputs are held outside the saved "
        "tensors, so only RSS is given. On CPU torch's dropout keeps a float32 mask (on CUDA a bool one): PEFT "
        "LoRA-FA keeps one per adapted layer, ours keeps a seed and regenerates it in backward.\n"
        + ("\n" + NOTE + "\n" if not args.quick else "")
    )
    text = head + "\n" + "\n".join(table) + "\n" + foot
    out = args.out or (None if args.quick else RESULTS)
    if out is None:
        print(text)
    else:
        _common.write_results(out, text)


if __name__ == "__main__":
    main()
