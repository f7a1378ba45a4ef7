"""Benchmark: peak memory and wall time of the whole LoRA-GA init, loralab vs PEFT.

"Whole init" = gradient estimate + per-layer SVD + A/B + offset W0, on the same random Llama, the
same batches and the same LoRA config (r=8, all-linear targets, stable scale). Each mode runs in its
own fresh process:

- ``peft``: PEFT's ``preprocess_loraga(model, config, train_step)`` (a ``train_step`` callback over
  the batches; PEFT keeps ``weight.grad`` of every target) then ``get_peft_model``;
- ``loralab``: ``get_lora_ga_model(model, config, batches)``: core's estimator streams each finished
  gradient to a consumer that keeps only the layer's factors;
- ``loralab+offload``: the same with ``offload=True`` (block-wise estimate: at most one block's
  gradients exist at any time);
- ``seed``: the seed's API, ``estimate_gradient`` (returns every gradient, as the seed does) then
  ``with LoraGAContext(...): peft.get_peft_model(...)``.

Memory: peak resident set size of the process (``ru_maxrss``) minus the RSS right before the init
(model and batches built) = the init's *extra* memory. On a CUDA device (``--device cuda``) the
model lives on the GPU (offload: on the CPU, one block at a time on the GPU) and the GPU's
``max_memory_allocated`` is reported too. Results are compared: our modes' A, B, W0 must agree to
float32 rounding; PEFT's factors differ by definition (PEFT scales B by the singular values and
leaves A unscaled, see packages/lora-ga/README.md), so its A rows and B columns are compared with
ours after normalising, as |cos| (1 = same vector up to sign; both use a randomized SVD).

Usage::

    python benchmarks/lora_ga_init.py --quick   # small Llama, under a minute per mode
    python benchmarks/lora_ga_init.py           # ~97M-parameter Llama (12 x 768, vocab 8000)

Writes the markdown table to ``benchmarks/results/lora_ga.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lora_ga.md"
MODES = ("peft", "loralab", "loralab+offload", "seed")
RANK = 8

FULL = _common.ESTIMATION_FULL
QUICK = _common.ESTIMATION_QUICK


def worker(mode: str, size: dict, threads: int, device: str, out_file: str) -> dict:
    """Run one mode in this (fresh) process; save the factors to ``out_file``; return the measurements."""
    import gc

    import torch

    torch.set_num_threads(threads)
    import peft

    from loralab.core.targets import find_all_linear_modules
    from loralab.lora_ga import LoraGAConfig, LoraGAContext, estimate_gradient, get_lora_ga_model

    model, batches = _common.llama_and_batches(size)
    targets = find_all_linear_modules(model)
    cuda = device == "cuda"
    if cuda and mode != "loralab+offload":
        model.to("cuda")
        batches = [{k: v.to("cuda") for k, v in b.items()} for b in batches]
    cfg = dict(r=RANK, lora_alpha=2 * RANK, target_modules=targets)

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() if cuda else 0
    rss_before = _common.rss_mib()
    t0 = time.perf_counter()
    if mode == "peft":
        from peft.tuners.lora.config import LoraGAConfig as PeftLoraGASubConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = peft.LoraConfig(
            **cfg, init_lora_weights="lora_ga", lora_ga_config=PeftLoraGASubConfig()
        )

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        preprocess_loraga(model, config, train_step)
        pm = peft.get_peft_model(model, config)
    elif mode == "loralab":
        pm = get_lora_ga_model(model, LoraGAConfig(**cfg), batches, progress=False)
    elif mode == "loralab+offload":
        pm = get_lora_ga_model(
            model, LoraGAConfig(**cfg), batches, offload=True, device=device, progress=False
        )
    elif mode == "seed":
        named_grad = estimate_gradient(model, batches, None, targets=targets, progress=False)
        with LoraGAContext(model, named_grad):
            pm = peft.get_peft_model(model, LoraGAConfig(**cfg))
        del named_grad
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = _common.peak_rss_mib()
    gpu_peak = (torch.cuda.max_memory_allocated() - gpu_before) / 2**20 if cuda else None
    factors = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            factors[name] = {
                "A": mod.lora_A["default"].weight.detach().float().cpu(),
                "B": mod.lora_B["default"].weight.detach().float().cpu(),
                "W0": mod.get_base_layer().weight.detach().float().cpu(),
            }
    torch.save(factors, out_file)
    return {
        "mode": mode,
        "params": sum(p.numel() for n, p in pm.named_parameters() if "lora_" not in n),
        "layers": len(factors),
        "rss_before_mib": rss_before,
        "peak_mib": peak,
        "gpu_extra_mib": gpu_peak,
        "time_s": elapsed,
    }


def _run_mode(mode: str, quick: bool, threads: int, device: str, out_file: str) -> dict:
    args = [__file__, "--worker", mode, "--threads", str(threads), "--device", device]
    args += ["--factors", out_file] + (["--quick"] if quick else [])
    return _common.run_in_subprocess(
        args, label=f"mode {mode}", env={"OMP_NUM_THREADS": str(threads)}
    )


def _compare(ours: dict, other: dict) -> float:
    """Largest relative difference of A, B, W0 over all layers (our modes: equal up to float32 rounding)."""
    worst = 0.0
    for name, f in ours.items():
        for k in ("A", "B", "W0"):
            worst = max(worst, ((other[name][k] - f[k]).norm() / f[k].norm()).item())
    return worst


def _cos_vs_peft(ours: dict, theirs: dict) -> tuple[float, float]:
    """Median and minimum |cos| between our and PEFT's A rows / B columns (normalised: PEFT's B carries S)."""
    import torch

    cos = []
    for name, f in ours.items():
        a1, a2 = f["A"], theirs[name]["A"]
        b1, b2 = f["B"], theirs[name]["B"]
        cos.append(
            (torch.nn.functional.normalize(a1, dim=1) * torch.nn.functional.normalize(a2, dim=1))
            .sum(1)
            .abs()
        )
        cos.append(
            (torch.nn.functional.normalize(b1, dim=0) * torch.nn.functional.normalize(b2, dim=0))
            .sum(0)
            .abs()
        )
    c = torch.cat(cos)
    return c.median().item(), c.min().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small Llama (seconds) instead of ~97M parameters"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="compute device (default cpu)"
    )
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--factors", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.worker:
        print(json.dumps(worker(args.worker, size, args.threads, args.device, args.factors)))
        return 0

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        rows, factors = [], {}
        for m in MODES:
            path = os.path.join(tmp, f"{m.replace('+', '_')}.pt")
            rows.append(_run_mode(m, args.quick, args.threads, args.device, path))
            factors[m] = torch.load(path, weights_only=True)
            print(
                f"{m}: {rows[-1]['time_s']:.1f} s, peak {rows[-1]['peak_mib']:.0f} MiB",
                file=sys.stderr,
            )
    by_mode = {r["mode"]: r for r in rows}
    peft_row = by_mode["peft"]
    peft_d = max(peft_row["peak_mib"] - peft_row["rss_before_mib"], 1e-9)
    cuda = args.device == "cuda"
    gpu_hdr = " GPU extra (MiB) | GPU / PEFT |" if cuda else ""
    lines = [
        f"## lora-ga: whole LoRA-GA init (estimate + SVD + offset) — loralab vs PEFT ({args.device})",
        "",
        f"Random Llama, {peft_row['params'] / 1e6:.1f}M parameters, LoRA r={RANK} on all {peft_row['layers']} linear layers "
        f"(all-linear), {size['batches']} batches of {size['batch_size']}x{size['seq_len']} tokens, fp32, {args.threads} torch threads. "
        "Each mode in a fresh process. Δ = the process's peak RSS minus its RSS right before the init (model and batches "
        "built): the init's extra host memory.",
        "",
        f"| mode | time (s) | peak RSS (MiB) | Δ extra (MiB) | Δ / PEFT | time / PEFT |{gpu_hdr} A, B, W0 vs `loralab` (max rel.) | A/B vs PEFT, \\|cos\\| median / min |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if cuda else "") + "---:|---:|",
    ]
    for r in rows:
        m = r["mode"]
        d = r["peak_mib"] - r["rss_before_mib"]
        diff = (
            "(PEFT's definition)"
            if m == "peft"
            else f"{_compare(factors['loralab'], factors[m]):.1e}"
        )
        med, mn = _cos_vs_peft(factors[m], factors["peft"])
        gpu = ""
        if cuda:
            gpu = f" {r['gpu_extra_mib']:.0f} | {r['gpu_extra_mib'] / max(peft_row['gpu_extra_mib'], 1e-9):.2f} |"
        lines.append(
            f"| {m} | {r['time_s']:.1f} | {r['peak_mib']:.0f} | {d:.0f} | {d / peft_d:.2f} | {r['time_s'] / peft_row['time_s']:.2f} |{gpu} {diff} | {med:.4f} / {mn:.4f} |"
        )
    cmd = (
        "python benchmarks/lora_ga_init.py"
        + (" --quick" if args.quick else "")
        + (" --device cuda" if cuda else "")
    )
    lines += [
        "",
        f"Command: `{cmd}`. Machine: {_common.machine_description(args.device)} ({platform.python_implementation()} "
        f"{platform.python_version()}); {_common.load_average_note()}"
        + (
            " — the machine was shared with other jobs while this ran, so times are indicative"
            if not cuda
            else ""
        )
        + f". Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "Reading it: the target is ≤ 0.5× PEFT's extra memory at equal results; `loralab+offload` meets it. It streams the "
        "estimate block by block and keeps only r·(m+n) numbers per finished layer, so at most one block's fp32 gradients "
        "exist. Without offload a gradient is final only after the last batch, so every layer's fp32 sum exists until then "
        "(what PEFT holds in `weight.grad`): `seed` (which returns all gradients by design, the seed's `named_grad` dict) is "
        "at PEFT's level, and `loralab` (plain) estimates with the injected adapters switched off (with B = 0 they add nothing "
        "to the output, and off they keep no activations), so it holds what an estimate on the base model holds. Our three modes give the same A, B, W0 (float32 rounding); PEFT's factors differ by definition "
        "(B·diag(S), unscaled A), and after normalisation they are the same singular vectors up to both randomized SVDs' "
        "accuracy (median |cos| 1; the smallest values are for nearly equal singular values, where any SVD may rotate "
        "the vectors). Times are wall-clock; the load average above says how busy the machine was.",
        "",
    ]
    _common.write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
