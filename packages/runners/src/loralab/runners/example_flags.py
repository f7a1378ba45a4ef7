"""The flag names of PEFT's LoRA-FA example, accepted by ``python -m loralab.runners.metamath``.

PEFT's ``examples/lorafa_finetune/lorafa_finetuning.py`` is run as
``accelerate launch lorafa_finetuning.py --base_model_name_or_path M --dataset_name_or_path D
--lorafa --quantize``. :func:`lorafa_example_argv` rewrites those four flags into this project's
names, so the same command runs with ``-m loralab.runners.metamath`` in place of the script:

==============================  ==========================================================================
example flag                    loralab flags
==============================  ==========================================================================
``--base_model_name_or_path M``  ``--model_name_or_path M``
``--dataset_name_or_path D``     ``--dataset_name D`` (``query`` / ``response`` columns, as MetaMathQA-40K)
``--lorafa``                     ``--method lora-fa``
``--quantize``                   ``--load_in_4bit --bnb_4bit_quant_type nf4 --bnb_4bit_use_double_quant false
                                 --bnb_4bit_compute_dtype C`` with the example's C: bfloat16 where the
                                 GPU supports it, else float16; float32 on a machine without a GPU
                                 (where the example itself fails: ``torch.cpu`` has no
                                 ``is_bf16_supported``)
==============================  ==========================================================================

An alias given together with its loralab flag must agree with it (``--lorafa --method lora`` is
refused, naming both); the example's other flags (``--lora_rank``, ``--lr``, ...) are not aliased
and are rejected by the parser as unknown. The example's defaults (r 16, lr 7e-5, 3 epochs, ...)
are not taken over: loralab's defaults apply unless given.

Example:
    >>> lorafa_example_argv(["--base_model_name_or_path", "m", "--lorafa", "--output_dir", "o"])
    ['--output_dir', 'o', '--model_name_or_path', 'm', '--method', 'lora-fa']
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from loralab.runners.methods.base import _bool

__all__ = ["lorafa_example_argv", "quantize_compute_dtype"]


def quantize_compute_dtype() -> str:
    """The example's ``--quantize`` compute dtype on this machine (see the module docstring)."""
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def _parser(flags: dict[str, dict[str, Any]]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for name, kw in flags.items():
        p.add_argument(name, default=None, **kw)
    return p


_BOOL = dict(type=_bool, nargs="?", const=True)


def lorafa_example_argv(argv: list[str]) -> list[str]:
    """``argv`` with the LoRA-FA example's flags replaced by this project's (see the module docstring).

    Raises:
        ValueError: an alias contradicts its loralab flag (``--lorafa`` with ``--method lora``,
            ``--quantize`` with ``--load_in_8bit`` or another 4-bit setting, two different model
            paths, ``--dataset_name_or_path`` with ``--train_file`` ...).
    """
    aliases, rest = _parser(
        {
            "--base_model_name_or_path": {},
            "--dataset_name_or_path": {},
            "--lorafa": _BOOL,
            "--quantize": _BOOL,
        }
    ).parse_known_args(argv)
    canon, _ = _parser(
        {
            "--model_name_or_path": {},
            "--dataset_name": {},
            "--train_file": {},
            "--method": {},
            "--load_in_4bit": _BOOL,
            "--load_in_8bit": _BOOL,
            "--bnb_4bit_quant_type": {},
            "--bnb_4bit_use_double_quant": _BOOL,
            "--bnb_4bit_compute_dtype": {},
        }
    ).parse_known_args(rest)
    out = list(rest)

    def agree(alias: str, flag: str, given: Any, wanted: Any) -> None:
        if given is not None and given != wanted:
            raise ValueError(
                f"{alias} means {flag} {wanted}, but {flag} {given} was given too; give one of them"
            )

    if aliases.base_model_name_or_path is not None:
        agree(
            "--base_model_name_or_path",
            "--model_name_or_path",
            canon.model_name_or_path,
            aliases.base_model_name_or_path,
        )
        out += ["--model_name_or_path", aliases.base_model_name_or_path]
    if aliases.dataset_name_or_path is not None:
        agree(
            "--dataset_name_or_path",
            "--dataset_name",
            canon.dataset_name,
            aliases.dataset_name_or_path,
        )
        if canon.train_file is not None:
            raise ValueError(
                "--dataset_name_or_path (the LoRA-FA example's training data) and --train_file both name "
                "the training data; give one of them"
            )
        out += ["--dataset_name", aliases.dataset_name_or_path]
    if aliases.lorafa:
        agree("--lorafa", "--method", canon.method, "lora-fa")
        out += ["--method", "lora-fa"]
    if aliases.quantize:
        dtype = quantize_compute_dtype()
        agree("--quantize", "--load_in_4bit", canon.load_in_4bit, True)
        agree("--quantize", "--load_in_8bit", canon.load_in_8bit, False)
        agree("--quantize", "--bnb_4bit_quant_type", canon.bnb_4bit_quant_type, "nf4")
        agree("--quantize", "--bnb_4bit_use_double_quant", canon.bnb_4bit_use_double_quant, False)
        agree("--quantize", "--bnb_4bit_compute_dtype", canon.bnb_4bit_compute_dtype, dtype)
        out += [
            "--load_in_4bit",
            "true",
            "--bnb_4bit_quant_type",
            "nf4",
            "--bnb_4bit_use_double_quant",
            "false",
            "--bnb_4bit_compute_dtype",
            dtype,
        ]
    return out
