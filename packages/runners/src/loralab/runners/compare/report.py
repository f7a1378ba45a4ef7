"""Turn the metrics of a ``loralab compare`` run into its plots and its markdown table."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TARGET_FRACTION",
    "aggregate",
    "choose_lr_factor",
    "gap_closed",
    "load_records",
    "markdown_table",
    "mean_std",
    "moving_average",
    "plot_losses",
    "steps_to_target",
    "summarize",
    "sweep_table",
]

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


def _std(values: Sequence[float]) -> float:
    return mean_std(values)[1]


def _run(record: dict[str, Any]) -> str:
    return str(record.get("run", record["method"]))


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per run (``run``, else ``method``): its summary record plus train-loss means over the first and
    last fifth of the steps, and ``train_losses`` (every step's loss, in order)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "summary":
            out.setdefault(_run(r), {}).update(r)
    for run, s in out.items():
        losses = [r["loss"] for r in records if r["kind"] == "train" and _run(r) == run]
        fifth = max(1, len(losses) // 5)
        s["train_losses"] = losses
        s["train_loss_first_fifth"] = _mean(losses[:fifth])
        s["train_loss_last_fifth"] = _mean(losses[-fifth:])
    return out


def choose_lr_factor(runs: Iterable[dict[str, Any]], metric: str) -> float | None:
    """The ``lr_factor`` of the best run on the **held-out** split: highest ``heldout_<metric>``, ties
    broken by the lower ``heldout_loss``, then by the smaller factor. Runs that failed or have no
    held-out score are skipped; ``None`` when none is left. The reported ``eval_*`` (validation)
    values are never read.

    Example:
        >>> runs = [
        ...     {"lr_factor": 1.0, "status": "ok", "heldout_accuracy": 0.9, "heldout_loss": 0.3},
        ...     {"lr_factor": 4.0, "status": "ok", "heldout_accuracy": 0.9, "heldout_loss": 0.2},
        ...     {"lr_factor": 16.0, "status": "failed: loss is nan"},
        ... ]
        >>> choose_lr_factor(runs, "accuracy")
        4.0
    """
    scored = [
        r
        for r in runs
        if r.get("status") == "ok"
        and isinstance(r.get(f"heldout_{metric}"), (int, float))
        and math.isfinite(r[f"heldout_{metric}"])
    ]
    if not scored:
        return None
    best = min(
        scored,
        key=lambda r: (
            -r[f"heldout_{metric}"],
            r.get("heldout_loss", math.inf),
            r["lr_factor"],
        ),
    )
    return float(best["lr_factor"])


def gap_closed(value: float, lora: float, full: float) -> float:
    """The fraction of the gap from LoRA to full fine-tuning that a method closes:
    ``(value - lora) / (full - lora)``; 0 = LoRA's score, 1 = full fine-tuning's, above 1 = better
    than full fine-tuning. ``nan`` when full fine-tuning and LoRA score the same (no gap to close) or
    an input is missing.

    Example:
        >>> gap_closed(0.75, lora=0.5, full=1.0)
        0.5
    """
    if any(not isinstance(x, (int, float)) or not math.isfinite(x) for x in (value, lora, full)):
        return math.nan
    if full == lora:
        return math.nan
    return (value - lora) / (full - lora)


DEFAULT_TARGET_FRACTION = 0.9
"""``steps_to_target``: the share of full fine-tuning's training-loss reduction a method must reach."""


def steps_to_target(losses: Sequence[float], target: float, window: int = SMOOTHING) -> int | None:
    """The first optimizer step (1-based) at which the ``window``-step moving average of ``losses``
    is at or below ``target``; ``None`` if it never is.

    Example:
        >>> steps_to_target([1.0, 0.8, 0.6, 0.4], target=0.5, window=1)
        4
    """
    for step, value in enumerate(moving_average(list(losses), window), start=1):
        if value <= target:
            return step
    return None


def loss_target(full_losses: Sequence[float], fraction: float = DEFAULT_TARGET_FRACTION) -> float:
    """The training loss that marks ``fraction`` of full fine-tuning's loss reduction:
    ``L0 - fraction * (L0 - L_end)``, with ``L0`` the first and ``L_end`` the last value of full
    fine-tuning's smoothed training loss.

    Example:
        >>> round(loss_target([1.0] + [0.0] * 20, fraction=0.9), 6)  # smoothed end: 0.0
        0.1
    """
    smooth = moving_average(list(full_losses))
    start, end = smooth[0], smooth[-1]  # smooth[0] is the first loss itself
    return start - fraction * (start - end)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; ``nan`` for none).

    Example:
        >>> mean_std([1.0, 3.0])
        (2.0, 1.4142135623730951)
    """
    vals = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


_AGGREGATED = (
    "eval_loss",
    "train_loss_first_fifth",
    "train_loss_last_fifth",
    "time_per_step_s",
    "init_time_s",
    "peak_rss_bytes",
    "peak_rss_above_loaded_bytes",
    "heldout_loss",
)


def aggregate(
    run_summaries: dict[str, dict[str, Any]],
    chosen: dict[str, float | None],
    metric: str,
    *,
    target_fraction: float = DEFAULT_TARGET_FRACTION,
) -> dict[str, dict[str, Any]]:
    """Per method: the runs at its chosen ``lr_factor`` (one per seed) folded into one row.

    Each numeric column is the mean over the seeds that finished, with ``<key>_std`` beside it;
    ``seeds`` counts them, ``seeds_failed`` lists the failed ones' status. Then, when ``full`` and
    ``lora`` are among the methods: ``gap_closed`` (:func:`gap_closed` on the mean ``eval_<metric>``)
    and ``steps_to_target`` (mean over seeds of :func:`steps_to_target`, the target from
    :func:`loss_target` on full fine-tuning's mean training-loss curve; ``steps_to_target_reached``
    says in how many seeds it got there). A method with no finished run keeps its first run's
    summary (its ``status`` says why).
    """
    out: dict[str, dict[str, Any]] = {}
    for method, factor in chosen.items():
        runs = [
            s
            for s in run_summaries.values()
            if s.get("method") == method and (factor is None or s.get("lr_factor", 1.0) == factor)
        ]
        ok = [s for s in runs if s.get("status") == "ok"]
        if not ok:
            first = next(
                (s for s in run_summaries.values() if s.get("method") == method), {"method": method}
            )
            out[method] = {**first, "lr_factor": factor, "seeds": 0}
            continue
        # what every seed shares (parameters, optimizer-state size, hyper-parameters) from the
        # first; the measured columns below are replaced by their mean over the seeds
        row = dict(ok[0])
        row.pop("train_losses", None)
        row["lr_factor"] = factor
        row["learning_rate"] = ok[0].get("hparams", {}).get("learning_rate")
        row["seeds"] = len(ok)
        row["seed_list"] = [s.get("seed") for s in ok]
        row["seeds_failed"] = [s.get("status") for s in runs if s.get("status") != "ok"]
        for key in (*_AGGREGATED, f"eval_{metric}", f"heldout_{metric}"):
            if any(key in s for s in ok):
                mean, std = mean_std(s.get(key, math.nan) for s in ok)
                row[key] = mean
                if len(ok) > 1:  # one seed: no spread to show
                    row[f"{key}_std"] = std
        row["train_losses_per_seed"] = [s.get("train_losses", []) for s in ok]
        out[method] = row
    full, lora = out.get("full", {}), out.get("lora", {})
    key = f"eval_{metric}"
    for row in out.values():
        row["gap_closed"] = gap_closed(
            row.get(key, math.nan), lora.get(key, math.nan), full.get(key, math.nan)
        )
    full_curves = full.get("train_losses_per_seed") or []
    if full_curves and all(full_curves):
        n = min(len(c) for c in full_curves)
        mean_curve = [sum(c[i] for c in full_curves) / len(full_curves) for i in range(n)]
        target = loss_target(mean_curve, target_fraction)
        for row in out.values():
            hits = [steps_to_target(c, target) for c in row.get("train_losses_per_seed", [])]
            reached = [h for h in hits if h is not None]
            row["loss_target"] = target
            row["steps_to_target_reached"] = len(reached)
            row["steps_to_target"] = (
                sum(reached) / len(reached) if reached and len(reached) == len(hits) else None
            )
    return out


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f}"


def _pm(mean: float | None, std: float | None, fmt: str = ".4f") -> str:
    """``mean ± std`` (the ± part only when ``std`` is given and positive or the run had seeds)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _count(n: int | None) -> str:
    if n is None:
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def _lr(s: dict[str, Any]) -> str:
    lr, factor = s.get("learning_rate"), s.get("lr_factor")
    if lr is None:
        return "–"
    return f"{lr:.2g}" + ("" if factor in (None, 1.0) else f" ({factor:g}×)")


def _steps(s: dict[str, Any]) -> str:
    steps = s.get("steps_to_target")
    if steps is None:
        reached, seeds = s.get("steps_to_target_reached"), s.get("seeds", 1)
        if reached is None:
            return "–"
        return "never" if not reached else f"{reached}/{seeds} seeds"
    return f"{steps:.0f}"


def markdown_table(summaries: dict[str, dict[str, Any]], metric: str) -> str:
    """One row per method, in the order given: one run's summary (:func:`summarize`) or a method's
    seeds folded by :func:`aggregate` (then losses and the metric read ``mean ± std``, and the
    ``chosen lr``, ``gap closed`` and ``steps to 90 %`` columns are filled)."""
    head = (
        f"| method | chosen lr | trainable params | optimizer state (MiB) | init (s) | time/step (ms) "
        f"| peak RSS (MiB) | peak above loaded model (MiB) | train loss, first 1/5 | train loss, last 1/5 "
        f"| eval loss | eval {metric} | gap closed | steps to 90 % |"
    )
    ncols = head.count("|") - 1
    lines = [head, "|" + "---|" * ncols]
    for method, s in summaries.items():
        if s.get("status", "ok") != "ok" and "eval_loss" not in s:
            lines.append(f"| {method} | {s.get('status')} |" + " |" * (ncols - 2))
            continue
        status = "" if s.get("status", "ok") == "ok" else f" ({s['status']})"
        if s.get("seeds_failed"):
            status += f" ({len(s['seeds_failed'])} seed(s) failed: {s['seeds_failed'][0]})"
        gap = s.get("gap_closed")
        lines.append(
            "| "
            + " | ".join(
                [
                    method + status,
                    _lr(s),
                    _count(s.get("trainable_params")),
                    f"{s.get('optimizer_state_bytes', 0) / 2**20:,.2f}",
                    f"{s.get('init_time_s', math.nan):.1f}",
                    f"{1e3 * s.get('time_per_step_s', math.nan):.0f}",
                    _mib(s.get("peak_rss_bytes")),
                    _mib(s.get("peak_rss_above_loaded_bytes")),
                    _pm(s.get("train_loss_first_fifth"), s.get("train_loss_first_fifth_std")),
                    _pm(s.get("train_loss_last_fifth"), s.get("train_loss_last_fifth_std")),
                    _pm(s.get("eval_loss", math.nan), s.get("eval_loss_std")),
                    _pm(s.get(f"eval_{metric}", math.nan), s.get(f"eval_{metric}_std")),
                    "–" if gap is None or math.isnan(gap) else f"{gap:.2f}",
                    _steps(s),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def sweep_table(
    run_summaries: dict[str, dict[str, Any]],
    methods: Sequence[str],
    factors: Sequence[float],
    metric: str,
    chosen: dict[str, float | None],
    base_seed: int,
) -> str:
    """The learning-rate sweep: per method and factor, ``held-out <metric> (held-out loss)`` of the
    ``base_seed`` run, the chosen factor in bold. Validation scores are not shown here: they play no
    part in the choice."""
    head = "| method | " + " | ".join(f"{f:g}×" for f in factors) + " |"
    lines = [head, "|" + "---|" * (len(factors) + 1)]
    for method in methods:
        cells = []
        for f in factors:
            run = next(
                (
                    s
                    for s in run_summaries.values()
                    if s.get("method") == method
                    and s.get("lr_factor", 1.0) == f
                    and s.get("seed") == base_seed
                ),
                None,
            )
            if run is None:
                cells.append("–")
            elif run.get("status") != "ok" or f"heldout_{metric}" not in run:
                cells.append(str(run.get("status", "–")).split(":")[0])
            else:
                lr = run.get("hparams", {}).get("learning_rate")
                text = f"{run[f'heldout_{metric}']:.4f} ({run.get('heldout_loss', math.nan):.4f})"
                text += f" @ {lr:.2g}" if lr is not None else ""
                cells.append(f"**{text}**" if chosen.get(method) == f else text)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_losses(
    records: list[dict[str, Any]], methods: Sequence[str], out_dir: str | Path, title: str
) -> list[Path]:
    """Write ``loss_vs_step.png`` (training loss, moving average; evaluation loss) and
    ``loss_vs_time.png`` (training loss against wall time including each method's init).

    ``records`` are the runs to draw (one per seed at each method's chosen rate): a method with
    several is drawn as their mean with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    colors = plt.get_cmap("tab10")
    paths = []
    fig, (ax_train, ax_eval) = plt.subplots(1, 2, figsize=(12, 4.5))
    fig2, ax_time = plt.subplots(figsize=(7, 4.5))
    for i, method in enumerate(methods):
        runs: dict[str, list[dict[str, Any]]] = {}
        for r in records:
            if r["kind"] == "train" and r["method"] == method:
                runs.setdefault(_run(r), []).append(r)
        if not runs:
            continue
        # one curve per method: the mean over its runs (seeds), a ±1 std band when there are several
        n = min(len(v) for v in runs.values())
        smooth = [moving_average([r["loss"] for r in v[:n]]) for v in runs.values()]
        steps = [r["step"] for r in next(iter(runs.values()))[:n]]
        times = [_mean(v[j]["time_s"] for v in runs.values()) for j in range(n)]
        mean = [_mean(c[j] for c in smooth) for j in range(n)]
        label = method if len(runs) == 1 else f"{method} (mean ± std, {len(runs)} seeds)"
        kw: dict[str, Any] = dict(color=colors(i % 10), label=label, linewidth=1.6)
        ax_train.plot(steps, mean, **kw)
        ax_time.plot(times, mean, **kw)
        if len(runs) > 1:
            std = [_std([c[j] for c in smooth]) for j in range(n)]
            lo = [m - d for m, d in zip(mean, std)]
            hi = [m + d for m, d in zip(mean, std)]
            ax_train.fill_between(steps, lo, hi, color=colors(i % 10), alpha=0.2, linewidth=0)
            ax_time.fill_between(times, lo, hi, color=colors(i % 10), alpha=0.2, linewidth=0)
        evals: dict[int, list[float]] = {}
        for r in records:
            if r["kind"] == "eval" and r["method"] == method and _run(r) in runs:
                evals.setdefault(r["step"], []).append(r["eval_loss"])
        if evals:
            xs = sorted(evals)
            ys = [_mean(evals[x]) for x in xs]
            ax_eval.plot(xs, ys, marker="o", markersize=3, **kw)
            if len(runs) > 1:
                sd = [_std(evals[x]) for x in xs]
                ax_eval.fill_between(
                    xs,
                    [y - d for y, d in zip(ys, sd)],
                    [y + d for y, d in zip(ys, sd)],
                    color=colors(i % 10),
                    alpha=0.2,
                    linewidth=0,
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
