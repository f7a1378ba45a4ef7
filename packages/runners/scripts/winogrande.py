"""The winogrande entrypoint as a script path, for launchers that take one:

    torchrun --nproc-per-node 8 packages/runners/scripts/winogrande.py --method lora-ga ...
    deepspeed --num_gpus 8 packages/runners/scripts/winogrande.py --deepspeed zero2 ...
    accelerate launch --config_file packages/runners/configs/accelerate/multi_gpu.yaml packages/runners/scripts/winogrande.py ...

(the same as `python -m loralab.runners.winogrande`, `torchrun -m loralab.runners.winogrande`, `deepspeed --module loralab.runners.winogrande`).
"""

import sys

from loralab.runners.winogrande import main

if __name__ == "__main__":
    main(sys.argv[1:])
