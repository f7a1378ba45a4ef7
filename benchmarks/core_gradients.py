"""Benchmark: memory and time of full-weight gradient estimation, loralab vs PEFT's LoRA-GA step.

Modes, each run in its own fresh subprocess on the same random Llama and the same batches:

- ``plain``: ``loralab.core.estimate_gradients`` returning every layer's gradient (fp32 dict);
- ``plain+consumer``: the same with a per-layer consumer that keeps only a sketch of each gradient
  (as a method keeps only its factors), so nothing but the estimator's own buffers is measured;
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
import datetime as _dt
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "core.md"
MODES = ("plain", "plain+consumer", "offload+consumer", "peft")

FULL = dict(
    hidden_size=768,
    num_hidden_layers=12,
    intermediate_size=2048,
    vocab_size=8000,
    num_attention_heads=12,
    num_key_value_heads=12,
    batches=4,
    batch_size=2,
    seq_len=256,
)
QUICK = dict(
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=688,
    vocab_size=2000,
    num_attention_heads=4,
    num_key_value_heads=4,
    batches=2,
    batch_size=2,
    seq_len=64,
)


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(mode: str, size: dict, threads: int, repeat: int = 2) -> dict:
    """Run one mode in this (fresh) process and return its measurements."""
    import torch

    torch.set_num_threads(threads)
    from loralab.core.gradients import estimate_gradients
    from loralab.core.targets import find_all_linear_modules, find_targets
    from loralab.core.testing import make_lm_batches, tiny_llama

    size = dict(size)
    n_batches, bsz, seq = size.pop("batches"), size.pop("batch_size"), size.pop("seq_len")
    model = tiny_llama(seed=0, max_position_embeddings=max(256, seq), **size)
    batches = make_lm_batches(
        n_batches, batch_size=bsz, seq_len=seq, vocab_size=model.config.vocab_size, seed=1
    )
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
            return estimate_gradients(model, batches, targets, consumer=consumer, progress=False)
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
    rss_before = _rss_mib()
    times = []
    t0 = time.perf_counter()
    grads = run_once()
    times.append(time.perf_counter() - t0)
    peak = _peak_mib()  # the first run's peak: later runs reuse freed memory
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
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        mode,
        "--threads",
        str(threads),
        "--repeat",
        str(repeat),
    ] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"mode {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_rel(a: dict, b: dict) -> float:
    import math

    worst = 0.0
    for name, x in a.items():
        y = b[name]
        num = math.sqrt(sum((u - v) ** 2 for u, v in zip(x, y)))
        den = math.sqrt(sum(u * u for u in x)) or 1.0
        worst = max(worst, num / den)
    return worst


def _load_note() -> str:
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return "unknown load"
    return f"1-min load average at the end: {load1:.1f} on {os.cpu_count()} cores"


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
    import torch

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
        f"Command: `{cmd}`. Machine: 2-core CPU, 24 GiB, torch {torch.__version__} ({platform.python_implementation()} "
        f"{platform.python_version()}); {_load_note()} — the machine was shared with other jobs while this ran, "
        f"so times are indicative. Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
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
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
