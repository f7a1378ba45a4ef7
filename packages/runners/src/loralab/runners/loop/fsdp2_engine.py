"""The FSDP2 engine (``--fsdp full_shard`` / ``shard_grad_op``, accelerate's FSDP2 YAML):
``torch.distributed.fsdp.fully_shard`` on every transformer block and the root under ``torchrun``, with
sharded checkpoints (``torch.distributed.checkpoint``), bf16 mixed precision, CPU offload and rank-0
loading. The :class:`~loralab.runners.loop.engine.Engine` interface it implements is in
:mod:`loralab.runners.loop.engine`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, cast

import torch
from torch import nn

from loralab.core.distributed import collective_device
from loralab.core.quant import (
    check_fsdp_quantized,
    check_fsdp_storage,
    load_quant_statistics_,
    quant_statistics,
    quantized_layer_names,
)
from loralab.runners.loop.engine import TorchEngine, _rng_state, _set_rng_state

logger = logging.getLogger(__name__)

__all__ = ["QUANT_STATISTICS_FILE", "FSDP2Engine", "init_fsdp_process_group"]

QUANT_STATISTICS_FILE = "quant_statistics.pt"
"""An FSDP2 checkpoint's 4-bit statistics (:func:`loralab.core.quant.quant_statistics`)."""


class FSDP2Engine(TorchEngine):
    """FSDP2 (``torch.distributed.fsdp.fully_shard``) under ``torchrun``: every parameter a ``DTensor``
    sharded by rows over the ranks, gathered for each block's forward and backward.

    :meth:`shard` applies ``fully_shard`` to every transformer block (the model's ``_no_split_modules``
    classes; else every direct child holding parameters), to the ``transformers`` model inside a PEFT
    wrapper, and then to the root; the method's optimizer is
    built afterwards on the sharded parameters (loralab's LoRA optimizers gather the small LoRA factors
    through :mod:`loralab.core.sharding`). Gradients are averaged by FSDP2's reduce-scatter;
    :meth:`accumulate` turns that off for all but the last micro-batch. The process group must be up
    (torchrun's environment; :meth:`__init__` initialises it: gloo on CPU, NCCL on CUDA).

    ``reshard_after_forward`` (default ``True``, full shard): free each block's gathered weights after
    its forward and gather them again for its backward (``False``: keep them, one all-gather per step).
    ``wrap_classes``: the class names of the blocks to shard (default: ``_no_split_modules``).
    ``launcher`` names what started the processes in :meth:`describe` (``torchrun`` for ``--fsdp
    full_shard``, ``accelerate`` for the FSDP2 YAML; :func:`loralab.runners.launch.accelerate_fsdp`).

    ``bf16=True`` (``--bf16``): ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``:
    forward and backward in bfloat16 on the gathered parameters, gradients reduced in float32, and the
    sharded parameters, their gradients and the optimizer stay float32 (no autocast).

    ``offload=True`` (``--fsdp "full_shard offload"``, ``fsdp_offload_params: true``): FSDP2's
    ``CPUOffloadPolicy``: the shards and their gradients live on the CPU, each block's weights are
    copied to the accelerator for its forward and backward, and the optimizer steps on the CPU. On an
    accelerator the process group then gets a CPU backend next to the accelerator's (``cpu:gloo``,
    as torchtitan does), so that the optimizers' collectives on CPU shards (GaLore's projections,
    LoRA-Pro's sums, the gradient norm) run there.

    ``rank0_loading=True`` (accelerate's ``fsdp_cpu_ram_efficient_loading: true``): only rank 0 loaded
    the weights, the other ranks built the model on the meta device
    (:func:`loralab.runners.loop.finetune.loads_on_meta`, :func:`loralab.runners.data.load_pretrained`); :meth:`shard`
    shards on the meta device and fills every rank's shards from rank 0's whole state dict, so no rank
    but the first ever holds the whole model in CPU memory.

    Checkpoints: the model through ``torch.distributed.checkpoint`` (``model/``, sharded, every rank
    writes its rows), each rank's optimizer state (its own rows only) in ``optimizer_rank{r}.pt``,
    ``scheduler.pt``, ``rng_state_rank{r}.pt`` and, with a 4-bit base (FSDP-QLoRA), the layers'
    quantization statistics in ``quant_statistics.pt`` (the sharded checkpoint holds their codes only);
    a resume needs the same number of processes (the run
    identity holds it). :meth:`full_state_dict` gathers the whole weights onto the main process for
    ``final/``.
    """

    name = "fsdp2"

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        bf16: bool = False,
        reshard_after_forward: bool = True,
        wrap_classes: tuple[str, ...] | None = None,
        launcher: str = "torchrun",
        offload: bool = False,
        rank0_loading: bool = False,
    ) -> None:
        self.bf16 = bf16
        self.reshard_after_forward = reshard_after_forward
        self.wrap_classes = wrap_classes
        self.launcher = launcher
        self.offload = offload
        self.rank0_loading = rank0_loading
        init_fsdp_process_group(offload=offload)
        super().__init__(device)

    @property
    def gathers_in_forward(self) -> bool:
        return True

    def shard(self, model):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw: dict[str, Any] = {"reshard_after_forward": self.reshard_after_forward}
        if self.offload:
            from torch.distributed.fsdp import CPUOffloadPolicy

            # pinned CPU memory for the copies to the accelerator; there is none to pin for on a CPU
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if self.bf16:
            kw["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=torch.bfloat16, reduce_dtype=torch.float32
            )
        if self.rank0_loading:
            # only rank 0 holds the weights (the others built the model on the meta device): shard on
            # the meta device, then fill every rank's shards from rank 0's whole state dict
            whole = model.state_dict() if self.is_main else {}
            buffers = _non_persistent_buffers(model)
            loaded = [not p.is_meta for p in model.parameters()]  # (no reference kept: freed below)
            logger.info(
                "rank %d: %d of %d parameters loaded here (the others on the meta device); every "
                "rank's shards come from rank 0",
                self.rank,
                sum(loaded),
                len(loaded),
            )
            model = model.to("meta")
        else:
            model = model.to(self.device)
        if self.wrap_classes is not None:
            block_names = set(self.wrap_classes)
            found = {type(m).__name__ for m in model.modules()}
            if not block_names <= found:
                raise ValueError(
                    "fsdp_transformer_layer_cls_to_wrap names classes the model does not have: "
                    f"{sorted(block_names - found)}"
                )
        else:
            block_names = set(getattr(_inner_model(model), "_no_split_modules", None) or ())
        check_fsdp_storage(model)  # before fully_shard, which fails on it in torch < 2.13
        blocks = [m for m in model.modules() if type(m).__name__ in block_names]
        if not blocks:
            blocks = [
                m for m in _inner_model(model).children() if any(True for _ in m.parameters())
            ]
        for block in blocks:
            fully_shard(block, **kw)
        inner = _inner_model(model)
        if inner is not model:
            # a PEFT wrapper's generate() calls the inner model directly, bypassing the root's hooks:
            # the inner model is its own group, so its forward gathers the embeddings and head too
            fully_shard(inner, **kw)
        fully_shard(model, **kw)
        if self.rank0_loading:
            # under CPU offload FSDP2 wants its shards materialised on the CPU (it checks at lazy init)
            shards_on = torch.device("cpu") if self.offload else self.device
            _load_from_rank0(model, whole, buffers, shards_on, self.device)
        # a 4-bit base (FSDP-QLoRA): refuse what would corrupt the sharded codes, before any forward
        check_fsdp_quantized(model)
        self._model = model
        return model

    def prepare(self, model, optimizer, scheduler=None):
        from torch.distributed.fsdp import FSDPModule

        if not isinstance(model, FSDPModule):
            raise RuntimeError(
                "FSDP2Engine.prepare: the model was not sharded; call engine.shard(model) before "
                "building its optimizer (the optimizer must hold the sharded parameters)"
            )
        self.scheduler = scheduler
        self._model = model
        return model, optimizer

    def accumulate(self, model, *, last):
        # gradients are reduce-scattered (averaged) in the last micro-batch's backward only
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model, max_norm):
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return None
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a DTensor: the global norm
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def unwrap(self, model):
        return model  # fully_shard works in place: the model is the user's module

    def full_state_dict(self, model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return sd if self.is_main else None

    def save_state(self, model, optimizer, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=str(directory / "model"))
        # a 4-bit base's codes are in model/; their statistics live on the layers, the same on every
        # rank, and may differ from the checkpoint's (LoRA-GA's re-quantized offset W0)
        if self.is_main and quantized_layer_names(model):
            torch.save(quant_statistics(model), directory / QUANT_STATISTICS_FILE)
        # loralab's optimizers keep plain tensors of this rank's rows (not DTensors): one file per rank
        torch.save(optimizer.state_dict(), directory / f"optimizer_rank{self.rank}.pt")
        if self.is_main and self.scheduler is not None:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        torch.save(_rng_state(), directory / f"rng_state_rank{self.rank}.pt")

    def load_state(self, model, optimizer, directory):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            set_model_state_dict,
        )

        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(directory / "model"))
        set_model_state_dict(model, state["model"])
        load = dict(map_location="cpu", weights_only=True)
        if quantized_layer_names(model):
            load_quant_statistics_(model, torch.load(directory / QUANT_STATISTICS_FILE, **load))
        optimizer.load_state_dict(torch.load(directory / f"optimizer_rank{self.rank}.pt", **load))
        if self.scheduler is not None:
            self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", **load))
        _set_rng_state(torch.load(directory / f"rng_state_rank{self.rank}.pt", weights_only=False))

    def label(self):
        policy = (
            "reshard after forward" if self.reshard_after_forward else "no reshard after forward"
        )
        bf16 = ", bf16 params, fp32 reduce" if self.bf16 else ""
        offload = ", parameters offloaded to cpu" if self.offload else ""
        return f"fsdp2 (fully_shard, {policy}{bf16}{offload}; launched by {self.launcher})"

    def describe(self):
        import torch.distributed as dist

        return {
            **super().describe(),
            "sharding": "fully_shard",
            "launcher": self.launcher,
            "reshard_after_forward": self.reshard_after_forward,
            "backend": dist.get_backend(),
            "mixed_precision": "bf16 (param bfloat16, reduce float32)" if self.bf16 else "no",
            "offload": "cpu (CPUOffloadPolicy)" if self.offload else "none",
            "rank0_loading": self.rank0_loading,
        }


def init_fsdp_process_group(*, offload: bool = False) -> None:
    """Start the process group of an FSDP2 run from torchrun's / accelerate's environment, unless one
    exists: gloo on CPUs, NCCL on GPUs (``cuda:nccl,cpu:gloo`` under CPU offload, so that collectives on
    the CPU shards run too); a group made elsewhere that cannot reduce CPU tensors is refused under
    offload. Entrypoints call it before loading when only rank 0 loads the weights (each rank must
    know its rank to load or to build on the meta device)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                "--fsdp full_shard needs a launcher that sets RANK / WORLD_SIZE (torchrun "
                "--nproc-per-node N ...); it found none"
            )
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
        backend = "gloo" if not cuda else "cuda:nccl,cpu:gloo" if offload else "nccl"
        dist.init_process_group(backend)
    elif offload and collective_device(torch.device("cpu")).type != "cpu":
        # a process group made elsewhere whose backend cannot reduce the CPU shards
        raise RuntimeError(
            f"FSDP2 CPU offload needs a process group that reduces CPU tensors, got backend "
            f"{dist.get_backend()!r}: initialise it with 'cuda:nccl,cpu:gloo' (or let the runner do it)"
        )


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers a state dict leaves out (rotary ``inv_freq``; on the meta device on the ranks that
    built their model there), copied before the model moves to the meta device: rank 0's are
    broadcast."""
    out = {}
    for prefix, module in model.named_modules():
        for name in module._non_persistent_buffers_set:
            buf = module._buffers.get(name)
            if buf is not None:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().clone()
    return out


def _load_from_rank0(
    model: nn.Module,
    whole: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    shards_on: torch.device,
    device: torch.device,
) -> None:
    """Materialise a model sharded on the meta device and fill it from rank 0: the shards (on
    ``shards_on``: the CPU under offload) from rank 0's whole state dict (``broadcast_from_rank0``,
    each rank keeping its rows), the non-persistent buffers broadcast from rank 0 (the other ranks'
    may be placeholders), every buffer on ``device``."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=shards_on)
    set_model_state_dict(
        model,
        cast(Any, whole),  # torch types it as dict[str, ValueType] (invariant)
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True),
    )
    where = collective_device(torch.device(device))
    for name, value in sorted(buffers.items()):
        # the ranks built on the meta device hold no values: room for rank 0's
        value = torch.empty_like(value, device=where) if value.is_meta else value.to(where)
        dist.broadcast(value, src=0)
        module_name, _, buffer_name = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._buffers[buffer_name] = value.to(device)
    if shards_on != device:
        # CPU offload: the shards stay on the CPU, the buffers go where the compute is
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[name] = buf.to(device)


def _inner_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model inside a PEFT wrapper (where ``_no_split_modules`` is declared)."""
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None) if base is not None else None
    return inner if isinstance(inner, nn.Module) else model
