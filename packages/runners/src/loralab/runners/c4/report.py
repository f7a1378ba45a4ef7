"""Plots of one run and the results table over many runs (``python -m loralab.runners.c4 table RUNS``).

Example:
    >>> from loralab.runners.c4.report import results_table
    >>> print(results_table([]))  # doctest: +ELLIPSIS
    | run | optimizer | ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["load_metrics", "plot_run", "plot_runs", "results_table", "write_results"]


def load_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (train and eval lines)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | os.PathLike[str], path: str | os.PathLike[str] | None = None) -> Path:
    """``loss.png``: training loss and evaluation loss against the update step."""
    plt = _plt()
    records = load_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    ev = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("update step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(Path(run_dir).name)
    ax.legend()
    fig.tight_layout()
    out = Path(path) if path is not None else Path(run_dir) / "loss.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _runs(runs_dir: Path) -> list[Path]:
    return sorted(p.parent for p in runs_dir.glob("*/run_summary.json"))


def results_table(run_dirs: list[Path]) -> str:
    """Markdown table: final eval loss / perplexity, tokens/s and peak memory per run."""
    lines = [
        "| run | optimizer | model | steps | final eval loss | final ppl | tokens/s | peak mem (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in run_dirs:
        s = json.loads((d / "run_summary.json").read_text())
        tps = f"{s['tokens_per_s']:.0f}" if s.get("tokens_per_s") else "n/a"
        mem = f"{s['peak_mem_mb']:.0f} ({'GPU' if s['mem_kind'].startswith('cuda') else 'CPU RSS'})"
        lines.append(
            f"| {d.name} | {s['optimizer']} | {s['model_config']} | {s['step']}/{s['total_steps']} | "
            f"{s['final_eval_loss']:.4f} | {s['final_eval_ppl']:.2f} | {tps} | {mem} |"
        )
    return "\n".join(lines)


def plot_runs(run_dirs: list[Path], path: str | os.PathLike[str]) -> Path:
    """One PNG with every run's evaluation loss curve."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in run_dirs:
        ev = [(r["step"], r["eval_loss"]) for r in load_metrics(d) if r.get("kind") == "eval"]
        if ev:
            ax.plot(*zip(*ev), "o-", label=d.name)
    ax.set_xlabel("update step")
    ax.set_ylabel("eval loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_results(runs_dir: str | os.PathLike[str]) -> str:
    """Table over every run directory under ``runs_dir`` → ``results.md`` and ``eval_loss.png`` there."""
    root = Path(runs_dir)
    dirs = _runs(root)
    if not dirs:
        raise FileNotFoundError(f"no run directories with run_summary.json under {root}")
    table = results_table(dirs)
    (root / "results.md").write_text(table + "\n")
    plot_runs(dirs, root / "eval_loss.png")
    return table
