"""Benchmark: per-rank memory of loading a model for FSDP2, every rank vs rank 0 only.

A random Llama (~97M parameters, untied, vocab 8000; ``--quick``: a small one) is saved once; then 2
CPU ranks (gloo, ``torchrun --nproc-per-node 2``, one torch thread each) load it and shard it with the
runners' ``FSDP2Engine`` in two modes, each in its own launch:

- ``every_rank``: every rank reads the whole checkpoint (``from_pretrained``), then ``fully_shard``
  frees what is not its shard (what ``--fsdp full_shard`` does);
- ``rank0``: accelerate's ``fsdp_cpu_ram_efficient_loading: true`` — rank 0 reads the checkpoint,
  the other ranks build the model on the meta device (``loralab.runners.data.load_pretrained``),
  and the engine fills every rank's shards from rank 0.

Per rank: the peak RSS from right after the imports and the process group (peak reset there; the
libraries loading imports lazily imported first, by building the model once on the meta device) to
the end of the sharding, and the RSS once sharded (freed memory returned with ``malloc_trim``), both
minus the RSS after the imports; the wall time of load + shard. Both modes also report a checksum of
the rank's shards (they must agree). The point of ``rank0``: no rank but the first ever holds the
whole model, so the other ranks' peak is their shard, not the model.

Usage::

    python benchmarks/fsdp_loading.py            # ~97M-parameter Llama
    python benchmarks/fsdp_loading.py --quick    # small Llama, seconds

Writes the markdown table to ``benchmarks/results/fsdp_loading.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "fsdp_loading.md"
MODES = ("every_rank", "rank0")
PREFIX = "FSDP_LOADING_RESULT "


def worker(mode: str, path: str) -> None:
    """Load ``path`` and shard it on this rank in ``mode``; rank 0 prints every rank's numbers."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from loralab.core.distributed import end_process_group
    from loralab.runners.data import dtype_kwargs, load_pretrained
    from loralab.runners.loop.fsdp2_engine import FSDP2Engine, init_fsdp_process_group

    init_fsdp_process_group()
    import torch.distributed as dist

    rank = dist.get_rank()
    # import what loading and sharding import lazily (the model's modules, FSDP2, its state-dict
    # helpers), so that the baseline holds the libraries and the peak above it only the model
    import torch.distributed.checkpoint.state_dict
    import torch.distributed.fsdp
    from transformers import AutoConfig

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    _common.reset_peak_rss()
    base = _common.rss_mib()
    start = time.perf_counter()
    on_meta = mode == "rank0" and rank != 0
    model = load_pretrained(AutoModelForCausalLM, path, on_meta=on_meta, **dtype_kwargs())
    engine = FSDP2Engine(rank0_loading=mode == "rank0")
    model = engine.shard(model)
    seconds = time.perf_counter() - start
    peak = _common.peak_rss_mib()
    _common.reset_peak_rss()
    with torch.no_grad():
        checksum = sum(float(p.to_local().double().sum()) for p in model.parameters())
    row = {
        "rank": rank,
        "peak_mib": peak - base,
        "sharded_mib": _common.rss_mib() - base,
        "seconds": seconds,
        "checksum": checksum,
        "params": sum(p.numel() for p in model.parameters()),
    }
    rows = engine.gather_object([row])
    if engine.is_main:
        print(PREFIX + json.dumps({"mode": mode, "ranks": rows}), flush=True)
    engine.end()
    end_process_group()  # not left to the interpreter's exit


def _launch(mode: str, path: str, port: int) -> dict:
    """One 2-rank launch of :func:`worker` in ``mode``; its printed result."""
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port)]
    return _common.run_in_subprocess(
        [*torchrun, __file__, "--worker", mode, path],
        label=mode,
        env={"OMP_NUM_THREADS": "1"},
        result_prefix=PREFIX,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small Llama (seconds)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return 0

    size = _common.ESTIMATION_QUICK if args.quick else _common.ESTIMATION_FULL
    model, _ = _common.llama_and_batches(size)
    n_params = sum(p.numel() for p in model.parameters())
    results = {}
    with tempfile.TemporaryDirectory(prefix="fsdp-loading-") as tmp:
        model.save_pretrained(tmp)
        del model
        for port, mode in enumerate(MODES, start=29850):
            results[mode] = _launch(mode, tmp, port)
            print(f"{mode}: done", flush=True)
    every, rank0 = ({r["rank"]: r for r in results[m]["ranks"]} for m in MODES)
    assert all(abs(every[k]["checksum"] - rank0[k]["checksum"]) == 0 for k in every), (every, rank0)
    lines = [
        "## FSDP2 loading: every rank vs rank 0 only (`fsdp_cpu_ram_efficient_loading`), 2 CPU ranks",
        "",
        f"Random Llama, {n_params / 1e6:.1f}M parameters ({size['hidden_size']} x "
        f"{size['num_hidden_layers']} layers, vocab {size['vocab_size']}, float32: "
        f"{n_params * 4 / 2**20:.0f} MiB), saved once, then loaded and sharded with the runners' "
        "`FSDP2Engine` on 2 gloo ranks. peak = the rank's highest RSS from after the imports and the "
        "process group to the end of the sharding; sharded = its RSS afterwards (freed memory returned); "
        "both minus its RSS after the imports. Each rank's shards are the same in both modes (checksums "
        "equal).",
        "",
        "| mode | rank | peak (MiB) | peak / every_rank's | sharded (MiB) | load + shard (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        for k, r in sorted({r["rank"]: r for r in results[mode]["ranks"]}.items()):
            ratio = r["peak_mib"] / every[k]["peak_mib"]
            lines.append(
                f"| {mode} | {k} | {r['peak_mib']:.0f} | {ratio:.2f} | {r['sharded_mib']:.0f} | "
                f"{r['seconds']:.1f} |"
            )
    others = max(rank0[k]["peak_mib"] / every[k]["peak_mib"] for k in rank0 if k != 0)
    lines += [
        "",
        f"Reading: the ranks that build on the meta device peak at {others:.2f}x their every-rank peak "
        "(their shard, never the whole model); rank 0 at "
        f"{rank0[0]['peak_mib'] / every[0]['peak_mib']:.2f}x (it holds the whole state dict and its "
        "own shard while broadcasting). Summed over the ranks: "
        f"{sum(r['peak_mib'] for r in rank0.values()):.0f} MiB vs "
        f"{sum(r['peak_mib'] for r in every.values()):.0f} MiB here; with N ranks loading every rank "
        "costs N whole models at once, rank 0 loading one plus the shards.",
    ]
    cmd = "python benchmarks/fsdp_loading.py" + (" --quick" if args.quick else "")
    lines += [
        "",
        _common.command_footer(cmd),
        "",
    ]
    _common.write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
