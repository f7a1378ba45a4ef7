"""Benchmark: extra memory and wall time of the whole LoRA-GA init, loralab vs PEFT.

"Whole init" = gradient estimate + per-layer SVD + A/B + offset W0, on the same random Llama, the
same batches and the same LoRA config (r=8, all-linear targets, stable scale). Two shapes: a
wide-vocabulary small Llama (~29M parameters, 16 x 256, vocab 32000: the head's logits dominate
the activations) and a ~97M one (12 x 768, vocab 8000). Each mode runs in its own fresh process:

- ``baseline``: the *no-gradient baseline*: the same forward and backward passes over the same
  batches (eval mode, as the estimate) with **no** parameter requiring grad; a forward hook makes the
  input embeddings' output a leaf that requires grad, so ``loss.backward()`` runs through the whole
  model (every activation gradient, autograd's saved activations of one batch) and computes no
  weight gradient. No LoRA layer, no SVD. What any gradient estimate needs at least;
- ``peft``: PEFT's ``preprocess_loraga(model, config, train_step)`` (a ``train_step`` callback over
  the batches; PEFT keeps ``weight.grad`` of every target) then ``get_peft_model``;
- ``loralab``: ``get_lora_ga_model(model, config, batches)``, the plain path. On these models it runs
  block by block in place (core's ``blockwise`` default): the boundary hidden states of every batch
  are recorded, then each block's backward runs over all batches and its gradients are finished and
  turned into factors, so at most one block's float32 sums exist;
- ``loralab+hooks``: the same with core's hook path forced (``estimate_gradients(blockwise=False)``,
  patched into ``loralab.core.adapter_gradients``, checked to be called): every target's sum exists
  until the last batch;
- ``loralab+offload``: ``offload=True`` (block-wise with the weights on the CPU, one block on the
  compute device; on a CPU-only run the same algorithm as ``loralab``);
- ``seed``: the seed's API, ``estimate_gradient`` (returns every gradient, as the seed does) then
  ``with LoraGAContext(...): peft.get_peft_model(...)``;
- ``--fsdp2`` runs instead ``loralab`` (the one-process reference) and two FSDP2 modes (2 gloo ranks,
  ``torch.distributed.run``): ``get_lora_ga_model(..., shard=fully_shard_model)`` on the same global
  batches, each rank reading its half of every batch's sequences; the estimate runs on the sharded
  model (block by block: each rank sums its rows of one block's gradients at a time). Memory is
  measured from the moment the model is sharded (see the table's note), with a per-rank breakdown:
  RSS after the imports and the process group, RSS once sharded, the most bytes autograd saved for
  backward at once, the most float32 row sums held at once, every live CPU tensor when the first
  layer is gathered, and the memory glibc malloc still holds after the init (RSS before minus after
  ``malloc_trim(0)``). ``fsdp2`` runs with the default allocator settings (as every other mode);
  ``fsdp2+malloc`` with ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1048576``, to show how much of the
  peak is freed memory the allocator keeps (a rank's half batch makes many tensors just under 1 MiB).

Memory. Each process builds the model and batches, returns freed heap to the system and resets its
peak RSS (``_common.reset_peak_rss``), then runs the init: Δ = peak RSS − RSS right before the init.
*Extra* = Δ(mode) − Δ(baseline): the init's memory above the same passes without weight gradients
(negative: below them, e.g. a block-wise order keeps one block's autograd graph, not the model's).
The targets: extra ≤ 0.5× PEFT's on every path, ≤ 0.2× with offload; under FSDP2, each rank's peak
RSS ≤ 0.6× the one-process ``loralab`` peak (both absolute: process, model or shard, and init; also
shown, not the target: each peak above its own process's RSS after imports).
On a CUDA device (``--device cuda``) the model lives on the GPU (offload: on the CPU, one block at a
time on the GPU) and the GPU's ``max_memory_allocated`` is reported too; ``--fsdp2`` is CPU-only.

Results are compared: our modes' A, B, W0 must agree to float32 rounding; PEFT's factors differ by
definition (PEFT scales B by the singular values and leaves A unscaled, see
packages/lora-ga/README.md), so its A rows and B columns are compared with ours after normalising,
as |cos| (1 = same vector up to sign; both use a randomized SVD).

Usage::

    python benchmarks/lora_ga_init.py --quick   # small shapes, under a minute per mode
    python benchmarks/lora_ga_init.py           # ~29M wide-vocabulary and ~97M Llamas
    python benchmarks/lora_ga_init.py --fsdp2   # the FSDP2 per-rank measurement

Writes the markdown tables to ``benchmarks/results/lora_ga.md`` (``--fsdp2``: ``lora_ga_fsdp.md``).
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
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "lora_ga.md"
RESULTS_FSDP = ROOT / "benchmarks" / "results" / "lora_ga_fsdp.md"
FSDP_MODES = ("loralab", "fsdp2", "fsdp2+malloc")  # --fsdp2: the one-process reference, then FSDP2
MODES = ("baseline", "peft", "loralab", "loralab+hooks", "loralab+offload", "seed")
RANK = 8
SHAPES = {  # name: (full size, --quick size)
    "wide": (_common.ESTIMATION_WIDE, _common.ESTIMATION_WIDE_QUICK),
    "97M": (_common.ESTIMATION_FULL, _common.ESTIMATION_QUICK),
}
FSDP_PREFIX = "FSDP2RESULT "
# fsdp2+malloc: glibc malloc returns freed memory (one arena, every block of >= 1 MiB its own mapping);
# each rank's half batch makes many hidden states of just under 1 MiB, which the default settings
# keep in fragmented heaps after they are freed (see the results' breakdown)
MALLOC_RETURNS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}


def _factors(pm) -> dict:
    from loralab.core.sharding import whole

    factors = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in mod.lora_A:
            factors[name] = {
                k: whole(p.detach()).float().cpu().clone()
                for k, p in (
                    ("A", mod.lora_A["default"].weight),
                    ("B", mod.lora_B["default"].weight),
                    ("W0", mod.get_base_layer().weight),
                )
            }
    return factors


def worker(mode: str, size: dict, threads: int, device: str, out_file: str) -> dict:
    """Run one mode in this (fresh) process; save the factors to ``out_file``; return the measurements."""
    import gc

    import torch

    torch.set_num_threads(threads)
    import peft

    import loralab.core.adapter_gradients as adapter_gradients
    from loralab.core.gradients import estimate_gradients
    from loralab.core.targets import find_all_linear_modules
    from loralab.lora_ga import LoraGAConfig, LoraGAContext, estimate_gradient, get_lora_ga_model

    rss_import = _common.rss_mib()  # the process with its libraries, before any model exists
    model, batches = _common.llama_and_batches(size)
    targets = find_all_linear_modules(model)
    cuda = device == "cuda"
    if cuda and mode != "loralab+offload":
        model.to("cuda")
        batches = [{k: v.to("cuda") for k, v in b.items()} for b in batches]
    cfg = dict(r=RANK, lora_alpha=2 * RANK, target_modules=targets)
    params = sum(p.numel() for p in model.parameters())

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gpu_before = torch.cuda.memory_allocated() if cuda else 0
    reset = _common.reset_peak_rss()
    rss_before = _common.rss_mib()
    t0 = time.perf_counter()
    pm = None
    if mode == "baseline":
        model.eval()
        model.requires_grad_(False)

        def leaf(module, args, output):  # the embeddings' output: the only tensor requiring grad
            return output.detach().requires_grad_(True)

        handle = model.get_input_embeddings().register_forward_hook(leaf)
        with torch.enable_grad():
            for b in batches:
                model(**b).loss.backward()
        handle.remove()
        assert all(p.grad is None for p in model.parameters())
    elif mode == "peft":
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
    elif mode == "loralab+hooks":
        forced = []  # the patch must be where get_lora_ga_model's estimate is called, or it is void

        def hooks_path(*args, **kwargs):
            forced.append(True)
            return estimate_gradients(*args, **{**kwargs, "blockwise": False})

        adapter_gradients.estimate_gradients = hooks_path
        pm = get_lora_ga_model(model, LoraGAConfig(**cfg), batches, progress=False)
        if not forced:
            raise RuntimeError(
                "loralab+hooks: get_lora_ga_model did not estimate through "
                "loralab.core.adapter_gradients.estimate_gradients; patch where it does now"
            )
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
    factors = _factors(pm) if pm is not None else {}
    torch.save(factors, out_file)
    return {
        "mode": mode,
        "params": params,
        "layers": len(factors),
        "peak_reset": reset,
        "rss_import_mib": rss_import,
        "rss_before_mib": rss_before,
        "peak_mib": peak,
        "gpu_extra_mib": gpu_peak,
        "time_s": elapsed,
    }


def fsdp2_worker(size: dict, threads: int, out_file: str) -> None:
    """One rank of the ``fsdp2`` mode (under ``torch.distributed.run``, gloo): rank 0 prints both
    ranks' measurements on one line and saves the whole factors."""
    import gc

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    import loralab.core.gradients as core_gradients
    import loralab.core.offload as core_offload
    from loralab.core.distributed import end_process_group
    from loralab.core.targets import find_all_linear_modules
    from loralab.core.testing import fully_shard_model, gradient_sums_peak
    from loralab.lora_ga import LoraGAConfig, get_lora_ga_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rss_import = _common.rss_mib()  # libraries and the process group, before any model exists
    model, batches = _common.llama_and_batches(size)
    # the same global batches as one process: each rank reads its share of every batch's sequences
    local = [{k: v[rank::world] for k, v in b.items()} for b in batches]
    del batches
    cfg = LoraGAConfig(r=RANK, lora_alpha=2 * RANK, target_modules=find_all_linear_modules(model))
    params = sum(p.numel() for p in model.parameters())
    gc.collect()
    dist.barrier()
    rss_whole = _common.rss_mib()  # the whole random model, built on every rank
    sharded: dict = {}

    def shard(peft_model):
        # A real FSDP2 run loads the model sharded and never holds it whole on a rank; here every
        # rank built the whole random model, so the measurement starts once it is sharded: freed
        # memory back to the system, peak RSS reset, then the estimate, SVD and writes.
        fully_shard_model(peft_model)
        gc.collect()
        sharded["reset"] = _common.reset_peak_rss()
        sharded["rss"] = _common.rss_mib()
        sharded["t0"] = time.perf_counter()
        return peft_model

    # Breakdown, measured when the first layer's rows are gathered (the block-wise order: the last
    # block's backward has run over every batch; the hook path: every batch's backward has run):
    # every live CPU tensor (shards, the sums, the recorded boundary activations) and the RSS.
    gather = core_offload.gather_rows

    def measured_gather(like, rows):
        if "live_mib" not in sharded:
            sharded["live_mib"] = _live_cpu_tensors_mib()
            sharded["rss_finish"] = _common.rss_mib()
        return gather(like, rows)

    core_offload.gather_rows = core_gradients.gather_rows = measured_gather

    with _saved_for_backward_peak() as saved, gradient_sums_peak() as sums:
        pm = get_lora_ga_model(model, cfg, local, progress=False, shard=shard)
    sharded["saved_mib"] = saved["peak"] / 2**20
    sharded["sums_mib"] = sums["peak"] * 4 / 2**20  # float32 rows
    sharded["sums_layers"] = sums["peak_layers"]
    elapsed = time.perf_counter() - sharded["t0"]
    peak = _common.peak_rss_mib()
    core_offload.gather_rows = core_gradients.gather_rows = gather
    rss_end = _common.rss_mib()
    gc.collect()
    _common.reset_peak_rss()  # malloc_trim(0): the freed memory the allocator still held
    row = {
        "rank": rank,
        "params": params,
        "peak_reset": sharded["reset"],
        "rss_import_mib": rss_import,
        "rss_whole_mib": rss_whole,
        "rss_before_mib": sharded["rss"],
        "sums_mib": sharded["sums_mib"],
        "sums_layers": sharded["sums_layers"],
        "saved_mib": sharded["saved_mib"],
        "live_at_finish_mib": sharded["live_mib"],
        "rss_finish_mib": sharded["rss_finish"],
        "rss_end_mib": rss_end,
        "rss_end_trimmed_mib": _common.rss_mib(),
        "peak_mib": peak,
        "time_s": elapsed,
    }
    rows: list = [None] * world
    dist.all_gather_object(rows, row)
    factors = _factors(pm)  # collective: gathered whole on every rank
    if rank == 0:
        torch.save(factors, out_file)
        print(FSDP_PREFIX + json.dumps({"mode": "fsdp2", "ranks": rows}), flush=True)
    end_process_group()  # not left to the interpreter's exit


@contextmanager
def _saved_for_backward_peak():
    """While open: the most bytes autograd holds at once for backward passes (distinct storages;
    parameters and views of them excluded: FSDP2 frees its gathered weights itself). Each saved
    tensor is held through a small object whose release (autograd frees it after the backward, or
    with its graph) takes its bytes off the count."""
    import torch

    seen = {"peak": 0}
    live: dict[int, list] = {}  # storage pointer -> [bytes, holders]

    class Held:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t
            self.key = None
            if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
                return
            st = getattr(t, "_local_tensor", t).untyped_storage()
            self.key = st.data_ptr()
            entry = live.setdefault(self.key, [st.nbytes(), 0])
            entry[1] += 1
            seen["peak"] = max(seen["peak"], sum(e[0] for e in live.values()))

        def __del__(self) -> None:
            entry = live.get(self.key) if self.key is not None else None
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del live[self.key]

    with torch.autograd.graph.saved_tensors_hooks(Held, lambda h: h.t):
        yield seen


def _live_cpu_tensors_mib() -> float:
    """Bytes of the distinct CPU storages of every tensor the garbage collector tracks (a DTensor
    counts as its local shard), in MiB: the memory tensors really hold, whatever the allocator keeps."""
    import gc

    import torch

    storages = {}
    for obj in gc.get_objects():
        if not isinstance(obj, torch.Tensor):
            continue
        t = getattr(obj, "_local_tensor", obj)
        if t.device.type == "cpu" and t.layout == torch.strided:
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return sum(storages.values()) / 2**20


def _run_mode(mode: str, shape: str, quick: bool, threads: int, device: str, out_file: str) -> dict:
    args = [__file__, "--worker", mode, "--shape", shape, "--threads", str(threads)]
    args += ["--device", device, "--factors", out_file] + (["--quick"] if quick else [])
    env = {"OMP_NUM_THREADS": str(threads)}
    if mode.startswith("fsdp2"):
        if mode == "fsdp2+malloc":
            env |= MALLOC_RETURNS
        args = ["-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port"]
        args += [str(_free_port()), __file__, "--worker", "fsdp2", "--shape", shape]
        args += ["--threads", str(threads), "--factors", out_file] + (["--quick"] if quick else [])
        row = _common.run_in_subprocess(
            args, label=f"{shape} mode {mode}", env=env, result_prefix=FSDP_PREFIX
        )
        return {**row, "mode": mode}
    return _common.run_in_subprocess(args, label=f"{shape} mode {mode}", env=env)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _shape_section(shape: str, size: dict, rows: list, factors: dict, args) -> tuple[list, list]:
    """The markdown table of one shape and the verdict lines of its targets."""
    by_mode = {r["mode"]: r for r in rows}
    delta = {m: r["peak_mib"] - r["rss_before_mib"] for m, r in by_mode.items() if "ranks" not in r}
    extra = {m: d - delta["baseline"] for m, d in delta.items()}
    peft_extra = extra["peft"]
    cuda = args.device == "cuda"
    base = by_mode["baseline"]
    n_layers = by_mode["peft"]["layers"]
    lines = [
        f"### {shape}: random Llama, {base['params'] / 1e6:.1f}M parameters "
        f"({size['num_hidden_layers']} x {size['hidden_size']}, vocab {size['vocab_size']})",
        "",
        f"LoRA r={RANK} on all {n_layers} linear layers (all-linear), {size['batches']} batches of "
        f"{size['batch_size']}x{size['seq_len']} tokens, fp32, {args.threads} torch threads.",
        "",
        "| mode | time (s) | peak RSS (MiB) | Δ (MiB) | extra = Δ − Δ baseline (MiB) | extra / PEFT's |"
        + (
            " GPU peak above the start (MiB) | GPU extra = that − baseline's (MiB) | GPU extra / PEFT's |"
            if cuda
            else ""
        )
        + " A, B, W0 vs `loralab` (max rel.) | A/B vs PEFT, \\|cos\\| median / min |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if cuda else "") + "---:|---:|",
    ]
    # on a GPU the init's memory is the device's: its peak above the baseline's, the same passes
    # without weight gradients (the host RSS of a GPU run holds offload's CPU-resident weights by design)
    gextra = (
        {
            m: r["gpu_extra_mib"] - base["gpu_extra_mib"]
            for m, r in by_mode.items()
            if "ranks" not in r
        }
        if cuda
        else {}
    )
    for m in [r["mode"] for r in rows if "ranks" not in r]:
        r = by_mode[m]
        if m == "baseline":
            diff, cosines = "—", "—"
        else:
            diff = (
                "(PEFT's definition)"
                if m == "peft"
                else f"{_compare(factors['loralab'], factors[m]):.1e}"
            )
            med, mn = _cos_vs_peft(factors[m], factors["peft"])
            cosines = f"{med:.4f} / {mn:.4f}"
        ratio = "—" if m == "baseline" else f"{extra[m] / peft_extra:.2f}"
        gratio = "—" if m == "baseline" or not cuda else f"{gextra[m] / gextra['peft']:.2f}"
        gpu = f" {r['gpu_extra_mib']:.0f} | {gextra[m]:.0f} | {gratio} |" if cuda else ""
        lines.append(
            f"| {m} | {r['time_s']:.1f} | {r['peak_mib']:.0f} | {delta[m]:.0f} | {extra[m]:.0f} | "
            f"{ratio} |{gpu} {diff} | {cosines} |"
        )
    verdicts = []
    for m, target in (
        ("loralab", 0.5),
        ("loralab+offload", 0.2),
    ):
        if cuda:
            ratio = gextra[m] / gextra["peft"]
            verdicts.append(
                f"- {shape}, `{m}`: GPU extra {gextra[m]:.0f} MiB = {ratio:.2f}× PEFT's {gextra['peft']:.0f} MiB "
                f"(target ≤ {target}×): **{'met' if ratio <= target else 'NOT met'}** (host RSS extra, not the "
                f"target on a GPU: {extra[m]:.0f} MiB vs PEFT's {peft_extra:.0f})"
            )
            continue
        ratio = extra[m] / peft_extra
        verdicts.append(
            f"- {shape}, `{m}`: extra {extra[m]:.0f} MiB = {ratio:.2f}× PEFT's {peft_extra:.0f} MiB "
            f"(target ≤ {target}×): **{'met' if ratio <= target else 'NOT met'}**"
        )
    return lines, verdicts


def _fsdp_section(shape: str, size: dict, rows: list, factors: dict) -> tuple[list, list]:
    """The FSDP2 table of one shape (``--fsdp2``) and its target's verdict lines."""
    by_mode = {r["mode"]: r for r in rows}
    one = by_mode["loralab"]
    lines = [
        f"### {shape}: random Llama, {one['params'] / 1e6:.1f}M parameters "
        f"({size['num_hidden_layers']} x {size['hidden_size']}, vocab {size['vocab_size']})",
    ]
    verdicts = []
    one_above = one["peak_mib"] - one["rss_import_mib"]
    fsdp_modes = [m for m in ("fsdp2", "fsdp2+malloc") if m in by_mode]
    agree = ", ".join(f"`{m}` {_compare(factors['loralab'], factors[m]):.1e}" for m in fsdp_modes)
    lines += [
        "",
        f"FSDP2, 2 gloo ranks on this machine, the same {size['batches']} global batches (each rank "
        f"{size['batch_size'] // 2}x{size['seq_len']} of each): `get_lora_ga_model(..., shard=fully_shard_model)` "
        "(core's block-wise order on the sharded model: each block alone over every batch, its rows summed, "
        "gathered and handed to the SVD before the block before it runs), "
        f"A, B, W0 gathered vs one-process `loralab` (max rel.): {agree}. `fsdp2` runs with the default "
        "allocator settings, as the one-process modes; `fsdp2+malloc` is the same run with glibc told to "
        "return freed memory (`MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1048576`).",
        "",
        "Each rank builds the whole random model (a real run loads it sharded), so the measurement starts once "
        "`fully_shard` has run (inside `get_lora_ga_model`'s `shard` callback: freed memory returned, peak RSS "
        "reset): peak = the process, its shard of the model and the init. One-process `loralab` peak "
        f"(process, whole model, init): {one['peak_mib']:.0f} MiB, of which {one['rss_import_mib']:.0f} MiB "
        "is the process with its libraries before any model exists (*after imports*).",
        "",
        "Breakdown columns: *after imports* = RSS once the libraries are imported and the process group "
        "exists, before any model; *saved for backward* = the most bytes autograd held at once for backward "
        "passes (`saved_tensors_hooks`, each storage once, parameters excluded; block-wise: one block's "
        "activations for one batch, or the glue's for the head pass); *float32 sums at once* = the most "
        "layers whose float32 row sums existed at the same time and their size "
        "(`loralab.core.testing.gradient_sums_peak`); *at the first gather* = when the first layer's rows "
        "are gathered (block-wise: the last block's backward has run over every batch): every live CPU "
        "tensor's storage (`live`: the shard, the sums, the recorded boundary activations) and the RSS; "
        "*kept by malloc at the end* = RSS after the init minus RSS after `malloc_trim(0)` (memory freed by "
        "torch but not returned by the allocator).",
        "",
        "| mode | rank | time (s) | RSS after imports (MiB) | RSS, whole model built (MiB) | RSS once sharded (MiB) "
        "| saved for backward, peak (MiB) | float32 sums at once: layers / MiB | live / RSS at the first gather (MiB) | kept by malloc at the end (MiB) | peak RSS (MiB) "
        "| Δ (MiB) | peak / one-process `loralab` peak | (peak − after imports) / one-process's |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst: dict[str, tuple[float, float]] = {}
    for m in fsdp_modes:
        for r in by_mode[m]["ranks"]:
            ratio = r["peak_mib"] / one["peak_mib"]
            above = (r["peak_mib"] - r["rss_import_mib"]) / one_above
            w = worst.get(m, (0.0, 0.0))
            worst[m] = (max(w[0], ratio), max(w[1], above))
            lines.append(
                f"| {m} | {r['rank']} | {r['time_s']:.1f} | {r['rss_import_mib']:.0f} | "
                f"{r['rss_whole_mib']:.0f} | {r['rss_before_mib']:.0f} | {r['saved_mib']:.0f} | "
                f"{r['sums_layers']} / {r['sums_mib']:.0f} | "
                f"{r['live_at_finish_mib']:.0f} / {r['rss_finish_mib']:.0f} | "
                f"{r['rss_end_mib'] - r['rss_end_trimmed_mib']:.0f} | {r['peak_mib']:.0f} | "
                f"{r['peak_mib'] - r['rss_before_mib']:.0f} | {ratio:.2f} | {above:.2f} |"
            )
    floor = max(r["rss_before_mib"] for r in by_mode["fsdp2"]["ranks"]) / one["peak_mib"]
    ratio, above = worst["fsdp2"]
    verdicts.append(
        f"- {shape}, FSDP2: largest per-rank peak RSS = {ratio:.2f}× the one-process `loralab` peak "
        f"({one['peak_mib']:.0f} MiB) (target ≤ 0.6×): **{'met' if ratio <= 0.6 else 'NOT met'}**; "
        f"before the init starts a rank already holds {floor:.2f}× (process, libraries, process group, shard)"
    )
    for m, (ratio, above) in worst.items():
        verdicts.append(
            f"  - not the target, for reading it: `{m}` per-rank peak {ratio:.2f}× the one-process peak; "
            f"peak above each process's own RSS after imports: {above:.2f}× the one-process `loralab`'s "
            f"({one_above:.0f} MiB)"
        )
    return lines, verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds per mode)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2)")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="compute device (default cpu)"
    )
    parser.add_argument(
        "--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES), help="shapes to run"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="modes of one shape run at the same time (default 1; peak RSS is per process, so memory "
        "figures do not depend on it, times do)",
    )
    parser.add_argument("--worker", choices=(*MODES, "fsdp2"), help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=list(SHAPES), help=argparse.SUPPRESS)
    parser.add_argument("--factors", help=argparse.SUPPRESS)
    parser.add_argument(
        "--fsdp2",
        action="store_true",
        help="the FSDP2 runs instead (2 gloo ranks, per-rank peak vs one-process `loralab`, CPU only); "
        f"written to {RESULTS_FSDP.relative_to(ROOT)}",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown file to write (default: see --fsdp2)"
    )
    args = parser.parse_args(argv)
    if args.worker:
        size = SHAPES[args.shape][1 if args.quick else 0]
        if args.worker == "fsdp2":
            fsdp2_worker(size, args.threads, args.factors)
        else:
            print(json.dumps(worker(args.worker, size, args.threads, args.device, args.factors)))
        return 0

    import torch

    cuda = args.device == "cuda"
    if args.fsdp2 and cuda:
        parser.error("--fsdp2 runs on the CPU (gloo); drop --device cuda")
    modes = FSDP_MODES if args.fsdp2 else MODES
    sections, verdicts, resets = [], [], set()
    for shape in args.shapes:
        size = SHAPES[shape][1 if args.quick else 0]
        with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.jobs) as pool:
            rows, factors = [], {}
            paths = {m: os.path.join(tmp, f"{m.replace('+', '_')}.pt") for m in modes}
            futures = {
                m: pool.submit(_run_mode, m, shape, args.quick, args.threads, args.device, paths[m])
                for m in modes
            }
            for m in modes:
                rows.append(futures[m].result())
                factors[m] = torch.load(paths[m], weights_only=True)
                r = rows[-1]
                if m.startswith("fsdp2"):
                    resets |= {x["peak_reset"] for x in r["ranks"]}
                    peaks = ", ".join(f"{x['peak_mib']:.0f}" for x in r["ranks"])
                    print(f"{shape} {m}: peaks {peaks} MiB", file=sys.stderr)
                else:
                    resets.add(r["peak_reset"])
                    print(
                        f"{shape} {m}: {r['time_s']:.1f} s, peak {r['peak_mib']:.0f} MiB, "
                        f"Δ {r['peak_mib'] - r['rss_before_mib']:.0f} MiB",
                        file=sys.stderr,
                    )
        if args.fsdp2:
            lines, v = _fsdp_section(shape, size, rows, factors)
        else:
            lines, v = _shape_section(shape, size, rows, factors, args)
        sections += [*lines, ""]
        verdicts += v
    cmd = (
        "python benchmarks/lora_ga_init.py"
        + (" --quick" if args.quick else "")
        + (" --device cuda" if cuda else "")
        + (" --fsdp2" if args.fsdp2 else "")
        + (f" --shapes {' '.join(args.shapes)}" if args.shapes != list(SHAPES) else "")
        + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    )
    peak_note = (
        "peak RSS reset right before the init (`/proc/self/clear_refs`)"
        if resets == {True}
        else "peak RSS since process start (the reset was not available)"
    )
    if args.fsdp2:
        intro = [
            "## lora-ga: whole LoRA-GA init under FSDP2 — per-rank peak memory vs one process (cpu)",
            "",
            "The same init (estimate + SVD + offset), models, batches and LoRA config as the lora-ga CPU section (`lora_ga.md`), "
            "measured per rank of a 2-process FSDP2 run and against one process's `loralab` (its plain path, "
            f"block by block), re-measured in this run ({peak_note}).",
        ]
    else:
        intro = [
            f"## lora-ga: whole LoRA-GA init (estimate + SVD + offset) — extra memory vs PEFT ({args.device})",
            "",
            "Each mode in a fresh process, on the same model, batches and LoRA config. Δ = the process's peak RSS minus its "
            f"RSS right before the init ({peak_note}); *extra* = Δ − Δ of `baseline`, the same forward/backward passes over "
            "the same batches with no weight gradient (the embeddings' output is the only tensor requiring grad). Modes: "
            "`loralab` = `get_lora_ga_model` (its plain path streams block by block on these models), `loralab+hooks` = the "
            "same with core's hook path forced (`blockwise=False`), `loralab+offload` = `offload=True`, `seed` = the seed's "
            "`estimate_gradient` + `LoraGAContext` (returns every gradient by design), `peft` = PEFT's "
            "`preprocess_loraga`. FSDP2: `--fsdp2`, its own section.",
        ]
    lines = [
        *intro,
        "",
        *sections,
        "Targets:",
        "",
        *verdicts,
        "",
        f"Command: `{cmd}`. Machine: {_common.machine_description(args.device)} ({platform.python_implementation()} "
        f"{platform.python_version()}); {_common.load_average_note()}"
        + (
            " — the machine was shared with other jobs while this ran"
            + (f", and {args.jobs} modes ran at a time" if args.jobs > 1 else "")
            + ", so times are indicative only (peak RSS is per process and not affected; no swap)"
            if not cuda
            else ""
        )
        + f". Date: {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
    ]
    out = args.out or (RESULTS_FSDP if args.fsdp2 else RESULTS)
    _common.write_results(out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
