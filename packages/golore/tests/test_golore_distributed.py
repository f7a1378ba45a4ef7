"""GaLore/GoLore under DDP and as a DeepSpeed client optimizer (2 CPU ranks, gloo)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("golore_dist_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode, tmp_path, timeout=300):
    prefix = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(_free_port()),
        str(WORKER),
        mode,
        str(prefix),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return prefix


@pytest.mark.multiprocess
def test_ddp_ranks_stay_identical_with_random_projectors(tmp_path):
    prefix = _launch("ddp", tmp_path)
    p0, p1 = torch.load(f"{prefix}.0.pt"), torch.load(f"{prefix}.1.pt")
    for name in p0:
        assert torch.equal(p0[name], p1[name]), (
            name
        )  # same averaged gradient, same seeded projectors


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_stage0_trains_and_zero2_raises_a_clear_error(tmp_path):
    pytest.importorskip("deepspeed")
    prefix = _launch("zero0", tmp_path, timeout=600)
    assert open(f"{prefix}.0.txt").read() == "ok"
    p0, p1 = torch.load(f"{prefix}.0.pt"), torch.load(f"{prefix}.1.pt")
    for name in p0:
        assert torch.equal(p0[name], p1[name]), name
    prefix = _launch("zero2", tmp_path, timeout=600)
    msg = open(f"{prefix}.0.txt").read()
    assert "flat partitions" in msg and "stage = 0" in msg
