"""One method of ``loralab compare``, run in its own process so its peak memory is its own.

``python -m loralab.runners.compare.worker SPEC.json`` reads a :class:`RunSpec`, fine-tunes on the
runners' training loop (:func:`loralab.runners.loop.run_loop`, plain-torch engine), and writes the
loop's metrics schema to ``spec.metrics_file``, each record with ``method``: one ``{"kind": "train",
...}`` per optimizer step (``loss``, ``learning_rate``, ``time_s``), ``{"kind": "eval", ...}`` at step 0,
every ``eval_every`` steps and at the end (``eval_loss``, ``eval_<metric>``), and a final
``{"kind": "summary", ...}`` (parameters, optimizer-state bytes, peak memory, init time, time per
step, the final ``eval_*`` metrics, or the error that stopped the run).

One process is one *run*: a method at one learning-rate factor (``lr_factor`` times its recipe's
learning rate, ``--sweep``) and one seed (``--seeds``); every record carries ``method``, ``run``,
``lr_factor`` and ``seed``. A fraction of the training data (``heldout_fraction``) is held out of
training and scored once at the end (``heldout_loss``, ``heldout_<metric>`` in the summary): the
sweep picks each method's factor on it, never on the validation split that the table reports.

Timing: ``time_s`` on each record counts the method's setup (gradient estimation for LoRA-GA / LoRA-SB)
and its training steps, never evaluation, so loss-vs-wall-time curves compare what a user pays.
Memory: the process's peak resident set size (``ru_maxrss``), and the peak above the resident size
measured just after the model and data were loaded (sampled every 5 ms), which isolates what the
method itself adds; on CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunSpec", "optimizer_state_bytes", "run_method"]

logger = logging.getLogger(__name__)


@dataclass
class RunSpec:
    """Everything one method's run needs; written as JSON by the parent process."""

    method: str
    model_path: str
    metrics_file: str
    run: str = ""
    lr_factor: float = 1.0
    heldout_fraction: float = 0.1
    task: str = "embedded"
    hparams: dict[str, Any] = field(default_factory=dict)
    steps: int = 150
    batch_size: int = 16
    max_length: int = 64
    eval_every: int = 25
    seed: int = 42
    device: str = "cpu"
    train_file: str | None = None
    validation_file: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    progress: bool = True
    threads: int | None = None
    load_in_4bit: bool = False
    load_in_8bit: bool = False


class _PeakRSS:
    """Samples the process's resident set size in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def reset(self) -> int:
        self.peak = self._proc.memory_info().rss
        return self.peak

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in ``optimizer.state`` (moments, projectors, step counters), excluding the parameters.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(10, 10))
        >>> opt = torch.optim.AdamW([p])
        >>> p.grad = torch.ones_like(p); opt.step()
        >>> optimizer_state_bytes(opt)  # exp_avg + exp_avg_sq (400 B each) + a float32 step
        804
    """
    return sum(_tensor_bytes(s) for s in optimizer.state.values())


def _write(f: Any, record: dict[str, Any]) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def run_method(spec: RunSpec) -> dict[str, Any]:
    """Fine-tune ``spec.method`` on the training loop and write its metrics; returns the summary record."""
    from loralab.runners.compare.recipes import recipe_for
    from loralab.runners.compare.task import load_data, load_model, num_labels
    from loralab.runners.loop import ListBatches, LoopConfig, MetricsLog, TorchEngine, run_loop
    from loralab.runners.methods import get_method, method_args, setup_method

    if spec.threads:
        torch.set_num_threads(spec.threads)
    engine = TorchEngine(device=spec.device)
    device = engine.device
    metrics = MetricsLog(spec.metrics_file, extra=_identity(spec))
    metrics.restart(None)
    summary: dict[str, Any] = {"status": "ok"}
    with _PeakRSS() as rss:
        # model, data and the method's hyper-parameters (same seed, head init and batches for every method)
        method = get_method(spec.method)
        method.check_available()
        from types import SimpleNamespace

        import peft  # noqa: F401  (imported before the clock starts: import time is not init time)

        from loralab.runners.glue import HEAD_NAMES
        from loralab.runners.quantization import bnb_config

        quantization = SimpleNamespace(
            method=spec.method, load_in_4bit=spec.load_in_4bit, load_in_8bit=spec.load_in_8bit
        )
        model, tokenizer, heads = load_model(
            spec.model_path,
            num_labels=num_labels(spec.task),
            seed=spec.seed,
            quantization_config=bnb_config(quantization, skip_modules=list(HEAD_NAMES)),
        )
        data = load_data(
            spec.task,
            tokenizer,
            max_length=spec.max_length,
            train_file=spec.train_file,
            validation_file=spec.validation_file,
            max_train_samples=spec.max_train_samples,
            max_eval_samples=spec.max_eval_samples,
        ).split_heldout(spec.heldout_fraction)
        batches = data.train_batches(spec.steps, spec.batch_size, spec.seed)
        model.to(device)
        total_params = sum(p.numel() for p in model.parameters())
        hparams = recipe_for(spec.method, spec.hparams)
        # --sweep: the factor multiplies the recipe's rate (after any --set learning_rate)
        hparams["learning_rate"] = hparams["learning_rate"] * spec.lr_factor
        args = method_args(
            spec.method,
            **hparams,
            max_steps=spec.steps,
            seed=spec.seed,
            task_type="SEQ_CLS",
            modules_to_save=heads or None,
            progress=False,
        )
        summary["hparams"] = {
            k: v for k, v in vars(args).items() if v is not None and k != "progress"
        }
        baseline = rss.reset()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # the method's setup (gradient estimation for LoRA-GA / LoRA-SB) is timed as init
        torch.manual_seed(spec.seed)
        start = time.perf_counter()
        setup = setup_method(
            method,
            model,
            args,
            train_batches=[{k: v.to(device) for k, v in b.items()} for b in batches],
        )
        init_time = time.perf_counter() - start
        model, optimizer = engine.prepare(setup.model, setup.optimizer, setup.scheduler)
        summary["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        summary["total_params"] = total_params
        summary["init_time_s"] = init_time

        # the loop: every step logged, evaluation at 0, every eval_every steps and at the end
        result = run_loop(
            engine,
            model,
            optimizer,
            setup.scheduler,
            ListBatches(batches, device),
            LoopConfig(
                max_steps=spec.steps,
                seed=spec.seed,
                logging_steps=1,
                eval_steps=spec.eval_every,
                eval_at_start=True,
                stop_on_nonfinite=True,
                progress=spec.progress,
                description=f"{spec.method:>8}",
                method=spec.method,
                clock_start=init_time,
            ),
            evaluate=lambda m: data.evaluate(m, device=device),
            metrics=metrics,
            callbacks=setup.callbacks,
        )
        summary["status"] = result.status
        summary["optimizer_state_bytes"] = optimizer_state_bytes(optimizer)
        summary["steps"] = len(result.step_times)
        summary["time_per_step_s"] = (
            float(sorted(result.step_times)[len(result.step_times) // 2])
            if result.step_times
            else math.nan
        )
        summary["train_time_s"] = result.train_time_s
        if result.status == "ok" and data.heldout:
            # scored once at the end, after the run's clock stopped; what --sweep chooses on
            held = data.evaluate(model, device=device, rows=data.heldout)
            summary.update({f"heldout_{k.removeprefix('eval_')}": v for k, v in held.items()})
    summary["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    summary["peak_rss_above_loaded_bytes"] = max(0, rss.peak - baseline)
    if device.type == "cuda":
        summary["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return metrics.summary(result.step, result.metrics, **summary)


def _identity(spec: RunSpec) -> dict[str, Any]:
    """The keys every record of this run carries."""
    return {
        "method": spec.method,
        "run": spec.run or spec.method,
        "lr_factor": spec.lr_factor,
        "seed": spec.seed,
    }


def _quiet_libraries() -> None:
    """Keep the per-method progress bar readable: no load reports or per-split progress bars."""
    import warnings

    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m loralab.runners.compare.worker SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    spec = RunSpec(**json.loads(Path(argv[0]).read_text()))
    try:
        summary = run_method(spec)
    except (
        Exception
    ) as exc:  # reported as the method's row in the table, the other methods still run
        traceback.print_exc()
        message = " ".join(str(exc).split())
        with open(spec.metrics_file, "a", encoding="utf-8") as f:
            _write(
                f,
                {
                    "kind": "summary",
                    **_identity(spec),
                    "status": f"failed: {type(exc).__name__}: {message}",
                },
            )
        return 1
    return 0 if summary["status"] == "ok" else 3


def write_spec(spec: RunSpec, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(dataclasses.asdict(spec), indent=1))
    return path


if __name__ == "__main__":
    sys.exit(main())
