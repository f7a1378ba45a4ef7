"""The metamath entrypoint as a script path, for launchers that take one:

    torchrun --nproc-per-node 8 packages/runners/scripts/metamath.py --method lora-ga ...
    deepspeed --num_gpus 8 packages/runners/scripts/metamath.py --deepspeed zero2 ...
    accelerate launch --config_file packages/runners/configs/accelerate/multi_gpu.yaml packages/runners/scripts/metamath.py ...

(the same as `python -m loralab.runners.metamath`, `torchrun -m loralab.runners.metamath`, `deepspeed --module loralab.runners.metamath`).
"""

import sys

from loralab.runners.metamath import main

if __name__ == "__main__":
    from loralab.runners.cli import run_entrypoint

    sys.exit(run_entrypoint(main, sys.argv[1:], prog="metamath.py"))
