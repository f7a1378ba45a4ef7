"""Single-process behaviour of the distributed helpers (the 2-rank reductions run in test_core_gradients),
and the end of a 2-rank run (end_process_group_worker.py)."""

import pytest
import torch
from torch import nn

from loralab.core.distributed import (
    all_reduce_mean_,
    all_reduce_mean_dict_,
    broadcast_,
    gathered_parameters,
    is_distributed,
    is_main_process,
    rank,
    unwrap_model,
    world_size,
)


def test_single_process_no_ops():
    assert not is_distributed() and world_size() == 1 and rank() == 0 and is_main_process()
    t = torch.arange(3.0)
    assert all_reduce_mean_(t) is t and torch.equal(t, torch.arange(3.0))
    assert broadcast_(t) is t
    d = {"b": torch.ones(1), "a": torch.zeros(1)}
    assert all_reduce_mean_dict_(d) is d
    params = list(nn.Linear(2, 2).parameters())
    with gathered_parameters(params, modifier_rank=0):  # not ZeRO-3 partitioned: nothing to gather
        params[0].data.zero_()
    assert params[0].abs().sum() == 0


def test_unwrap_model():
    inner = nn.Linear(2, 2)
    DDP = type("DistributedDataParallel", (nn.Module,), {})
    Engine = type("DeepSpeedEngine", (nn.Module,), {})
    ddp, engine = DDP(), Engine()
    ddp.module = inner
    engine.module = ddp
    assert unwrap_model(engine) is inner
    compiled = nn.Module()
    compiled._orig_mod = engine
    assert unwrap_model(compiled) is inner
    assert unwrap_model(inner) is inner
    # a user's module that merely has a .module attribute is not unwrapped
    user = nn.Module()
    user.module = inner
    assert unwrap_model(user) is user


def test_collectives_run_on_a_device_the_backend_serves():
    # DeepSpeed's CPU offload hands an optimizer CPU partitions while NCCL reduces CUDA tensors only:
    # the ZeRO views (and the reductions here) copy to the backend's device and back
    from loralab.core.distributed import _backend_device_type, collective_device

    assert _backend_device_type("cpu", "nccl") == "cuda"
    assert _backend_device_type("cuda", "nccl") == "cuda"
    assert _backend_device_type("cuda", "gloo") == "cpu"  # gloo's gather / scatter are CPU-only
    assert _backend_device_type("cpu", "gloo") == "cpu"
    assert _backend_device_type("cpu", "cpu:gloo,cuda:nccl") == "cpu"  # a per-device backend
    assert _backend_device_type("cuda", "cpu:gloo,cuda:nccl") == "cuda"
    assert _backend_device_type("xpu", "xccl") == "xpu"
    assert _backend_device_type("cpu", "some_plugin") == "cpu"  # unknown: the tensor's own
    assert collective_device(torch.device("cpu")) == torch.device("cpu")  # no process group


def test_end_process_group_in_one_process(tmp_path):
    import torch.distributed as dist

    from loralab.core.distributed import end_process_group

    end_process_group()  # no group: nothing to do
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    end_process_group()
    assert not dist.is_initialized()


@pytest.mark.multiprocess
def test_finished_runs_end_without_aborting_at_the_exit():
    """gloo's workers release a collective's tensors after it returned; in the interpreter's exit that
    aborts the process (SIGABRT after a finished run: 41 of 64 launches of this worker's ``plain``
    mode on a loaded 2-core machine). ``end_process_group`` ends it first: every launch must exit cleanly."""
    from pathlib import Path

    from loralab.core.testing import run_torchrun

    worker = Path(__file__).with_name("end_process_group_worker.py")
    for _ in range(4):
        run_torchrun(worker, "end", timeout=300)
