"""What the benchmark scripts share: random models, memory and optimizer-state counters, the machine
description, and running one measured mode in a fresh subprocess.

The scripts run as ``python benchmarks/<name>.py`` from the repository root, so this folder is on
``sys.path`` and they ``import _common``; ``nox -s bench`` skips files starting with ``_``. Heavy
imports (torch, transformers, psutil) happen inside the functions, so a script's parent process stays
light until it needs them.

Example::

    import _common

    model = _common.random_llama(dict(hidden=256, inter=688, layers=4, vocab=8000))
    row = _common.run_in_subprocess([__file__, "--worker", "adamw"], label="adamw")
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM

# Sizes of the gradient-estimation benchmarks (core_gradients.py, lora_ga_init.py): the keyword
# arguments of ``loralab.core.testing.tiny_llama`` plus the batches, see ``llama_and_batches``.
ESTIMATION_FULL: dict[str, int] = dict(  # ~97M parameters (12 x 768, vocab 8000)
    hidden_size=768,
    num_hidden_layers=12,
    intermediate_size=2048,
    vocab_size=8000,
    num_attention_heads=12,
    num_key_value_heads=12,
    batches=4,
    batch_size=2,
    seq_len=256,
)
ESTIMATION_WIDE: dict[str, int] = (
    dict(  # ~29M parameters, 32000-token vocabulary (the head dominates)
        hidden_size=256,
        num_hidden_layers=16,
        intermediate_size=688,
        vocab_size=32000,
        num_attention_heads=4,
        num_key_value_heads=4,
        batches=4,
        batch_size=2,
        seq_len=256,
    )
)
ESTIMATION_WIDE_QUICK: dict[str, int] = dict(  # --quick's wide-vocabulary shape
    hidden_size=128,
    num_hidden_layers=4,
    intermediate_size=344,
    vocab_size=8000,
    num_attention_heads=2,
    num_key_value_heads=2,
    batches=2,
    batch_size=2,
    seq_len=64,
)
ESTIMATION_QUICK: dict[str, int] = dict(  # --quick: seconds
    hidden_size=256,
    num_hidden_layers=4,
    intermediate_size=688,
    vocab_size=2000,
    num_attention_heads=4,
    num_key_value_heads=4,
    batches=2,
    batch_size=2,
    seq_len=64,
)


def random_llama(
    size: Mapping[str, Any],
    *,
    head_dim: int = 64,
    max_position_embeddings: int = 512,
    seed: int = 0,
    **config: Any,
) -> LlamaForCausalLM:
    """A randomly initialised ``LlamaForCausalLM`` (untied embeddings) from a benchmark's size dict.

    Args:
        size: the script's sizes; reads ``hidden``, ``inter``, ``layers`` and ``vocab`` (other keys
            are ignored).
        head_dim: attention head size; ``hidden // head_dim`` heads, as many key/value heads.
        max_position_embeddings: the config's maximum sequence length.
        seed: ``torch.manual_seed`` set right before the config and model are built, so the same
            sizes and seed give the same weights in every process.
        **config: further ``LlamaConfig`` fields (e.g. ``attn_implementation="sdpa"``).

    Example::

        model = random_llama(dict(hidden=256, inter=688, layers=4, vocab=8000))
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    heads = size["hidden"] // head_dim
    llama_config = LlamaConfig(
        vocab_size=size["vocab"],
        hidden_size=size["hidden"],
        intermediate_size=size["inter"],
        num_hidden_layers=size["layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        **config,
    )
    return LlamaForCausalLM(llama_config)


def llama_and_batches(
    size: Mapping[str, int],
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """``loralab.core.testing.tiny_llama`` (seed 0) and ``make_lm_batches`` (seed 1) from one size dict.

    Args:
        size: ``tiny_llama`` keyword arguments plus ``batches``, ``batch_size`` and ``seq_len``
            (e.g. ``ESTIMATION_QUICK``); positions are sized for at least 256 tokens.

    Example::

        model, batches = llama_and_batches(ESTIMATION_QUICK)
    """
    from loralab.core.testing import make_lm_batches, tiny_llama

    size = dict(size)
    n_batches, batch_size, seq_len = (
        size.pop("batches"),
        size.pop("batch_size"),
        size.pop("seq_len"),
    )
    model = tiny_llama(seed=0, max_position_embeddings=max(256, seq_len), **size)
    batches = make_lm_batches(
        n_batches,
        batch_size=batch_size,
        seq_len=seq_len,
        vocab_size=model.config.vocab_size,
        seed=1,
    )
    return model, batches


def rss_mib() -> float:
    """This process's resident set size now, in MiB (psutil)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


@functools.cache
def _mallinfo2() -> Any:
    try:
        fn = ctypes.CDLL(None).mallinfo2  # glibc >= 2.33
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


def heap_in_use_mib() -> float | None:
    """Bytes this process's C allocator has handed out and not yet freed, in MiB (glibc's
    ``mallinfo2``: ``uordblks + hblkhd``, over every arena), or ``None`` off glibc.

    torch's CPU tensors are ``malloc``ed, so this follows the live tensors; unlike RSS it leaves out
    the free chunks a heap keeps between live ones (fragmentation) and pages not yet touched.
    """
    fn = _mallinfo2()
    if fn is None:
        return None
    info = fn()
    return (info.uordblks + info.hblkhd) / 2**20


def reset_peak_rss() -> bool:
    """Return freed heap memory to the system and reset this process's peak RSS to its current RSS.

    Linux: ``malloc_trim(0)`` then ``5`` written to ``/proc/self/clear_refs`` (resets ``VmHWM``, which
    ``ru_maxrss`` reads), so :func:`peak_rss_mib` then measures from here on, not the model build's
    transient peak. Returns False where that is not possible (the peak then counts from process start).

    Example::

        reset_peak_rss(); before = rss_mib(); run(); extra = peak_rss_mib() - before
    """
    from loralab.core.host_memory import release_freed_host_memory

    release_freed_host_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss``: KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average_note() -> str:
    """The 1-minute load average, as a phrase for a results file (the machine may be shared)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return "unknown load"
    return f"1-min load average at the end: {load1:.1f} on {os.cpu_count()} cores"


def command_footer(cmd: str, after_load: str = "") -> str:
    """The results file's line naming the command, machine, Python, load average and date (UTC);
    ``after_load`` continues the load-average phrase (e.g. what it means for the times).

    Example::

        lines.append(command_footer("python benchmarks/x.py --quick"))
    """
    import datetime as _dt
    import platform

    return (
        f"Command: `{cmd}`. Machine: {machine_description()} ({platform.python_implementation()} "
        f"{platform.python_version()}); {load_average_note()}{after_load}. Date: "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC."
    )


def machine_description(device: str = "cpu") -> str:
    """The machine and torch version for a results file.

    CPU: ``"2-core CPU, 24 GiB, torch 2.13.0+cpu"`` (cores and memory measured, memory rounded to
    GiB). CUDA: ``"<GPU name> + 16-core CPU, torch ..."``.

    Example::

        f"Machine: {machine_description()} ({platform.python_version()})"
    """
    import torch

    if device == "cuda":
        return (
            f"{torch.cuda.get_device_name()} + {os.cpu_count()}-core CPU, torch {torch.__version__}"
        )
    import psutil

    memory_gib = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()}-core CPU, {memory_gib:.0f} GiB, torch {torch.__version__}"


def optimizer_state_bytes(optimizer_or_state: Any) -> int:
    """Bytes of every tensor an optimizer keeps in its state, each storage position counted once.

    Walks ``optimizer.state`` (or any given dict / list / object) through dicts, lists, tuples and
    plain objects' attributes, so the projector objects galore-torch keeps in ``state`` (their
    ``ortho_matrix``) are counted too. Tensors seen twice (same ``data_ptr``) count once.

    Example::

        opt = torch.optim.AdamW(model.parameters())
        ...
        print(optimizer_state_bytes(opt) / 2**20, "MiB")
    """
    import torch

    state = (
        optimizer_or_state.state
        if isinstance(optimizer_or_state, torch.optim.Optimizer)
        else optimizer_or_state
    )
    seen_tensors: set[int] = set()
    seen_objects: set[int] = set()
    total = 0

    def add(x: Any) -> None:
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.data_ptr() not in seen_tensors:
                seen_tensors.add(x.data_ptr())
                total += x.numel() * x.element_size()
            return
        if id(x) in seen_objects:  # shared or cyclic containers
            return
        seen_objects.add(id(x))
        if isinstance(x, (list, tuple)):
            for y in x:
                add(y)
        elif isinstance(x, Mapping):
            for y in x.values():
                add(y)
        elif hasattr(x, "__dict__"):  # e.g. galore-torch's projector object
            for y in vars(x).values():
                add(y)

    add(state)
    return total


def run_in_subprocess(
    args: Sequence[str],
    *,
    label: str,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 3600,
    result_prefix: str = "",
) -> dict[str, Any]:
    """Run ``python *args`` in a fresh process and return the JSON result it printed last.

    A fresh process per measured mode keeps peak-RSS figures and allocator state independent.

    Args:
        args: the script and its arguments (``sys.executable`` is prepended).
        label: names the run in the error raised when it fails.
        env: variables set on top of this process's environment
            (``TOKENIZERS_PARALLELISM=false`` unless given).
        timeout: seconds before ``subprocess.TimeoutExpired``; ``None`` waits forever.
        result_prefix: the result is the last stdout line starting with it, prefix removed.

    Raises:
        RuntimeError: the process failed or printed no result; the message ends with its stderr.

    Example::

        row = run_in_subprocess([__file__, "--worker", "peft"], label="mode peft",
                                env={"OMP_NUM_THREADS": "2"})
    """
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip() and ln.startswith(result_prefix)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len(result_prefix) :])


def workers_parser(
    description: str, *, results: str | os.PathLike[str], configs: str = "configs"
) -> argparse.ArgumentParser:
    """The command line of a script whose configurations run through ``run_workers``.

    ``--quick`` (a ~6M-parameter model instead of ~106M), ``--only NAME...`` (a subset of the
    configurations), ``--results FILE`` (the markdown output, default ``results``) and the hidden
    ``--worker NAME`` that ``run_workers`` passes to each fresh process.

    Example::

        args = workers_parser(__doc__.split("\\n\\n")[0], results=RESULTS).parse_args()
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="a ~6M-parameter model instead of ~106M"
    )
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {configs}")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(results), help="markdown output path")
    return parser


def run_workers(script: str, names: Sequence[str], *, quick: bool) -> dict[str, dict[str, Any]]:
    """Run ``script --worker NAME [--quick]`` for each name, one fresh process after the other.

    Each worker prints its result as one JSON line. The workers run with
    ``OMP_NUM_THREADS=$BENCH_THREADS`` (default 1): single-threaded CPU time is what these scripts
    compare on a shared machine.

    Example::

        rows = run_workers(__file__, ["adamw", "ours"], quick=True)  # {"adamw": {...}, ...}
    """
    threads = os.environ.get("BENCH_THREADS", "1")
    rows = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        rows[name] = run_in_subprocess(
            [script, "--worker", name] + (["--quick"] if quick else []),
            label=name,
            env={"OMP_NUM_THREADS": threads},
        )
    return rows


def write_results(path: str | os.PathLike[str], text: str) -> None:
    """Print a results markdown and write it to ``path`` (parent folders created).

    Example::

        write_results(ROOT / "results" / "golore.md", "\\n".join(lines))
    """
    print(text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
