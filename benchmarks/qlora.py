"""QLoRA: peak host memory of a training step on a 4-bit (NF4) base vs a 32-bit base, per method.

The runners' own path for each configuration, in a fresh process: ``from_pretrained`` with
``loralab.runners.quantization`` (``BitsAndBytesConfig(load_in_4bit=True, nf4)`` and PEFT's k-bit
preparation) or in float32, the method registry's setup (LoRA-GA / LoRA-SB estimate on a float copy of
the checkpoint when the base is 4-bit), then two training steps (forward, backward, optimizer step) on
one sequence. Reported: RSS after the imports (the process's floor), peak RSS of the setup (LoRA-GA /
LoRA-SB: includes their gradient estimate) and of the two steps (``/proc/self/status`` VmHWM, reset
before the steps), and ``model + step`` = step peak minus the floor, with its 4-bit / 32-bit ratio.

Run: ``python benchmarks/qlora.py [--quick] [--only lora lora-ga ...] [--results FILE]``; writes
``benchmarks/results/qlora.md``. The random Llama has ~106M parameters (``--quick``: ~7M).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "qlora.md"

FULL = dict(hidden=768, inter=2048, layers=8, vocab=32000, seq=256, rank=8)
QUICK = dict(hidden=256, inter=688, layers=4, vocab=8000, seq=128, rank=8)
METHODS = ("lora", "lora-fa", "lora-pro", "lora-sb", "lora-ga")
BASES = ("fp32", "nf4")
QUICK_NOTE = (
    "Reading (`--quick`): the ratios are about 1.0 and say nothing about a large model. The quick "
    "model's quantizable weights are small (3.1M decoder-linear parameters: 12 MiB in fp32, ~1.7 MiB in "
    "NF4, a ~10 MiB difference) next to what 'model + step' also counts: the float32 embeddings, "
    "head, optimizer state and activations, which a 4-bit base does not shrink. See the ~106M run."
)

CPU_NOTE = (
    "Reading (CPU build of bitsandbytes): a 4-bit base does NOT lower the host memory of a training "
    "step here. On the ~106M model (2026-12-02: 'model + step' NF4 / fp32 = 1.04 for lora and lora-fa, "
    "1.12 for lora-pro and lora-sb, 1.19 for lora-ga) the ~190 MiB that NF4 saves on the decoder's "
    "linear weights is spent again during the step, and the load peaks higher (the float checkpoint "
    "is read whole before it is quantized). Where it goes was not isolated (bitsandbytes' CPU kernels "
    "dequantize each weight to a float32 temporary per matmul, and its autograd function keeps "
    "its own state, which saved-tensor hooks do not see). QLoRA's memory saving is a GPU claim: "
    "re-run this script on a GPU machine (allocated device memory) before quoting it; none was lent."
)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS


def worker(cfg: dict, path: str, method: str, base: str) -> dict:
    # everything the run imports is imported before the floor is read, so that 'model + step' counts
    # the model, adapters, optimizer state and activations, not library code
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama  # noqa: F401

    from loralab.core.quant import dtype_kwarg
    from loralab.runners.methods import get_method, method_args
    from loralab.runners.quantization import (
        bnb_config,
        prepare_quantized_model,
        quantized_load_kwargs,
    )

    get_method(method).import_package()
    floor = _kib("VmRSS")
    args = method_args(method, lora_r=cfg["rank"], max_steps=10, learning_rate=1e-4, progress=False)
    if method == "lora-ga":
        args.ga_iters = 2
    if method == "lora-sb":
        args.sb_num_batches = 2
    args.load_in_4bit, args.load_in_8bit, args.method = base == "nf4", False, method
    for name in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype"):
        setattr(args, name, None)
    qcfg = bnb_config(args)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg["vocab"], (1, cfg["seq"]), generator=gen)
    batches = [{"input_ids": ids, "labels": ids}] * 2
    _reset_peak()
    t0 = time.process_time()
    model = AutoModelForCausalLM.from_pretrained(
        path, **{dtype_kwarg(): torch.float32}, **quantized_load_kwargs(qcfg)
    )
    model = prepare_quantized_model(model)
    setup = get_method(method).setup(model, args, batches)
    setup_s = time.process_time() - t0
    setup_peak = _kib("VmHWM")
    model, opt = setup.model, setup.optimizer
    model.train()
    _reset_peak()
    before = _kib("VmRSS")
    t0 = time.process_time()
    losses = []
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    step_s = (time.process_time() - t0) / 2
    peak = _kib("VmHWM")
    return dict(
        floor_mib=floor / 1024,
        setup_peak_mib=setup_peak / 1024,
        rss_before_steps_mib=before / 1024,
        step_peak_mib=peak / 1024,
        model_and_step_mib=(peak - floor) / 1024,
        setup_cpu_s=setup_s,
        step_cpu_s=step_s,
        losses=losses,
    )


def _decoder_linear(cfg: dict) -> int:
    """Parameters of the decoder's linear layers (q, k, v, o, gate, up, down): what NF4 quantizes."""
    h, i = cfg["hidden"], cfg["inter"]
    return cfg["layers"] * (4 * h * h + 3 * h * i)


def save_model(cfg: dict, path: Path) -> int:
    model = _common.random_llama(cfg, max_position_embeddings=cfg["seq"])
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = _common.workers_parser(__doc__.split("\n\n")[0], results=RESULTS, configs="methods")
    parser.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.worker:
        method, base = args.worker.split(":")
        print("RESULT " + json.dumps(worker(cfg, args.model_dir, method, base)))
        return
    methods = args.only or list(METHODS)
    env = dict(
        OMP_NUM_THREADS=os.environ.get("BENCH_THREADS", "2"),
        # one arena and a fixed mmap threshold: freed tensors leave RSS (as lora_fa_memory.py)
        MALLOC_ARENA_MAX="1",
        MALLOC_MMAP_THRESHOLD_="1048576",
        HF_HUB_OFFLINE="1",
    )
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        n_params = save_model(cfg, Path(tmp))
        for method in methods:
            for base in BASES:
                print(f"running {method} {base} ...", flush=True)
                rows[(method, base)] = _common.run_in_subprocess(
                    [
                        __file__,
                        "--worker",
                        f"{method}:{base}",
                        "--model_dir",
                        tmp,
                        *(["--quick"] if args.quick else []),
                    ],
                    label=f"{method} {base}",
                    env=env,
                    result_prefix="RESULT ",
                )
    lines = [
        "## runners: QLoRA — peak host memory of a training step, NF4 base vs float32 base",
        "",
        f"Random Llama, {n_params / 1e6:.1f}M parameters (hidden {cfg['hidden']}, intermediate "
        f"{cfg['inter']}, {cfg['layers']} layers, vocab {cfg['vocab']}, untied embeddings), LoRA r={cfg['rank']} "
        f"on all linear layers of the decoder, one sequence of {cfg['seq']} tokens, two training steps; "
        "NF4 = `--load_in_4bit` (nf4, no double quantization, float32 compute) with PEFT's k-bit "
        "preparation, as the runners load it. Each row in its own process.",
        "",
        "| method | base | setup peak RSS (MiB) | step peak RSS (MiB) | model + step (MiB) | NF4 / fp32 | step (CPU s) | losses |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for method in methods:
        ref = rows[(method, "fp32")]["model_and_step_mib"]
        for base in BASES:
            r = rows[(method, base)]
            ratio = r["model_and_step_mib"] / ref
            lines.append(
                f"| {method} | {base} | {r['setup_peak_mib']:,.0f} | {r['step_peak_mib']:,.0f} | "
                f"{r['model_and_step_mib']:,.0f} | {ratio:.2f} | {r['step_cpu_s']:.1f} | "
                + ", ".join(f"{x:.3f}" for x in r["losses"])
                + " |"
            )
    quick = " --quick" if args.quick else ""
    lines += [
        "",
        f"Command: `python benchmarks/qlora.py{quick}`. Machine: {_common.machine_description()} "
        f"(CPython {platform.python_version()}); {_common.load_average_note()} — the machine was shared, "
        f"so CPU seconds are indicative. Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Decoder linear weights (what NF4 quantizes): {_decoder_linear(cfg) / 1e6:.1f}M parameters, "
        f"{_decoder_linear(cfg) * 4 / 2**20:,.0f} MiB in float32, ~{_decoder_linear(cfg) * 0.5 / 2**20 * 1.03:,.0f} "
        "MiB in NF4 (4 bits + one float32 absmax per 64-block); embeddings, head and norms stay float32.",
        "",
        "'model + step' = the step's peak RSS minus the process's RSS after its imports (before the "
        "model loads): the weights, the adapters, the optimizer state and the step's activations. "
        "'setup peak' includes the load and, for LoRA-GA and LoRA-SB on the NF4 base, the float copy "
        "of the checkpoint their gradient estimate runs on (streamed block by block): on a CPU-only "
        "machine that copy lives in the same host memory, so their setup peak is not lower than the "
        "float run's; on a GPU the float copy stays on the host and only one block at a time is on the device.",
    ]
    lines += ["", QUICK_NOTE if args.quick else CPU_NOTE]
    _common.write_results(args.results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
