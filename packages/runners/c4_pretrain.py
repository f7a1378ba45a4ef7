"""Pre-train LLaMA on C4: ``python|torchrun|deepspeed packages/runners/c4_pretrain.py --model_config llama_60m ...``.

A thin launcher for :mod:`loralab.runners.c4` (see packages/runners/C4.md for the flags).
"""

from loralab.runners.c4.cli import main

if __name__ == "__main__":
    main()
