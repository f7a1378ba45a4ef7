"""The ``loralab`` console script: one subcommand per entrypoint.

``loralab compare`` (the main job), ``loralab glue``, ``loralab metamath``, ``loralab winogrande``,
``loralab c4``. Each subcommand is the ``main(argv)`` of its module, imported lazily so a broken or
missing optional dependency of one entrypoint never breaks the others.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["SUBCOMMANDS", "main", "run_entrypoint"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    # name: (module whose main(argv) runs it, one-line help)
    "compare": (
        "loralab.runners.compare",
        "fine-tune one model with every method side by side (plots, table, JSONL)",
    ),
    "glue": ("loralab.runners.glue", "GLUE classification (RoBERTa/BERT/T5) with any method"),
    "metamath": (
        "loralab.runners.metamath",
        "MetaMathQA fine-tuning of a causal LM, then GSM8K evaluation",
    ),
    "winogrande": ("loralab.runners.winogrande", "WinoGrande training and two-option scoring"),
    "c4": ("loralab.runners.c4.cli", "C4 pre-training of LLaMA (AdamW / GaLore / GoLore / ReLoRA)"),
}


def _usage() -> str:
    lines = [
        "usage: loralab <command> [options]   (loralab <command> --help for its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<11} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``loralab <command> ...`` to the entrypoint's ``main``.

    Example:
        >>> main(["--help"])  # doctest: +SKIP
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(
            f"loralab: unknown command {name!r}; choose one of {', '.join(SUBCOMMANDS)}\n",
            file=sys.stderr,
        )
        print(_usage(), file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return run_entrypoint(module.main, rest, prog=f"loralab {name}")


def run_entrypoint(
    entry: Callable[[list[str] | None], Any], argv: list[str] | None = None, *, prog: str
) -> int:
    """Run an entrypoint's ``main(argv)``; return its exit status.

    Bad input (:class:`~loralab.runners.preflight.PreflightError`, which the argument parsers raise for
    every invalid flag value, and :class:`~loralab.runners.methods.MethodError`) ends as argparse's
    errors do: ``PROG: error: MESSAGE`` on stderr and status 2, without a traceback (the message
    names the flag, file and line, and what to do). Any other exception is a bug and propagates.

    A process group the run started (torchrun, accelerate, DeepSpeed) is ended once the run finished
    (:func:`loralab.core.distributed.end_process_group`: a rank that exits with it alive can abort in
    the interpreter's exit); after an error it is left to the process exit, as the teardown would
    wait for ranks that are still inside a collective.

    Example:
        >>> from loralab.runners import glue
        >>> run_entrypoint(glue.main, ["--help"], prog="loralab glue")  # doctest: +SKIP
    """
    import torch.distributed as dist

    from loralab.core.distributed import end_process_group
    from loralab.runners.methods import MethodError
    from loralab.runners.preflight import PreflightError

    started_before = dist.is_available() and dist.is_initialized()
    try:
        result = entry(argv)
    except (PreflightError, MethodError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if not started_before:
        end_process_group()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
