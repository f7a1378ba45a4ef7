"""Where a C4 pre-training step's time goes: AdamW vs GaLore vs GoLore on llama_60m, in one process.

``benchmarks/c4_pretrain.py`` times the runner end to end (one process per optimizer, the mean over a
few steps). This script answers the follow-up question — *why* one optimizer's step is slower — by
timing, in one process on the same model, batches and device:

- the whole step (forward, backward, optimizer step) and the optimizer step alone, each synchronized,
  median and min over ``--steps`` steps after ``--warmup`` (the first step builds the projectors and is
  excluded), with the optimizers run in the order A B C C B A so that a drift of the machine (clocks,
  other jobs) shows as a difference between the two passes of one optimizer;
- per optimizer, one profiled optimizer step (``torch.profiler``): the number of kernels / operators it
  launches and the operators that take the most device (or CPU) time.

The optimizers are built as the runner builds them (``create_galore_optimizer`` /
``create_golore_optimizer`` with rank 128, scale 0.25, ``update_proj_gap`` larger than the run; torch
``AdamW`` for AdamW). GoLore runs twice: ``rand_ratio 0`` (random projectors) and ``rand_ratio 1`` (SVD
projectors, i.e. GaLore's arithmetic through GoLore's class).

Run: ``python benchmarks/c4_step_profile.py [--quick] [--device cuda] [--steps 30] [--out FILE]``;
prints a markdown report and writes it to ``benchmarks/results/c4_step_profile.md`` (CPU) or
``c4_step_profile_cuda.md`` (GPU). On the CPU the step is compute-bound and the comparison says little
about a GPU; the GPU file is the one to read.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

RANK, SCALE = 128, 0.25
RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(model_config="llama_60m", batch_size=8, max_length=256, steps=30, warmup=3)
QUICK = dict(model_config="llama_20m", batch_size=2, max_length=64, steps=6, warmup=1)


def _batch(vocab: int, batch: int, seq: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def _optimizer(name: str, model: torch.nn.Module, steps: int) -> torch.optim.Optimizer:
    from loralab.golore import create_galore_optimizer, create_golore_optimizer

    gap = 10 * steps + 100  # only the first projector: the steady state is what is timed
    kw = dict(rank=RANK, scale=SCALE, update_proj_gap=gap, targets="all-linear", eps=1e-6)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-3)
    if name == "galore":
        return create_galore_optimizer(model, 1e-3, **kw)
    ratio = {"golore (rand_ratio 0)": 0.0, "golore (rand_ratio 1, SVD)": 1.0}[name]
    return create_golore_optimizer(model, 1e-3, rand_ratio=ratio, total_steps=gap, **kw)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _step(model, opt, batch) -> tuple[float, float]:
    device = batch["input_ids"].device.type
    _sync(device)
    t0 = time.perf_counter()
    model(**batch).loss.backward()
    _sync(device)
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    _sync(device)
    t2 = time.perf_counter()
    return t2 - t0, t2 - t1


def _profile(model, opt, batch) -> dict:
    from torch.profiler import ProfilerActivity, profile

    device = batch["input_ids"].device.type
    model(**batch).loss.backward()
    _sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        opt.step()
        _sync(device)
    opt.zero_grad(set_to_none=True)
    events = prof.key_averages()
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    top = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:8]
    kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    return {
        "kernels": kernels,
        "aten_ops": ops,
        "top": [(e.key, getattr(e, key, 0.0) / 1e3, e.count) for e in top],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # size flags default to None: --quick fills the ones not given, so no flag is silently overridden
    p.add_argument("--steps", type=int, default=None, help=f"timed steps (default {FULL['steps']})")
    p.add_argument("--warmup", type=int, default=None, help=f"default {FULL['warmup']}")
    p.add_argument("--batch_size", type=int, default=None, help=f"default {FULL['batch_size']}")
    p.add_argument("--max_length", type=int, default=None, help=f"default {FULL['max_length']}")
    p.add_argument("--model_config", default=None, help=f"default {FULL['model_config']}")
    p.add_argument("--quick", action="store_true", help=f"defaults {QUICK}")
    p.add_argument(
        "--out", type=Path, default=None, help="default: results/c4_step_profile[_cuda].md"
    )
    a = p.parse_args(argv)
    size = QUICK if a.quick else FULL
    given = [k for k in size if getattr(a, k) is not None]  # echoed in the report's command
    for key, value in size.items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    command = f"python benchmarks/c4_step_profile.py --device {a.device}" + (
        " --quick" if a.quick else ""
    )
    command += "".join(f" --{k} {getattr(a, k)}" for k in given)
    if a.out is None:
        a.out = RESULTS / f"c4_step_profile{'_cuda' if a.device == 'cuda' else ''}.md"

    from loralab.runners.c4.model import build_model

    names = ["adamw", "galore", "golore (rand_ratio 0)", "golore (rand_ratio 1, SVD)"]
    setups = {}
    for name in names:  # one model and optimizer each: same weights (seed), same batch
        model = build_model(a.model_config, seed=0).to(a.device)
        model.config.use_cache = False
        setups[name] = (model, _optimizer(name, model, a.steps))
    batch = _batch(model.config.vocab_size, a.batch_size, a.max_length, a.device)
    step_s = {n: [] for n in names}
    opt_s = {n: [] for n in names}
    first = {}
    for n in names:  # the first step of each (projectors) and warm-up
        model, opt = setups[n]
        first[n] = _step(model, opt, batch)[1]
        for _ in range(a.warmup):
            _step(model, opt, batch)
    order = names + names[::-1]
    for k, n in enumerate(order):
        model, opt = setups[n]
        for _ in range(a.steps // 2):
            s, o = _step(model, opt, batch)
            step_s[n].append((k < len(names), s))
            opt_s[n].append(o)
    profiles = {n: _profile(*setups[n], batch) for n in names}

    base = statistics.median(s for _, s in step_s["adamw"])
    tokens = a.batch_size * a.max_length
    dev = (
        torch.cuda.get_device_name(0)
        if a.device == "cuda"
        else f"cpu ({torch.get_num_threads()} threads)"
    )
    lines = [
        f"# C4 step profile: {a.model_config}, {a.batch_size}x{a.max_length} tokens, {dev}, torch {torch.__version__}",
        "",
        f"Command: `{command}`. Each optimizer: "
        f"{a.warmup} warm-up steps after its first, then {a.steps // 2} steps in pass 1 and {a.steps // 2} in pass 2 "
        "(order A B C D D C B A). Times in ms; tokens/s from the median whole step.",
        "",
        "| optimizer | 1st opt. step | step median | pass 1 / pass 2 median | step min | opt. step median | tokens/s | × AdamW | kernels per opt. step | aten ops per opt. step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        s = [x for _, x in step_s[n]]
        p1 = statistics.median(x for f, x in step_s[n] if f)
        p2 = statistics.median(x for f, x in step_s[n] if not f)
        med = statistics.median(s)
        pr = profiles[n]
        lines.append(
            f"| {n} | {1e3 * first[n]:.1f} | {1e3 * med:.2f} | {1e3 * p1:.2f} / {1e3 * p2:.2f} | {1e3 * min(s):.2f} | "
            f"{1e3 * statistics.median(opt_s[n]):.2f} | {tokens / med:.0f} | {base / med:.3f} | {pr['kernels']} | {pr['aten_ops']} |"
        )
    lines += ["", "Top operators of one optimizer step (time in ms, calls):", ""]
    for n in names:
        lines.append(
            f"- {n}: " + "; ".join(f"`{k}` {t:.2f} ({c})" for k, t, c in profiles[n]["top"])
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out is not None:
        a.out.write_text(report)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
