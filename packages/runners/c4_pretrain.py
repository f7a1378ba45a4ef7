"""Pre-train LLaMA on C4: ``python|torchrun|deepspeed packages/runners/c4_pretrain.py --model_config llama_60m ...``.

A thin launcher for :mod:`loralab.runners.c4` (see packages/runners/C4.md for the flags).
"""

import sys

from loralab.runners.c4.cli import main
from loralab.runners.cli import run_entrypoint

if __name__ == "__main__":
    sys.exit(run_entrypoint(main, sys.argv[1:], prog="c4_pretrain.py"))
