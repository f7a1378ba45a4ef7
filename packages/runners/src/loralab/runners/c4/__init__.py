"""loralab.runners.c4: pre-train LLaMA on C4 with AdamW, GaLore, GoLore or the ReLoRA-structure path.

Launch with ``python``, ``torchrun --nproc-per-node N`` or DeepSpeed (``--deepspeed_config``), as
``python -m loralab.runners.c4`` or ``packages/runners/c4_pretrain.py``; see ``packages/runners/C4.md``.

Example:
    >>> from loralab.runners.c4 import MODEL_CONFIGS, parse_args
    >>> MODEL_CONFIGS["llama_60m"]["hidden_size"]
    512
    >>> args = parse_args(["--output_dir", "/tmp/x", "--optimizer", "golore_adamw", "--rand_ratio", "0.8"])
"""

from loralab.runners.c4.args import C4Args, parse_args
from loralab.runners.c4.cli import main
from loralab.runners.c4.data import (
    HubSource,
    ListSource,
    LocalSource,
    SequenceStream,
    TokenizedSource,
    pretokenize,
)
from loralab.runners.c4.model import MODEL_CONFIGS, build_model, load_model_config
from loralab.runners.c4.report import results_table, write_results
from loralab.runners.c4.schedule import get_scheduler, lr_multiplier
from loralab.runners.c4.train import run

__all__ = [
    "MODEL_CONFIGS",
    "C4Args",
    "HubSource",
    "ListSource",
    "LocalSource",
    "SequenceStream",
    "TokenizedSource",
    "build_model",
    "get_scheduler",
    "load_model_config",
    "lr_multiplier",
    "main",
    "parse_args",
    "pretokenize",
    "results_table",
    "run",
    "write_results",
]
