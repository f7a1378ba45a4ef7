import sys

from loralab.runners.c4.cli import main
from loralab.runners.cli import run_entrypoint

sys.exit(run_entrypoint(main, sys.argv[1:], prog="python -m loralab.runners.c4"))
