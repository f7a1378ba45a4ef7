"""The glue entrypoint as a script path, for launchers that take one:

    torchrun --nproc-per-node 8 packages/runners/scripts/glue.py --method lora-ga ...
    deepspeed --num_gpus 8 packages/runners/scripts/glue.py --deepspeed zero2 ...
    accelerate launch --config_file packages/runners/configs/accelerate/multi_gpu.yaml packages/runners/scripts/glue.py ...

(the same as `python -m loralab.runners.glue`, `torchrun -m loralab.runners.glue`, `deepspeed --module loralab.runners.glue`).
"""

import sys

from loralab.runners.glue import main

if __name__ == "__main__":
    from loralab.runners.cli import run_entrypoint

    sys.exit(run_entrypoint(main, sys.argv[1:], prog="glue.py"))
