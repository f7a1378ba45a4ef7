"""Turn the metrics of a ``loralab compare`` run into its plots and its markdown table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["load_records", "markdown_table", "moving_average", "plot_losses", "summarize"]

SMOOTHING = 10
"""Window (optimizer steps) of the moving average drawn for training loss (per-batch loss is noisy)."""


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of a metrics file."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def moving_average(values: Sequence[float], window: int = SMOOTHING) -> list[float]:
    """Trailing mean over up to ``window`` values (shorter at the start).

    Example:
        >>> moving_average([1.0, 3.0, 5.0, 7.0], window=2)
        [1.0, 2.0, 4.0, 6.0]
    """
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: its summary record plus train-loss means over the first and last fifth of the steps."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "summary":
            out.setdefault(r["method"], {}).update(r)
    for method, s in out.items():
        losses = [r["loss"] for r in records if r["kind"] == "train" and r["method"] == method]
        fifth = max(1, len(losses) // 5)
        s["train_loss_first_fifth"] = _mean(losses[:fifth])
        s["train_loss_last_fifth"] = _mean(losses[-fifth:])
    return out


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def markdown_table(summaries: dict[str, dict[str, Any]], metric: str) -> str:
    """One row per method, in the order given."""
    head = (
        f"| method | trainable params | optimizer state (MiB) | init (s) | time/step (ms) | peak RSS (MiB) "
        f"| peak above loaded model (MiB) | train loss, first 1/5 | train loss, last 1/5 | eval loss | eval {metric} |"
    )
    ncols = head.count("|") - 1
    lines = [head, "|" + "---|" * ncols]
    for method, s in summaries.items():
        if s.get("status", "ok") != "ok" and "eval_loss" not in s:
            lines.append(f"| {method} | {s.get('status')} |" + " |" * (ncols - 2))
            continue
        status = "" if s.get("status", "ok") == "ok" else f" ({s['status']})"
        lines.append(
            "| "
            + " | ".join(
                [
                    method + status,
                    _count(s.get("trainable_params")),
                    f"{s.get('optimizer_state_bytes', 0) / 2**20:,.2f}",
                    f"{s.get('init_time_s', math.nan):.1f}",
                    f"{1e3 * s.get('time_per_step_s', math.nan):.0f}",
                    _mib(s.get("peak_rss_bytes")),
                    _mib(s.get("peak_rss_above_loaded_bytes")),
                    f"{s['train_loss_first_fifth']:.4f}",
                    f"{s['train_loss_last_fifth']:.4f}",
                    f"{s.get('eval_loss', math.nan):.4f}",
                    f"{s.get(f'eval_{metric}', math.nan):.4f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def plot_losses(
    records: list[dict[str, Any]], methods: Sequence[str], out_dir: str | Path, title: str
) -> list[Path]:
    """Write ``loss_vs_step.png`` (training loss, moving average; evaluation loss) and
    ``loss_vs_time.png`` (training loss against wall time including each method's init)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    colors = plt.get_cmap("tab10")
    paths = []
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    fig2, ax_time = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods):
        steps = [r for r in records if r["kind"] == "train" and r["method"] == method]
        evals = [r for r in records if r["kind"] == "eval" and r["method"] == method]
        if not steps:
            continue
        smooth = moving_average([r["loss"] for r in steps])
        kw: dict[str, Any] = dict(color=colors(i % 10), label=method, linewidth=1.6)
        ax_train.plot([r["step"] for r in steps], smooth, **kw)
        ax_time.plot([r["time_s"] for r in steps], smooth, **kw)
        if evals:
            ax_eval.plot(
                [r["step"] for r in evals],
                [r["eval_loss"] for r in evals],
                marker="o",
                markersize=3,
                **kw,
            )
    ax_train.set(
        xlabel="optimizer step",
        ylabel=f"training loss ({SMOOTHING}-step moving average)",
        title="training loss",
    )
    ax_eval.set(xlabel="optimizer step", ylabel="validation loss", title="validation loss")
    ax_time.set(
        xlabel="wall time (s): method init (gradient estimation, SVD) + training steps",
        ylabel=f"training loss ({SMOOTHING}-step moving average)",
        title="training loss vs wall time",
    )
    for ax in (ax_train, ax_eval, ax_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig2.suptitle(title, fontsize=9)
    for figure, name in ((fig, "loss_vs_step.png"), (fig2, "loss_vs_time.png")):
        figure.tight_layout()
        path = out_dir / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths
