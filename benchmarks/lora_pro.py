"""LoRA-Pro optimizer step time and optimizer-state memory: loralab-lora-pro vs lora-pro-adamw vs AdamW.

All optimizers run on the same PEFT LoRA model (random Llama, LoRA on all linear layers: ≥ 100 LoRA
layers) and the same real gradients (one backward on random tokens, restored before every step —
lora-pro-adamw overwrites ``.grad`` in place — so only the optimizer step is timed). Each optimizer
does two warm-up steps (state allocation; lora-pro-adamw's special first step), then ``repeats``
timed steps, round-robin over the optimizers; the minimum is reported, in CPU seconds of a single-threaded process (time.process_time:
the machine is shared, wall-clock would measure other people's jobs). State bytes = every tensor in
the optimizer's state (for lora-pro-adamw: its moment dicts and inner AdamW), counted once.

Run: ``python benchmarks/lora_pro.py [--quick]``; writes ``benchmarks/results/lora_pro.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

# before this folder leaves the import path (below)
import _common

ROOT = Path(__file__).resolve().parent
# this file is named like the peer's package (``lora_pro``): keep its folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
RESULTS = ROOT / "results" / "lora_pro.md"

FULL = dict(hidden=512, inter=1376, layers=16, vocab=8000, rank=16, seq=32, repeats=10)
QUICK = dict(hidden=128, inter=344, layers=15, vocab=2000, rank=8, seq=16, repeats=3)

CONFIGS = {
    "adamw": "torch.optim.AdamW (defaults) on the LoRA params",
    "adamw-foreach": "torch.optim.AdamW(foreach=True)",
    "adamw-fused": "torch.optim.AdamW(fused=True)",
    "ours-efficient": "loralab LoraProAdamW mode='efficient' (Sylvester X)",
    "ours-efficient-zero": "loralab LoraProAdamW mode='efficient', x_mode='zero'",
    "ours-full": "loralab LoraProAdamW mode='full' (Sylvester X)",
    "peer-full": "lora-pro-adamw 0.2.1 LoRAProAdamW lorapro_mode='full' (its default)",
    "peer-efficient": "lora-pro-adamw 0.2.1 LoRAProAdamW lorapro_mode='efficient' (its default 'vec' solver)",
}


def _model(cfg, device):
    import peft
    import torch

    lora = peft.LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules="all-linear")
    model = peft.get_peft_model(_common.random_llama(cfg, max_position_embeddings=256), lora)
    model = model.to(device)
    # B = 0 at init would make every adjustment trivial (and lora-pro-adamw's first step special):
    # time a point in the middle of training instead.
    g = torch.Generator().manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.copy_((torch.randn(p.shape, generator=g) * 0.02).to(device))
    return model


def _state_bytes(opt) -> int:
    """Every tensor of the optimizer's state, counted once; lora-pro-adamw keeps its moments in dicts."""
    if hasattr(opt, "_state_m") or hasattr(opt, "_state_mA"):
        attrs = ("_state_m", "_state_v", "_state_mA", "_state_vA", "_state_mB", "_state_vB")
        state = [getattr(opt, a, {}) for a in attrs]
        if opt._base is not None:
            state.append(dict(opt._base.state))
        return _common.optimizer_state_bytes(state)
    return _common.optimizer_state_bytes(opt)


def _make(name, model, lr=1e-4):
    import torch

    if name.startswith("adamw"):
        kernel = {"adamw": {}, "adamw-foreach": {"foreach": True}, "adamw-fused": {"fused": True}}
        return torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=lr,
            weight_decay=0.0,
            **kernel[name],
        )
    if name.startswith("ours"):
        from loralab.lora_pro import LoraProAdamW

        mode = "full" if name == "ours-full" else "efficient"
        return LoraProAdamW(
            model, lr=lr, mode=mode, x_mode="zero" if name.endswith("zero") else "sylvester"
        )
    from lora_pro import LoRAProAdamW

    return LoRAProAdamW(model, lr=lr, weight_decay=0.0, lorapro_mode=name.split("-")[1])


def _sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run(cfg, names, device):
    import torch

    torch.set_num_threads(1)
    model = _model(cfg, device)
    n_pairs = sum(1 for n, _ in model.named_parameters() if "lora_A" in n)
    ids = torch.randint(
        4, cfg["vocab"], (2, cfg["seq"]), generator=torch.Generator().manual_seed(0)
    ).to(device)
    model(input_ids=ids, labels=ids).loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad.detach().clone() for p in params]
    start = [p.detach().clone() for p in params]
    lora_params = sum(p.numel() for p in params)
    # Round-robin: every round times one step of each optimizer, so a slow spell of the (shared) machine
    # hits all of them alike; each step starts from the same parameters and gradients.
    opts = {name: _make(name, model) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(2 + cfg["repeats"]):
        for name, opt in opts.items():
            for p, s, g in zip(params, start, grads):
                p.data.copy_(s)
                p.grad = g.clone()
            _sync(device)
            t0 = time.process_time() if device == "cpu" else time.perf_counter()
            opt.step()
            _sync(device)
            t1 = time.process_time() if device == "cpu" else time.perf_counter()
            if i >= 2:
                times[name].append(t1 - t0)
    rows = {}
    for name in names:
        rows[name] = dict(
            step=min(times[name]),
            state=_state_bytes(opts[name]),
            workspace=getattr(opts[name], "workspace_bytes", 0),
        )
        print(
            f"{name:22s} step {rows[name]['step']:.4f} s  state {rows[name]['state'] / 2**20:.1f} MiB",
            file=sys.stderr,
        )
    return rows, n_pairs, lora_params


def table(cfg, rows, n_pairs, lora_params, device, quick):
    base = rows["adamw"]
    lines = [
        "# loralab-lora-pro: LoRA-Pro optimizer step vs lora-pro-adamw and AdamW"
        + ("" if device == "cpu" else f" ({device})"),
        "",
        f"Random Llama (hidden {cfg['hidden']}, {cfg['layers']} layers), PEFT LoRA r={cfg['rank']} on all linear layers: "
        f"{n_pairs} LoRA layers, {lora_params / 1e6:.2f}M LoRA parameters; real gradients of one backward, optimizer step "
        f"timed alone ({'CPU seconds of a single-threaded process' if device == 'cpu' else 'wall seconds, CUDA-synchronised'}), "
        f"min over {cfg['repeats']} steps after 2 warm-up steps.",
        "",
        "| optimizer | step (s) | step vs AdamW (defaults) | step vs AdamW (fused) | ours efficient faster by | optimizer state (MiB) | state vs AdamW | workspace kept (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eff = rows.get("ours-efficient")
    fused = rows.get("adamw-fused")
    for name, r in rows.items():
        speed = "—"
        if eff is not None and name.startswith("peer"):
            speed = f"{r['step'] / eff['step']:.1f}×"
        vs_fused = f"{r['step'] / fused['step']:.2f}" if fused else "—"
        lines.append(
            f"| {CONFIGS[name]} | {r['step']:.4f} | {r['step'] / base['step']:.2f} | {vs_fused} | {speed} | {r['state'] / 2**20:.1f} | {r['state'] / base['state']:.2f} | {r['workspace'] / 2**20:.1f} |"
        )

    machine = _common.machine_description(device)
    lines += [
        "",
        f"Command: `python benchmarks/lora_pro.py{' --quick' if quick else ''}{' --device cuda' if device == 'cuda' else ''}`. "
        f"Machine: {machine} (Python {platform.python_version()}); {datetime.date.today().isoformat()}."
        + (
            " The machine was shared with other engineers' jobs; CPU time of one thread is reported for that reason."
            if device == "cpu"
            else ""
        ),
        "",
        'Targets (issue 6): efficient mode ≤ 2× AdamW step time; ≥ 5× faster than lora-pro-adamw. "AdamW" is '
        "`torch.optim.AdamW` as a user gets it (defaults: a per-parameter loop on CPU, `foreach` on CUDA); its `foreach` "
        "and `fused` kernels are timed beside it. Full mode keeps m×n Adam states per layer (as much optimizer memory as "
        "full fine-tuning of the adapted weights), as the paper's Algorithm 1 and the official code do; lora-pro-adamw's "
        "full mode rounds the g̃ entering its second moment to bfloat16. lora-pro-adamw adjusts layers one at a time (m×m "
        "projector per layer, per-layer solves). Ours, efficient mode: each factor stacked next to its gradient, "
        "[A; g_A] and [B | g_B], four batched products per layer shape, the r×r work (one symmetric eigendecomposition "
        "per Gram matrix, shared by the pseudo-inverse and the Sylvester solve) in one batch for all layers of a rank, "
        "only the adjusted gradients checked for NaN/Inf (products carry a non-finite input through), then AdamW with "
        "torch's fused kernel on CPU (element-wise ops on stacked moments on CUDA); the m×m projector is never formed. "
        'On CPU the stacking buffers are kept between steps ("workspace kept": 2× the LoRA parameters; fresh '
        "multi-MB buffers every step page-fault, which made the stacking copy about twice as slow).",
    ]
    if eff is not None:
        peers = [r["step"] / eff["step"] for n, r in rows.items() if n.startswith("peer")]
        ratios = {
            n: eff["step"] / rows[n]["step"]
            for n in ("adamw", "adamw-foreach", "adamw-fused")
            if n in rows
        }
        ratio = ratios["adamw"]
        adjust = eff["step"] - fused["step"] if fused else None
        lines += [
            "",
            f"Outcome: efficient mode = {ratio:.2f}× the step of AdamW with its defaults "
            f"({'meets' if ratio <= 2 else 'does NOT meet'} the ≤ 2× target on this {'CPU' if device == 'cpu' else 'GPU'})"
            + (
                f", {ratios['adamw-foreach']:.2f}× AdamW(foreach=True)"
                if "adamw-foreach" in ratios
                else ""
            )
            + (
                f", {ratios['adamw-fused']:.2f}× AdamW(fused=True) (NOT within 2×: the fused kernel is a single pass "
                f"per parameter, while LoRA-Pro's adjustment itself — stacking, four (m|n)×r batched products, 2 r×r "
                f"eigendecompositions per layer, the NaN/Inf check — costs about {adjust * 1e3:.1f} ms here)"
                if "adamw-fused" in ratios and ratios["adamw-fused"] > 2
                else (
                    f", {ratios['adamw-fused']:.2f}× AdamW(fused=True)"
                    if "adamw-fused" in ratios
                    else ""
                )
            )
            + f"; {min(peers):.1f}× faster than the faster lora-pro-adamw mode ({'meets' if min(peers) >= 5 else 'does NOT meet'} "
            "the ≥ 5× target); same optimizer-state bytes as AdamW.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model (CI-sized)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    rows, n_pairs, lora_params = run(cfg, list(CONFIGS), args.device)
    md = table(cfg, rows, n_pairs, lora_params, args.device, args.quick)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)


if __name__ == "__main__":
    main()
