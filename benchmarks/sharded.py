"""Benchmark: per-rank memory, optimizer state and step time of every method under each engine.

Each method trains a random Llama (~97M parameters, untied, vocab 8000) with 2 CPU ranks (gloo,
``torchrun --nproc-per-node 2``, one torch thread per rank) under every engine the runners offer it
(its ``sharded_engines``, read from the registry at run time):

- ``ddp``: ``accelerate`` DDP (every rank holds the whole model, gradients and optimizer state);
- ``zero2`` / ``zero3``: ``--deepspeed zero2`` / ``zero3`` (accelerate's DeepSpeed plugin);
- ``fsdp2``: ``--fsdp full_shard`` (``torch.distributed.fsdp.fully_shard``, ``DTensor`` row shards);
- ``fsdp2-sgo``: ``--fsdp shard_grad_op`` (the same, each block's gathered weights kept from its
  forward to its backward: one all-gather per block and step instead of two).

The worker builds the engine, the method (``Method.setup``, its optimizer included) and runs the
runners' own ``train_step`` exactly as the fine-tuning loop does. Per rank it reports:

- peak RSS while training (sampled every 2 ms from the first step on, after the model was built whole
  and the engine sharded it and freed memory was handed back with ``malloc_trim``) minus the RSS after
  the imports: what this rank's parameters, gradients, optimizer state and activations cost;
- peak heap in use, the same way: the bytes glibc's ``malloc`` has handed out and not yet freed
  (``mallinfo2``), which follows the live tensors; RSS also counts the free chunks a heap keeps
  between live ones, which repeated all-gather buffers and activations of different lifetimes leave
  behind (on a GPU the caching allocator's reserved-vs-allocated);
- optimizer-state bytes: every tensor in the innermost optimizer's ``state`` (a ``DTensor`` counts its
  local shard; DeepSpeed's fp32 master partitions are not included, see the table notes);
- step time: the median of the timed steps (after warm-up), the slowest rank's;
- optimizer-step time: of each timed step, the time inside the innermost optimizer's ``step`` (summed
  when the engine calls it more than once a step: DeepSpeed's ZeRO-3 sub-groups), the median, the
  slowest rank's. The rest of the step is the engine's forward, backward and gradient reduction.

``--profile`` also prints, for each run, rank 0's 15 most expensive operators (self CPU time) over one
timed step (``torch.profiler``; the step is then left out of the timings).

``--keep-freed-memory`` runs every rank with glibc's allocator told to keep freed memory in the
process (``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` = 64 GiB) instead of handing every block
over 32 MiB back to the system when it is freed: what a GPU's caching allocator does. Why it matters
here: a DeepSpeed ZeRO step runs the inner optimizer on one flat partition per parameter group, so
its temporaries (``exp_avg_sq.sqrt()``, the division after it) are single ~185 MiB tensors, freshly
mapped and page-faulted in at every step; on a virtual machine that returns freed pages to its host
that costs seconds (see the results' notes). The peak (RSS) column then includes memory held free,
so compare RSS peaks from a run without the flag; the in-use column is unaffected.

Ratios are to the same method's ``ddp`` run. Targets (issue "sharded training"): per-rank optimizer
state ≤ 0.55× DDP's under ZeRO-3 and FSDP2; step time ≤ 1.3× the method's DDP step.

Usage::

    python benchmarks/sharded.py --quick            # small Llama, a minute or two per method
    python benchmarks/sharded.py                    # ~97M-parameter Llama
    python benchmarks/sharded.py --methods lora galore --engines ddp fsdp2
    python benchmarks/sharded.py --methods galore --engines ddp fsdp2 --profile

Writes the markdown table to ``benchmarks/results/sharded.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sharded.md"
METHODS = ("full", "lora", "lora-fa", "lora-pro", "lora-pro-full", "galore", "golore")
ENGINES = ("ddp", "zero2", "zero3", "fsdp2", "fsdp2-sgo")
FULL = _common.ESTIMATION_FULL
QUICK = _common.ESTIMATION_QUICK
PREFIX = "SHARDED_RESULT "
PROFILE_PREFIX = "SHARDED_PROFILE "


def _method_flags(method: str) -> tuple[str, list[str]]:
    """The ``--method`` and its option flags for a benchmark method name."""
    lora = ["--lora_r", "8", "--lora_alpha", "16", "--lora_dropout", "0"]
    if method == "lora-pro-full":
        return "lora-pro", [*lora, "--pro_mode", "full"]
    if method in ("lora", "lora-fa", "lora-pro"):
        return method, lora
    if method in ("galore", "golore"):
        return method, ["--galore_rank", "64", "--update_proj_gap", "200"]
    return method, []


def _engine_flags(engine: str) -> list[str]:
    return {
        "ddp": [],
        "zero2": ["--deepspeed", "zero2"],
        "zero3": ["--deepspeed", "zero3"],
        "fsdp2": ["--fsdp", "full_shard"],
        "fsdp2-sgo": ["--fsdp", "shard_grad_op"],
    }[engine]


def engines_of(method: str) -> list[str]:
    """``ddp`` plus the sharding engines the runners accept for ``method``."""
    from loralab.runners.methods import get_method

    sharded = get_method(_method_flags(method)[0]).sharded_engines
    out = ["ddp"]
    if "deepspeed_zero" in sharded:
        out += ["zero2", "zero3"]
    if "fsdp2" in sharded:
        out += ["fsdp2", "fsdp2-sgo"]
    return out


def _state_bytes(optimizer) -> int:
    """Bytes of every tensor in the innermost optimizer's state (a DTensor: its local shard)."""
    import torch

    from loralab.core.sharding import local_tensor

    inner = optimizer
    while not (isinstance(inner, torch.optim.Optimizer) and inner.state) and hasattr(
        inner, "optimizer"
    ):
        inner = inner.optimizer
    total = 0
    for st in getattr(inner, "state", {}).values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                t = local_tensor(v)
                total += t.numel() * t.element_size()
    return total


def _innermost_optimizer(optimizer):
    """The optimizer that steps the parameters (inside accelerate's and DeepSpeed's wrappers)."""
    inner = optimizer
    while hasattr(inner, "optimizer") and inner.optimizer is not inner:
        inner = inner.optimizer
    return inner


class _StepTimer:
    """Time spent in ``optimizer.step`` (an instance attribute wrapping the bound method), per
    training step: :meth:`start` opens a step, :meth:`stop` returns the seconds it spent stepping."""

    def __init__(self, optimizer) -> None:
        self._spent = 0.0
        step = optimizer.step

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return step(*args, **kwargs)
            finally:
                self._spent += time.perf_counter() - t0

        optimizer.step = timed

    def start(self) -> None:
        self._spent = 0.0

    def stop(self) -> float:
        return self._spent


class _RssSampler:
    """The highest RSS and the highest heap in use (:func:`_common.heap_in_use_mib`) seen by a
    background thread sampling every ``period`` seconds."""

    def __init__(self, period: float = 0.002) -> None:
        import threading

        self.peak = _common.rss_mib()
        self.heap_peak = _common.heap_in_use_mib() or 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        self.peak = max(self.peak, _common.rss_mib())
        self.heap_peak = max(self.heap_peak, _common.heap_in_use_mib() or 0.0)

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self._sample()

    def stop(self) -> tuple[float, float]:
        """(peak RSS, peak heap in use), MiB."""
        self._stop.set()
        self._thread.join()
        self._sample()
        return self.peak, self.heap_peak


def _release_freed_memory() -> None:
    """Hand memory freed by the sharding back to the OS, so RSS shows what is still held."""
    import gc

    from loralab.core.host_memory import release_freed_host_memory

    gc.collect()
    release_freed_host_memory()  # not glibc: RSS may keep freed pages


def worker(
    method: str, engine_name: str, size: dict, steps: int, warmup: int, profile: bool = False
) -> None:
    """One (method, engine) run on this rank; rank 0 prints every rank's numbers."""
    import torch

    torch.set_num_threads(1)
    base_rss = _common.rss_mib()

    from loralab.core.distributed import end_process_group
    from loralab.runners.arguments import TrainArgs, parse_args
    from loralab.runners.loop.finetune import build_engine
    from loralab.runners.loop.trainer import train_step
    from loralab.runners.methods import get_method

    name, flags = _method_flags(method)
    tmp = tempfile.mkdtemp(prefix="sharded-bench-")
    args = parse_args(
        TrainArgs,
        ["--model_name_or_path", "random-llama", "--output_dir", tmp, "--method", name,
         "--learning_rate", "1e-4", "--adam_epsilon", "1e-4", "--max_steps", str(steps + warmup),
         "--per_device_train_batch_size", str(size["batch_size"]), "--max_grad_norm", "0",
         "--disable_tqdm", "true", *flags, *_engine_flags(engine_name)],
    )  # fmt: skip
    args.task_type = "CAUSAL_LM"
    args.progress = False
    engine = build_engine(args, size["hidden_size"])
    imported_rss = _common.rss_mib()
    imported_heap = _common.heap_in_use_mib() or 0.0
    model, batches = _common.llama_and_batches(size)
    # every rank draws its own half of the global batch
    batches = [
        {k: v[engine.rank :: engine.world_size] if v.shape[0] > 1 else v for k, v in b.items()}
        for b in batches
    ]
    method_obj = get_method(name)
    setup = method_obj.setup(model, args, None, resume=False, shard=engine.shard)
    model, optimizer = engine.prepare(setup.model, setup.optimizer, setup.scheduler)
    model.train()
    _release_freed_memory()
    timer = _StepTimer(_innermost_optimizer(optimizer))
    sampler = _RssSampler()
    times, opt_times = [], []
    profiled = warmup if profile else None  # this step runs under the profiler, untimed
    for step in range(warmup + steps + int(profile)):
        batch = {k: v.to(engine.device) for k, v in batches[step % len(batches)].items()}
        timer.start()
        t0 = time.perf_counter()
        with _profiled(step == profiled, engine.rank == 0, f"{method} {engine_name}"):
            out = train_step(
                engine, model, optimizer, setup.scheduler, [batch], step=step, method=name
            )
        if hasattr(optimizer, "zero_grad"):
            optimizer.zero_grad(set_to_none=True)
        if step >= warmup and step != profiled:
            times.append(time.perf_counter() - t0)
            opt_times.append(timer.stop())
    peak, heap_peak = sampler.stop()
    row = {
        "rank": engine.rank,
        "peak_mib": peak - imported_rss,
        "heap_peak_mib": heap_peak - imported_heap,
        "state_bytes": _state_bytes(optimizer),
        "step_s": statistics.median(times),
        "opt_step_s": statistics.median(opt_times),
        "loss": out.loss,
        "import_mib": imported_rss - base_rss,
    }
    rows = engine.gather_object([row])
    if engine.is_main:
        print(PREFIX + json.dumps({"method": method, "engine": engine_name, "ranks": rows}))
    engine.end()
    end_process_group()  # not left to the interpreter's exit


def _profiled(on: bool, printer: bool, title: str):
    """A ``torch.profiler`` over the block when ``on``; ``printer``: this rank prints the table."""
    import contextlib

    if not on:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def run():
        import torch
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield
        if printer:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            print(f"{PROFILE_PREFIX}{title}: one step, rank 0 (torch {torch.__version__})\n{table}")

    return run()


# glibc's tunables that keep freed memory in the process: no block is mmap()ed (so none is unmapped
# at free), and the heap's top is trimmed only above 64 GiB
KEEP_FREED_MEMORY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 * 2**30)}


def _launch(
    method: str,
    engine: str,
    quick: bool,
    steps: int,
    warmup: int,
    port: int,
    profile: bool = False,
    keep_freed_memory: bool = False,
) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(port), __file__, "--worker", method, engine, "--steps", str(steps), "--warmup",
           str(warmup), *(["--quick"] if quick else []), *(["--profile"] if profile else [])]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if keep_freed_memory:
        env.update(KEEP_FREED_MEMORY)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if profile:
        start = proc.stdout.find(PROFILE_PREFIX)
        if start >= 0:  # the table runs up to the result line
            end = proc.stdout.find(PREFIX, start + len(PROFILE_PREFIX))
            print(proc.stdout[start + len(PROFILE_PREFIX) : end if end >= 0 else None], flush=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method} under {engine} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(PREFIX) :])


def _row(r: dict, ddp: dict) -> str:
    peak = max(x["peak_mib"] for x in r["ranks"])
    state = max(x["state_bytes"] for x in r["ranks"])
    step = max(x["step_s"] for x in r["ranks"])
    d_peak = max(x["peak_mib"] for x in ddp["ranks"])
    d_state = max(x["state_bytes"] for x in ddp["ranks"])
    d_step = max(x["step_s"] for x in ddp["ranks"])
    opt = max(x["opt_step_s"] for x in r["ranks"])
    d_opt = max(x["opt_step_s"] for x in ddp["ranks"])
    heap = max(x["heap_peak_mib"] for x in r["ranks"])
    d_heap = max(x["heap_peak_mib"] for x in ddp["ranks"])
    state_ratio = f"{state / d_state:.2f}" if d_state else "—"
    # off glibc there is no mallinfo2: no heap figures
    heap_cells = f"{heap:.0f} | {heap / d_heap:.2f}" if d_heap > 0 else "— | —"
    return (
        f"| {r['method']} | {r['engine']} | {peak:.0f} | {peak / d_peak:.2f} | {heap_cells} | "
        f"{state / 2**20:.1f} | "
        f"{state_ratio} | {step:.2f} | {step / d_step:.2f} | {opt:.2f} | {opt / d_opt:.2f} | "
        f"{step - opt:.2f} | {r['ranks'][0]['loss']:.4f} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="small Llama instead of ~97M parameters"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--steps", type=int, default=3, help="timed steps (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print rank 0's most expensive operators over one extra step of each run",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action="store_true",
        help="run the ranks with glibc keeping freed memory (no per-step page faults on large "
        "temporaries; the RSS peak column then includes memory held free)",
    )
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.worker:
        worker(args.worker[0], args.worker[1], size, args.steps, args.warmup, args.profile)
        return 0

    lines = [
        "## sharded engines: per-rank memory, optimizer state and step time vs DDP (2 CPU ranks)",
        "",
        f"Random Llama ({size['hidden_size']} x {size['num_hidden_layers']} layers, vocab "
        f"{size['vocab_size']}), global batch {size['batch_size']}x{size['seq_len']} tokens split over 2 ranks "
        f"(gloo, one torch thread each), fp32, {args.warmup} warm-up + {args.steps} timed steps; the runners' "
        "engines and methods (`Method.setup`, `train_step`). peak = the rank's highest RSS during training "
        "(sampled every 2 ms) minus its RSS after the imports (the worst rank); in use = the same for the bytes the C allocator has "
        "handed out and not freed (glibc's `mallinfo2`: the live tensors, without the free chunks a heap keeps between them); state = tensors in the optimizer's state on that rank (a DTensor: its "
        "shard); step = median step time of the slowest rank; opt. step = the part of a step inside the "
        "innermost optimizer's `step` (median, slowest rank), the rest = step − opt. step: the engine's "
        "forward, backward and gradient reduction. Ratios to the method's DDP run.",
        "",
        "| method | engine | peak (MiB) | peak / DDP | in use (MiB) | in use / DDP | state (MiB) "
        "| state / DDP | step (s) | step / DDP | opt. step (s) | opt. step / DDP | rest (s) "
        "| loss (last step) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    port = 29700
    missing = []
    for method in args.methods:
        engines = [e for e in engines_of(method) if e in args.engines]
        missing += [f"{method} × {e}" for e in args.engines if e not in engines]
        results = {}
        failed = {}
        for e in engines:
            port += 1
            try:
                results[e] = _launch(
                    method,
                    e,
                    args.quick,
                    args.steps,
                    args.warmup,
                    port,
                    args.profile,
                    args.keep_freed_memory,
                )
            except RuntimeError as err:  # one failing cell must not lose the others' numbers
                failed[e] = str(err).strip().splitlines()[-1][:200]
            print(f"{method} {e}: {'FAILED' if e in failed else 'done'}", flush=True)
        ddp = results.get("ddp")
        for e in engines:
            if e in failed or ddp is None:
                why = failed.get(e, "no DDP run to compare with")
                lines.append(f"| {method} | {e} | failed: {why} | | | | | | | | | | | |")
            else:
                lines.append(_row(results[e], ddp))
    cmd = "python benchmarks/sharded.py" + (" --quick" if args.quick else "")
    if args.methods != list(METHODS):
        cmd += " --methods " + " ".join(args.methods)
    if args.engines != list(ENGINES):
        cmd += " --engines " + " ".join(args.engines)
    if args.profile:
        cmd += " --profile"
    if args.keep_freed_memory:
        cmd += " --keep-freed-memory"
    if args.out != RESULTS:
        cmd += f" --out {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
    lines += [
        "",
        _common.command_footer(cmd) + " Peak memory is reliable on a shared machine; "
        "step times are indicative when the load average exceeds the 2 cores.",
        "",
        *(
            [
                "Run with `--keep-freed-memory` (glibc keeps freed memory in each rank: "
                + ", ".join(f"`{k}={v}`" for k, v in KEEP_FREED_MEMORY.items())
                + "): the peak (RSS) column includes memory held free; in use does not.",
                "",
            ]
            if args.keep_freed_memory
            else []
        ),
        "Not run (the runners refuse the engine for the method at the time of this run): "
        + (", ".join(missing) if missing else "none")
        + ". DeepSpeed keeps fp32 master partitions of the trainable parameters besides the optimizer's "
        "state; they are in the peak, not in the state column.",
        "",
    ]
    _common.write_results(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
