"""The winogrande entrypoint as a script path, for launchers that take one:

    torchrun --nproc-per-node 8 packages/runners/scripts/winogrande.py --method lora-ga ...
    deepspeed --num_gpus 8 packages/runners/scripts/winogrande.py --deepspeed zero2 ...
    accelerate launch --config_file packages/runners/configs/accelerate/multi_gpu.yaml packages/runners/scripts/winogrande.py ...

(the same as `python -m loralab.runners.winogrande`, `torchrun -m loralab.runners.winogrande`, `deepspeed --module loralab.runners.winogrande`).
"""

import sys

from loralab.runners.winogrande import main

if __name__ == "__main__":
    from loralab.runners.cli import run_entrypoint

    sys.exit(run_entrypoint(main, sys.argv[1:], prog="winogrande.py"))
