"""Method processes of ``loralab compare`` that never outlive the comparison.

A killed comparison (a job timeout's SIGTERM, SIGKILL, Ctrl-C) must not leave the current method
training and writing into ``--output_dir``. Two mechanisms, one per way of dying:

* the parent turns SIGTERM into ``SystemExit`` while a comparison runs (:func:`exit_on_sigterm`), so
  :func:`run_worker`'s ``finally`` terminates the child and waits for it (SIGINT already raises
  ``KeyboardInterrupt``, which takes the same path);
* the child asks the kernel for SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)`` on Linux,
  a watcher thread polling the parent id elsewhere), which covers SIGKILL, where the parent runs no
  code at all (:func:`die_with_parent`).

The worker is started with ``python -c`` importing :func:`loralab.runners.compare.worker.main`, not
``python -m loralab.runners.compare.worker``: ``-m`` imports the package first, whose ``__init__``
imports the worker module, so runpy then executes a second copy of it as ``__main__`` (and warns
"found in sys.modules after import of package").
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import IO, Any

__all__ = [
    "TERMINATE_TIMEOUT_S",
    "die_with_parent",
    "exit_on_sigterm",
    "run_worker",
    "worker_command",
]

TERMINATE_TIMEOUT_S = 30.0
"""How long a terminated method process may take to exit before it is killed."""

PARENT_ENV = "LORALAB_COMPARE_PARENT_PID"

_BOOTSTRAP = (
    "import sys; from loralab.runners.compare.process import die_with_parent; die_with_parent(); "
    "from loralab.runners.compare.worker import main; sys.exit(main())"
)


def worker_command(spec_path: str) -> list[str]:
    """The command line of one method process (see the module docstring for why ``-c``)."""
    return [sys.executable, "-c", _BOOTSTRAP, spec_path]


def die_with_parent(parent_pid: int | None = None) -> None:
    """Make this process get SIGTERM when its parent dies; exit now if it already has.

    ``parent_pid`` defaults to ``$LORALAB_COMPARE_PARENT_PID`` (set by :func:`run_worker`), else the
    current parent. Called first thing in every method process.
    """
    if parent_pid is None:
        parent_pid = int(os.environ.get(PARENT_ENV, os.getppid()))
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            armed = libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:

        def watch() -> None:
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, daemon=True, name="die-with-parent").start()
    # the parent may have died before prctl ran: then we were re-parented already
    if os.getppid() != parent_pid:
        os._exit(128 + int(signal.SIGTERM))


def run_worker(
    cmd: Sequence[str], *, stdout: int | IO[Any] | None, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], contextlib.AbstractContextManager[None]]:
    """Start ``cmd`` (stderr piped) and return it with a context that terminates it on the way out.

    Leaving the context while the process still runs (an exception, ``SystemExit`` from SIGTERM,
    ``KeyboardInterrupt``) sends it SIGTERM, waits :data:`TERMINATE_TIMEOUT_S`, then SIGKILL.
    """
    proc = subprocess.Popen(
        list(cmd),
        stdout=stdout,
        stderr=subprocess.PIPE,
        env={**env, PARENT_ENV: str(os.getpid())},
    )

    @contextlib.contextmanager
    def reaper() -> Iterator[None]:
        try:
            yield
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=TERMINATE_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    return proc, reaper()


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """While inside, SIGTERM raises ``SystemExit(143)`` (so ``finally`` blocks stop the method process).

    Python's default SIGTERM action ends the process without running any cleanup. Outside the main
    thread (where handlers cannot be installed) this does nothing; the child still dies with us.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
