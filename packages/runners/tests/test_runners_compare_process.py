"""``loralab compare``'s method processes: they die with the comparison, launch without runpy's double
import, and a re-run into the same directory keeps the earlier methods' results (or is refused)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from loralab.runners.cli import main as loralab_main
from loralab.runners.compare import run_compare
from loralab.runners.compare.process import worker_command
from loralab.runners.compare.testing import smoke_config
from loralab.runners.preflight import PreflightError

ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and its descendants if it is still running."""
    if proc.poll() is None:
        for p in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            p.kill()
        proc.wait()


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_child_armed_with_die_with_parent_dies_with_it(tmp_path, how):
    # parent (killed here) -> child, started like a method process: die_with_parent() first
    child = textwrap.dedent(
        """
        import time
        from loralab.runners.compare.process import die_with_parent
        die_with_parent()
        print("armed", flush=True)
        time.sleep(300)
        """
    )
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", {child!r}], stdout=sys.stdout)
        print(p.pid, flush=True)
        time.sleep(300)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=ENV
    )
    child_pid = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "armed"
    proc.send_signal(how)
    proc.wait(timeout=30)
    assert _gone(child_pid, 10), f"the child {child_pid} outlived its parent killed by {how!r}"


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killing_compare_stops_the_method_process(tmp_path, how):
    cmd = [sys.executable, "-c", "import sys; from loralab.runners.cli import main; sys.exit(main())",
           "compare", "--model", "tiny", "--methods", "full", "--steps", "100000", "--batch_size", "2",
           "--eval_every", "0", "--max_length", "16", "--max_train_samples", "8", "--max_eval_samples", "8",
           "--threads", "1", "--no_progress", "--output_dir", str(tmp_path)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "runs" / "full.jsonl"
    deadline = time.monotonic() + 600
    try:
        # the metrics schema's per-step record (kind "train")
        while not (metrics.exists() and '"kind": "train"' in metrics.read_text()):
            assert proc.poll() is None, "compare ended before its method trained"
            assert time.monotonic() < deadline, "the method never started training"
            time.sleep(0.5)
        (worker,) = psutil.Process(proc.pid).children()
        proc.send_signal(how)
        code = proc.wait(timeout=60)
    finally:  # a failed wait must not leave a 100000-step comparison running
        _kill_tree(proc)
    if how == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM  # it waited for the method process, then exited
    assert _gone(worker.pid, 15), f"the method process kept training after compare got {how!r}"
    size = metrics.stat().st_size
    time.sleep(2)
    assert metrics.stat().st_size == size  # nothing writes into the run any more


def test_worker_is_launched_without_runpy_double_import(tmp_path):
    # ``python -m loralab.runners.compare.worker`` warned "found in sys.modules after import of package"
    spec = tmp_path / "bad.spec.json"
    spec.write_text("{}")
    done = subprocess.run(
        worker_command(str(spec)), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0  # an empty spec: the worker itself ran and refused it
    assert "RuntimeWarning" not in done.stderr and "found in sys.modules" not in done.stderr
    assert "RunSpec" in done.stderr


@pytest.mark.slow
def test_rerun_keeps_earlier_methods_and_refuses_other_settings(tmp_path):
    out = tmp_path / "cmp"
    run_compare(smoke_config(str(out), methods=["full"]), command="first")
    summaries = run_compare(smoke_config(str(out), methods=["lora"]), command="second")
    assert list(summaries) == ["full", "lora"]
    assert all(s["status"] == "ok" for s in summaries.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records if r["kind"] == "summary"} == {"full", "lora"}
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| lora |" in table
    assert "kept from an earlier run in this directory (same settings): full" in table
    assert json.loads((out / "config.json").read_text())["methods"] == ["full", "lora"]
    for log in (out / "runs").glob("*.log"):
        assert "found in sys.modules" not in log.read_text()
    # other settings: refused before any method process, naming them old -> new
    with pytest.raises(
        PreflightError, match=r"holds a comparison with other settings \(steps 2 → 3; seed 42 → 7\)"
    ):
        run_compare(smoke_config(str(out), methods=["lora"], steps=3, seed=7))
    assert json.loads((out / "config.json").read_text())["steps"] == 2  # untouched


def test_rerun_with_other_settings_fails_fast_from_the_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text(
        json.dumps({"steps": 150, "task": "embedded", "methods": ["full"]})
    )
    code = loralab_main(
        ["compare", "--model", "tiny", "--steps", "5", "--output_dir", str(tmp_path)]
    )
    assert code == 2
    assert "other settings (steps 150 → 5)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
