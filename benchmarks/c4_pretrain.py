"""C4 pre-training throughput and memory: AdamW vs GaLore vs GoLore on llama_60m, each in its own process.

Every optimizer runs the real runner (``python -m loralab.runners.c4``) in a fresh subprocess on the
same data (synthetic C4-format shards written here, byte-level offline tokenizer; the model keeps
llama_60m's 32000-row embedding and head, so the compute is the published model's), the same seed and
the same steps. Reported per run, from its ``run_summary.json`` / ``metrics.jsonl``:

- tokens/s (wall clock) and tokens per CPU-second of the process, both averaged over the steps after
  the first (step 1 computes the first GaLore/GoLore projectors, timed separately). On CPU the runs
  are single-threaded (``OMP_NUM_THREADS=1`` unless ``--threads``), and on a shared machine the
  CPU-second figure is the one to compare: wall-clock time also measures other people's jobs;
- optimizer state (MiB), summed over the tensors of the saved ``optimizer.pt`` (exact, load-free);
- peak memory of the training loop (logged at the last step, before the final checkpoint is written):
  the process's peak RSS on CPU (includes the Python / torch runtime and libraries, ~0.5 GiB), peak
  allocated memory on GPU.

GaLore / GoLore use the papers' C4 settings for llama_60m: rank 128, scale 0.25; ``update_proj_gap``
is the number of steps so only the first projector is computed (its cost is the step-1 column);
GoLore with ``rand_ratio 0`` (random projectors from the start) and 0.8 (SVD, as GaLore, for the
first 80 % of training — during this short run it is GaLore).

Run: ``python benchmarks/c4_pretrain.py [--quick]``; writes ``benchmarks/results/c4_pretrain.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "c4_pretrain.md"

FULL = {"max_length": 256, "batch_size": 8, "steps": 20}
QUICK = {"max_length": 64, "batch_size": 2, "steps": 5}

RUNS = {
    "adamw": ["--optimizer", "adamw"],
    "galore": ["--optimizer", "galore_adamw"],
    "golore (rand_ratio 0)": ["--optimizer", "golore_adamw", "--rand_ratio", "0.0"],
}
NOTE = "Peak RSS on CPU is the process's high-water mark: the Python/torch runtime, weights, gradients, activations, and allocator caching of the transient full-size tensors GaLore/GoLore create (the back-projected update of each matrix, the first SVD), so it does not show the state saving here; the optimizer-state column is the exact difference. On GPU the column is peak allocated memory."
SUBSPACE = ["--rank", "128", "--galore_scale", "0.25"]


def _state_mib(path: Path) -> float:
    state = torch.load(path, map_location="cpu", weights_only=True)["state"]
    return _common.optimizer_state_bytes(state) / 2**20


def _run(
    name: str,
    extra: list[str],
    setup: dict[str, str],
    size: dict[str, int],
    out: Path,
    threads: int,
) -> dict:
    steps = size["steps"]
    argv = [
        sys.executable, "-m", "loralab.runners.c4", "--output_dir", str(out), "--model_config", "llama_60m",
        "--tokenizer", setup["tokenizer"], "--train_data", setup["train_data"], "--max_length", str(size["max_length"]),
        "--batch_size", str(size["batch_size"]), "--num_training_steps", str(steps), "--warmup_steps", "1",
        "--lr", "1e-3", "--eval_every", str(steps), "--save_every", str(steps),
        "--eval_tokens", str(size["max_length"]), "--plot", "false", "--seed", "0", *extra,
    ]  # fmt: skip
    if name != "adamw":  # the runner refuses subspace flags for AdamW
        argv += [*SUBSPACE, "--update_proj_gap", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    print(f"[{name}] running ...", flush=True)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    summary = json.loads((out / "run_summary.json").read_text())
    train = [
        r
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r["kind"] == "train"
    ]
    per_step = sorted(r["tokens_per_s"] for r in train[1:])  # after the first (projectors)
    return {
        "tokens_per_s": summary["tokens_per_s"],
        "median_tokens_per_s": per_step[len(per_step) // 2],
        "tokens_per_cpu_s": summary["tokens_per_cpu_s"],
        "step1_cpu_s": train[0]["step_cpu_s"],
        "state_mib": _state_mib(out / f"checkpoint-{steps}" / "optimizer.pt"),
        # the training loop's peak, logged at the last step before the final checkpoint is written
        "peak_mem_mb": train[-1]["peak_mem_mb"],
        "mem_kind": summary["mem_kind"],
        "params": summary["params"],
        "device": summary["device"],
    }


def _warm_up_gpu(seconds: float = 10.0) -> None:
    """Matrix products for ``seconds``: an idle GPU runs at a fraction of its clock (an H200 read 345
    MHz before the first run), and the first process measured would pay the ramp."""
    x = torch.randn(4096, 4096, device="cuda")
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x = torch.tanh(x @ x)
        torch.cuda.synchronize()


def _combine(runs: list[dict]) -> dict:
    """One row of an optimizer's runs: throughputs averaged, the rest from the first run."""
    row = dict(runs[0])
    for key in ("tokens_per_s", "median_tokens_per_s", "tokens_per_cpu_s"):
        row[key] = sum(r[key] for r in runs) / len(runs)
    row["runs"] = len(runs)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"short sequences, few steps: {QUICK}")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (CPU)")
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default: the size's)"
    )
    p.add_argument(
        "--repeat",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run each optimizer twice (order A B C C B A) and average the throughputs (default on)",
    )
    p.add_argument("--output", default=str(RESULTS))
    a = p.parse_args()
    size = dict(QUICK if a.quick else FULL)
    if a.steps is not None:
        size["steps"] = a.steps

    from loralab.runners.c4.testing import write_tiny_setup

    with tempfile.TemporaryDirectory() as tmp:
        n_docs = max(200, 4 * size["steps"] * size["batch_size"] * size["max_length"] // 300)
        setup = write_tiny_setup(Path(tmp) / "setup", train_docs=n_docs, validation_docs=20)
        if torch.cuda.is_available():
            _warm_up_gpu()
        # every optimizer twice, in the order A B C C B A: a machine that speeds up or slows down
        # during the benchmark (GPU clocks leaving idle, other jobs) favours no optimizer
        order = list(RUNS) + list(RUNS)[::-1]
        runs: dict[str, list[dict]] = {name: [] for name in RUNS}
        for k, name in enumerate(order if a.repeat else RUNS):
            runs[name].append(_run(name, RUNS[name], setup, size, Path(tmp) / f"run{k}", a.threads))
        rows = {name: _combine(rs) for name, rs in runs.items()}

    base = rows["adamw"]
    device = base["device"]
    mem_label = "peak RSS (MiB)" if base["mem_kind"].startswith("cpu") else "peak GPU alloc (MiB)"
    lines = [
        f"| optimizer | tokens/s (wall) | median tokens/s (wall) | × AdamW (median) | tokens / CPU-s | × AdamW (CPU-s) | step-1 CPU s (1st projector) | optimizer state (MiB) | × AdamW | {mem_label} | × AdamW |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['median_tokens_per_s']:.0f} | "
            f"{r['median_tokens_per_s'] / base['median_tokens_per_s']:.2f} | {r['tokens_per_cpu_s']:.0f} | {r['tokens_per_cpu_s'] / base['tokens_per_cpu_s']:.2f} | "
            f"{r['step1_cpu_s']:.2f} | {r['state_mib']:.0f} | {r['state_mib'] / base['state_mib']:.2f} | {r['peak_mem_mb']:.0f} | "
            f"{r['peak_mem_mb'] / base['peak_mem_mb']:.2f} |"
        )
    table = "\n".join(lines)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    machine = (
        f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}"
        if device == "cpu" else torch.cuda.get_device_name(0) + f", torch {torch.__version__}"
    )  # fmt: skip
    command = (
        f"python benchmarks/c4_pretrain.py{' --quick' if a.quick else ''}{'' if a.threads == 1 else f' --threads {a.threads}'}"
        f"{'' if a.steps is None else f' --steps {a.steps}'}{'' if a.repeat else ' --no-repeat'}"
    )
    text = "\n".join(
        [
            "# C4 pre-training: AdamW vs GaLore vs GoLore (llama_60m)",
            "",
            f"- command: `{command}`",
            f"- machine: {machine}; device {device}; {a.threads} thread(s) per run; load average at the end {load:.1f} "
            "(shared machine: compare the CPU-second columns, wall-clock tokens/s include other jobs)",
            f"- date: {datetime.date.today().isoformat()}",
            f"- model: llama_60m ({base['params'] / 1e6:.1f}M parameters, vocab 32000), {size['max_length']}-token sequences, "
            f"micro-batch {size['batch_size']}, {size['steps']} steps (throughput: mean and median over steps 2..{size['steps']}"
            f"{', each optimizer run twice in the order A B C C B A and the two runs averaged' if a.repeat else ''}); "
            "GaLore/GoLore rank 128, scale 0.25, the 7 attention/MLP matrices of every layer projected",
            "",
            table,
            "",
            "Optimizer state = the tensors in the saved `optimizer.pt` (AdamW: two moments per parameter; GaLore/GoLore: "
            "moments of the rank-128 projected gradients plus the projectors for the 2-D weights, full moments for "
            "embeddings, head and norms, which dominate at this size with a 32000-token vocabulary).",
            "",
            NOTE,
            "",
        ]
    )
    _common.write_results(a.output, text)


if __name__ == "__main__":
    main()
