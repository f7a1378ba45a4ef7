"""Command-line flags of the registry: ``--method`` and every method option (default ``None`` =
"not given", so options of another method can be detected and rejected). Each flag's help is its
config-dataclass field's ``metadata["help"]`` (see :class:`~loralab.runners.methods.base.Option`)."""

from __future__ import annotations

import argparse

from loralab.runners.methods.registry import METHODS, OPTIONS, get_method

__all__ = ["add_method_arguments"]


def add_method_arguments(
    parser: argparse.ArgumentParser, default: str = "lora"
) -> argparse.ArgumentParser:
    """Add ``--method`` and all method options to ``parser`` (a group titled "method")."""
    group = parser.add_argument_group(
        "method", "fine-tuning method and its options (see README for paper settings)"
    )
    group.add_argument(
        "--method", default=default, choices=METHODS, help=f"fine-tuning method (default {default})"
    )
    for opt in OPTIONS.values():
        users = [n for n in METHODS if opt.name in get_method(n).defaults]
        group.add_argument(
            f"--{opt.name}",
            type=opt.type,
            default=None,
            choices=opt.choices,
            help=f"{opt.describe()} [{', '.join(users)}]".replace("%", "%%"),
        )
    return parser
