"""Benchmark: memory and time of full-weight gradient estimation, loralab vs PEFT's LoRA-GA step.

Modes, each run in its own fresh subprocess on the same random Llama and the same batches:

- ``plain``: ``loralab.core.estimate_gradients`` returning every layer's gradient (fp32 dict);
- ``plain+consumer``: the same with a per-layer consumer that keeps only a sketch of each gradient
  (as a method keeps only its factors), so nothing but the estimator's own buffers is measured; on
  the hook path (``blockwise=False``: with a consumer, the default streams such a model block by
  block in place, which ``benchmarks/lora_ga_init.py`` measures);
- ``offload+consumer``: ``estimate_gradients(offload=True, device="cpu")`` with the same consumer:
  block by block, at most one block's gradients exist at any time;
- ``peft``: PEFT's ``preprocess_loraga`` gradient step (its ``estimate_gradients``, driven by a
  ``train_step`` callback over the same batches), which keeps ``weight.grad`` of every target.

Memory is the process's peak resident set size (``resource.getrusage`` ``ru_maxrss``), and its
increase over the RSS right before estimation started (model and batches already built). Time is
wall-clock of the estimation alone. Every mode also returns, per layer, the sketch ``G @ v`` with
one fixed random ``v``; the table reports the largest relative difference of those sketches from
``plain`` (a correctness check of the comparison itself).

Usage::

    python benchmarks/core_gradients.py --quick      # small Llama, seconds
    python benchmarks/core_gradients.py              # ~97M-parameter Llama (12 x 768, vocab 8000)

Writes the markdown table to ``benchmarks/results/core.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "core.md"
MODES = ("plain", "plain+consumer", "offload+consumer", "peft")

FULL = _common.ESTIMATION_FULL
QUICK = _common.ESTIMATION_QUICK


def worker(mode: str, size: dict, threads: int, repeat: int = 2) -> dict:
    """Run one mode in this (fresh) process and return its measurements."""
    import torch

    torch.set_num_threads(threads)
    from loralab.core.gradients import estimate_gradients
    from loralab.core.targets import find_all_linear_modules, find_targets

    model, batches = _common.llama_and_batches(size)
    targets = find_targets(model)
    probes = {
        n: torch.randn(t.in_features, generator=torch.Generator().manual_seed(7))
        for n, t in targets.items()
    }
    sketches: dict[str, list[float]] = {}

    def consumer(name, grad):
        sketches[name] = (grad @ probes[name]).tolist()

    import gc

    def run_once():
        if mode == "plain":
            return estimate_gradients(model, batches, targets, progress=False)
        if mode == "plain+consumer":
            return estimate_gradients(
                model, batches, targets, consumer=consumer, blockwise=False, progress=False
            )
        if mode == "offload+consumer":
            return estimate_gradients(
                model,
                batches,
                targets,
                consumer=consumer,
                offload=True,
                device="cpu",
                progress=False,
            )
        if mode == "peft":
            from peft import LoraConfig
            from peft.tuners.lora.config import LoraGAConfig
            from peft.tuners.lora.loraga import preprocess_loraga

            cfg = LoraConfig(
                r=8,
                target_modules=find_all_linear_modules(model),
                init_lora_weights="lora_ga",
                lora_ga_config=LoraGAConfig(),
            )

            def train_step():
                for b in batches:
                    model(**b).loss.backward()

            preprocess_loraga(model, cfg, train_step)
            return {
                n: (
                    t.module._peft_loraga_grad.T
                    if t.kind == "conv1d"
                    else t.module._peft_loraga_grad
                )
                for n, t in targets.items()
            }
        raise ValueError(f"unknown mode {mode!r}")

    gc.collect()
    rss_before = _common.rss_mib()
    times = []
    t0 = time.perf_counter()
    grads = run_once()
    times.append(time.perf_counter() - t0)
    peak = _common.peak_rss_mib()  # the first run's peak: later runs reuse freed memory
    for n, g in grads.items():
        consumer(n, g)
    for t in targets.values():  # PEFT leaves its gradients on the modules
        t.module.__dict__.pop("_peft_loraga_grad", None)
    del grads
    for _ in range(repeat - 1):  # timing only: the machine is shared, keep the best of a few
        gc.collect()
        t0 = time.perf_counter()
        out = run_once()
        times.append(time.perf_counter() - t0)
        del out
        for t in targets.values():
            t.module.__dict__.pop("_peft_loraga_grad", None)
    elapsed = min(times)
    return {
        "mode": mode,
        "params": sum(p.numel() for p in model.parameters()),
        "target_params": sum(t.weight.numel() for t in targets.values()),
        "rss_before_mib": rss_before,
        "peak_mib": peak,
        "time_s": elapsed,
        "sketches": sketches,
    }


def _run_mode(mode: str, quick: bool, threads: int, repeat: int) -> dict:
    args = [__file__, "--worker", mode, "--threads", str(threads), "--repeat", str(repeat)]
    args += ["--quick"] if quick else []
    return _common.run_in_subprocess(
        args, label=f"mode {mode}", env={"OMP_NUM_THREADS": str(threads)}
    )


def _max_rel(a: dict, b: dict) -> float:
    import math

    worst = 0.0
    for name, x in a.items():
        y = b[name]
        num = math.sqrt(sum((u - v) ** 2 for u, v in zip(x, y)))
        den = math.sqrt(sum(u * u for u in x)) or 1.0
        worst = max(worst, num / den)
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small Llama (seconds) instead of ~97M parameters"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs per mode; time = the best (default 2)"
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.worker:
        print(json.dumps(worker(args.worker, size, args.threads, args.repeat)))
        return 0

    rows = [_run_mode(m, args.quick, args.threads, args.repeat) for m in MODES]
    base = rows[0]
    lines = [
        "## core: gradient estimation — loralab vs PEFT `preprocess_loraga`",
        "",
        f"Random Llama, {base['params'] / 1e6:.1f}M parameters ({base['target_params'] / 1e6:.1f}M in the "
        f"{'all-linear'} targets), {size['batches']} batches of {size['batch_size']}x{size['seq_len']} tokens, fp32, "
        f"{args.threads} torch threads. Each mode in a fresh process; time = best of {args.repeat} runs; peak = process peak RSS (first run); "
        "Δ = peak minus RSS right before estimation (model and batches built).",
        "",
        "| mode | time (s) | peak RSS (MiB) | Δ over model (MiB) | Δ / plain | Δ / PEFT | max rel. diff vs plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    peft_delta = next(r for r in rows if r["mode"] == "peft")
    peft_d = max(peft_delta["peak_mib"] - peft_delta["rss_before_mib"], 1e-9)
    plain_d = max(base["peak_mib"] - base["rss_before_mib"], 1e-9)
    for r in rows:
        d = r["peak_mib"] - r["rss_before_mib"]
        diff = _max_rel(base["sketches"], r["sketches"])
        lines.append(
            f"| {r['mode']} | {r['time_s']:.2f} | {r['peak_mib']:.0f} | {d:.0f} | {d / plain_d:.2f} | {d / peft_d:.2f} | {diff:.1e} |"
        )
    cmd = "python benchmarks/core_gradients.py" + (" --quick" if args.quick else "")
    lines += [
        "",
        _common.command_footer(
            cmd, " — the machine was shared with other jobs while this ran, so times are indicative"
        ),
        "",
        "Reading it: on a CPU-only machine `offload` cannot lower the *weights'* memory (they already live "
        "in host RAM), so its gain here is the gradient memory: with a consumer at most one block's "
        "gradients exist, where PEFT's step keeps `weight.grad` of every target (in the parameter dtype) "
        "and the plain path returns all of them in fp32. On a GPU, offload also bounds device memory to "
        "about one block plus the glue (embeddings, head) and the boundary activations. Offload re-runs "
        "each block's forward once (like activation checkpointing), hence its extra time. A consumer alone "
        "(`plain+consumer`) saves nothing on the plain path: every gradient is final only after the last "
        "batch, so all fp32 sums exist until then; Δ also holds autograd's saved activations of one batch.",
        "",
    ]
    _common.write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
