"""Fetch a DeepSpeed ZeRO-3 partitioned model's parameters one module at a time while someone
else's forward and backward passes run.

A model partitioned by ``deepspeed.zero.Init`` (or transformers' ZeRO-3 loading) *before*
``deepspeed.initialize`` has no engine hook that gathers a layer's partitions when it runs. Where
loralab owns the loop it runs the model block by block (:mod:`loralab.core.offload`); where the
caller owns it (PEFT's ``preprocess_loraga(model, config, train_step)``, whose ``train_step`` is the
user's own forward and backward), loralab cannot reorder anything, and gathering the whole model on
every rank for the duration (:func:`loralab.core.distributed.gathered_zero3_model`) defeats ZeRO-3.
:func:`fetching_zero3_parameters` instead does what DeepSpeed's engine does, with public hooks only:

- **forward**: a pre-hook on each module that owns partitioned parameters all-gathers them
  (``deepspeed.zero.GatheredParameters``, no broadcast back) and a post-hook partitions them again;
- **what autograd saves**: a tensor saved for backward that is (a view of) a gathered parameter is
  not kept (that would hold every layer whole until the backward); a ``torch.autograd.graph.
  saved_tensors_hooks`` pack hook stores the parameter and the view's geometry instead, and the
  unpack hook gathers the parameter again when the backward needs it and rebuilds the view;
- **backward**: the parameter gathered for one backward node stays whole until the next one is
  gathered (so at most two are whole at once, plus the ones below), since the view rebuilt for a
  node keeps its storage alive while the node runs, releasing earlier is safe; a parameter whose
  gradient autograd accumulates stays whole until its post-accumulate-grad hook fires (autograd
  lays the gradient out like the parameter, which must then have its whole shape): a weight two
  modules share (a head tied to the token embeddings) stays whole from its first use in the backward
  until the last contribution to its gradient arrives. Tested against one process on Llama, GPT-2
  (``Conv1D``, tied head) and T5 (encoder-decoder, tied head), with gradient checkpointing and frozen
  weights.

Every gather is a collective over the parameter's process group, and the ranks gather in the same
order because they run the same forward and backward (the caller's ``train_step`` must run the same
number of passes on every rank, as for any ZeRO-3 training step). A parameter read outside its own
module's call (a parent's forward reading a child's ``weight``) is not fetched and has no elements:
such models fail loudly (a shape error), as they do under DeepSpeed's engine without
``register_external_parameter``. A copy made from a gathered weight (``weight.to(bfloat16)`` under
autocast) is a new tensor, kept by autograd like any activation.

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> model, batch = tiny_llama(), make_lm_batches(1)[0]
    >>> with fetching_zero3_parameters(model):  # not partitioned: nothing to do
    ...     model(**batch).loss.backward()
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from loralab.core.distributed import (
    _WHOLE,
    _is_partitioned_now,
    _is_zero3_param,
    _refuse_zero3_engine,
)

__all__ = ["fetching_zero3_parameters"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _SavedView:
    """What the pack hook keeps instead of a saved view of a gathered parameter."""

    param: nn.Parameter
    size: torch.Size
    stride: tuple[int, ...]
    offset: int  # storage offset relative to the parameter's own first element


class _Fetcher:
    """The gathers one :func:`fetching_zero3_parameters` block holds, and its hooks' logic."""

    def __init__(self) -> None:
        # id(GatheredParameters block) -> (block, its parameters): one block per gather call
        self.blocks: dict[int, tuple[Any, list[nn.Parameter]]] = {}
        # storage address -> [(param, first element, numel)] of the parameters held whole now
        self.storage: dict[int, list[tuple[nn.Parameter, int, int]]] = {}
        self.forward_blocks: dict[int, list[Any]] = {}  # id(module) -> its open forward gathers
        # whole for a backward node, gradient not yet accumulated
        self.pending_grad: set[int] = set()
        # id(param) -> (gradient pre-hook, post-accumulate hook)
        self.grad_hooks: dict[int, Any] = {}
        self.backward_blocks: list[Any] = []  # gathered by the backward, released lazily
        self.end_queued = False

    def gather(self, params: list[nn.Parameter]) -> Any:
        todo = list({id(p): p for p in params if _is_partitioned_now(p)}.values())
        if not todo:
            return None
        import deepspeed  # only reached with ZeRO-3 partitioned parameters, so deepspeed is present

        block = deepspeed.zero.GatheredParameters(todo)
        block.__enter__()
        self.blocks[id(block)] = (block, todo)
        for p in todo:
            setattr(p, _WHOLE, True)  # loralab's own gathered_parameters leaves it alone
            data = p.data
            self.storage.setdefault(data.untyped_storage().data_ptr(), []).append(
                (p, int(data.storage_offset()), data.numel())
            )
        return block

    def release(self, block: Any) -> None:
        entry = self.blocks.pop(id(block), None)
        if entry is None:
            return
        _, params = entry
        for p in params:
            delattr(p, _WHOLE)
            ptr = p.data.untyped_storage().data_ptr()
            kept = [e for e in self.storage.get(ptr, []) if e[0] is not p]
            if kept:
                self.storage[ptr] = kept
            else:
                self.storage.pop(ptr, None)
        block.__exit__(None, None, None)  # partitions again (no broadcast: nothing was changed)

    def release_backward(self) -> None:
        """Release what the backward gathered, except parameters whose gradient is still arriving."""
        for block in list(self.backward_blocks):
            _, params = self.blocks[id(block)]
            if not any(id(p) in self.pending_grad for p in params):
                self.backward_blocks.remove(block)
                self.release(block)

    def gather_for_backward(self, p: nn.Parameter) -> None:
        # the node before this one is done with its parameters (its rebuilt views keep their
        # storage until it returns): release them first, so at most two nodes' are whole at once
        self.release_backward()
        block = self.gather([p])
        if block is not None:
            self.backward_blocks.append(block)
        if not self.end_queued:  # everything is partitioned again when this backward pass ends
            torch.autograd.Variable._execution_engine.queue_callback(self.end_of_backward)
            self.end_queued = True

    def end_of_backward(self) -> None:
        self.end_queued = False
        self.pending_grad.clear()
        self.release_backward()

    # ---- forward -------------------------------------------------------------------------------
    def pre_forward(self, module: nn.Module, args: Any) -> None:
        self.release_backward()  # a new forward: the last backward's parameters are done
        params = [p for p in module.parameters(recurse=False) if _is_zero3_param(p)]
        for p in params:
            if p.requires_grad and id(p) not in self.grad_hooks:
                # requires_grad may be set after the block opened (an estimate's own mode), so the
                # gradient hooks are placed when the parameter first takes part in a forward
                self.grad_hooks[id(p)] = (
                    p.register_hook(functools.partial(self.gradient_arriving, p)),
                    p.register_post_accumulate_grad_hook(self.accumulated),
                )
        block = self.gather(params)
        self.forward_blocks.setdefault(id(module), []).append(block)

    def post_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = self.forward_blocks.get(id(module))
        if stack:
            block = stack.pop()
            if block is not None:
                self.release(block)

    # ---- saved tensors ---------------------------------------------------------------------------
    def pack(self, t: Tensor) -> Any:
        if t.layout != torch.strided or type(t) not in (Tensor, nn.Parameter) or not self.storage:
            return t
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # no storage (meta, functional wrappers)
            return t
        for p, start, numel in self.storage.get(ptr, ()):
            if p.dtype == t.dtype and start <= t.storage_offset() < start + numel:
                return _SavedView(p, t.size(), t.stride(), int(t.storage_offset()) - start)
        return t

    def unpack(self, saved: Any) -> Tensor:
        if not isinstance(saved, _SavedView):
            return saved
        p = saved.param
        if _is_partitioned_now(p):
            self.gather_for_backward(p)
            if id(p) in self.grad_hooks:  # its gradient follows soon: no gather in between
                self.pending_grad.add(id(p))
        data = p.data
        return data.as_strided(saved.size, saved.stride, data.storage_offset() + saved.offset)

    # ---- gradients -------------------------------------------------------------------------------
    def gradient_arriving(self, p: nn.Parameter, grad: Tensor) -> None:
        # autograd accumulates the gradient into a tensor laid out like the parameter: it must have
        # its whole shape then (a backward that saved no view of it, e.g. an embedding's, gathers here)
        if _is_partitioned_now(p):
            self.gather_for_backward(p)
        self.pending_grad.add(id(p))

    def accumulated(self, p: Tensor) -> None:
        self.pending_grad.discard(id(p))


@contextmanager
def fetching_zero3_parameters(model: nn.Module, what: str = "estimate") -> Iterator[None]:
    """Inside the block, forward and backward passes of a DeepSpeed ZeRO-3 partitioned ``model``
    gather each module's parameters only while it (or its backward) runs (a no-op for any other model).

    For a model partitioned before ``deepspeed.initialize`` (``deepspeed.zero.Init``, transformers'
    ZeRO-3 loading) whose forward and backward passes someone else runs (see the module docstring).
    Per rank, at most the parameters of one module (forward) or of two backward nodes plus those
    whose gradient is being accumulated (backward) are whole at once; everything is partitioned
    again on exit. Gradients of the parameters that require them come out whole (``p.grad`` has the
    weight's shape, as on one process; nothing partitions or averages them). A module hooked by
    ``deepspeed.initialize`` raises ``TypeError`` (``what`` names the operation).

    Example:
        >>> from loralab.core.testing import tiny_llama, make_lm_batches
        >>> model, batch = tiny_llama(), make_lm_batches(1)[0]
        >>> with fetching_zero3_parameters(model, "my estimate"):
        ...     model(**batch).loss.backward()
        >>> model.model.layers[0].self_attn.q_proj.weight.grad.shape
        torch.Size([64, 64])
    """
    _refuse_zero3_engine(model, what)
    if not any(_is_partitioned_now(p) for p in model.parameters()):
        yield
        return
    fetcher = _Fetcher()
    handles = []
    for module in model.modules():
        if any(_is_zero3_param(p) for p in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(fetcher.pre_forward))
            handles.append(module.register_forward_hook(fetcher.post_forward, always_call=True))
    try:
        with torch.autograd.graph.saved_tensors_hooks(fetcher.pack, fetcher.unpack):
            yield
    finally:
        for h in handles:
            h.remove()
        for pair in fetcher.grad_hooks.values():
            for h in pair:
                h.remove()
        fetcher.pending_grad.clear()
        for block, _ in list(fetcher.blocks.values()):
            fetcher.release(block)
