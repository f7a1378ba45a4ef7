"""Block-wise offloaded gradient estimation: weights on the CPU, one block at a time on the device.

The LoRA-GA seed estimates the gradients of a model larger than the accelerator by moving its
decoder blocks to the device one at a time. It loops batches outside and blocks inside, so every
block's gradient is only final after the *last* batch, and all of them are held until then. Here the
loops are swapped (blocks outside, batches inside), so block ``i``'s gradient is final as soon as its
backward over all batches is done: it is reduced, handed to the consumer and freed before block
``i − 1`` starts. Peak device memory is about one block's weights and gradients plus the "glue"
(embeddings, final norm, head) plus the boundary activations of one batch; the boundary activations
of every batch are kept on ``activation_device`` (the CPU by default).

How it works, for batches ``b`` and blocks ``k`` (in execution order):

1. **Record** (no grad): a normal forward of each batch with every block moved to the device only for
   its own call; each block's inputs ``in_k`` and outputs ``O_k`` are kept (the boundary activations).
2. **Head pass**: the forward again with every block replaced by a stand-in that returns its recorded
   ``O_k`` as leaf tensors, so only the glue runs. Backward gives ``D_k = ∂L/∂O_k`` through the glue,
   and shows how the blocks are wired: an input of block ``k`` that *is* an output of block ``j`` is an
   identity edge (Llama, GPT-2, BERT: the hidden state; T5: the position bias).
3. **Backward, block by block in reverse**: the adjoint of block ``i``'s outputs is
   ``T_i = D_i + Σ_{k>i} (∂in_k/∂O_i)ᵀ T'_k``, where ``T'_k`` is the adjoint of block ``k``'s inputs
   from its own backward. For identity edges the sum is a copy; when glue sits between blocks (T5's
   encoder → decoder ``encoder_hidden_states`` through the final layer norm) ``T_i`` is obtained by
   differentiating ``S = L + Σ_{k>i} ⟨in_k, T'_k⟩`` w.r.t. ``O_i`` through one stand-in glue pass (the
   general mode; exact, it costs one glue forward per block and batch). Block ``i`` is then re-run on
   its recorded inputs with grad and back-propagated with ``T_i``: its targets' gradients accumulate,
   and ``T'_i`` goes to the blocks before it.
4. Targets outside every block (only when asked for, e.g. ``include_heads``) get
   ``∂S/∂θ`` with ``S = L + Σ_k ⟨in_k, T'_k⟩`` in a last glue pass (in the identity-wired case, ``∂L/∂θ``
   from the head pass).

This is backprop in a different order, so it equals :func:`loralab.core.gradients.estimate_gradients`'s
plain path up to float round-off (tests: tiny Llama, GPT-2, RoBERTa and T5, max relative difference
≤ 1e-5 in float32). Each block must be called once per forward (true of every supported
architecture); ``train=True`` re-uses the recording's RNG state for each block's recomputation.

The same machinery runs **in place** for the plain path (``estimate_gradients(..., blockwise=...)``,
:func:`estimate_gradients_blockwise`): every weight stays where it is, the boundary activations stay
on the model's device, and nothing is moved; what it buys is the gradient memory (one block's sums
at a time instead of every target's until the last batch, and one block's autograd graph instead of
the whole model's). Its cost is the boundary activations of *every* batch, about
``batches × (blocks + 1) × tokens × hidden`` numbers, and one more forward per batch (the recording).

On a DeepSpeed ZeRO-3 partitioned model (``deepspeed.zero.Init`` before ``deepspeed.initialize``)
both entry points run in place and gather each part only while it runs: the glue around each
recording, head pass and glue pass, each block inside the recording for its own call (a forward
pre-hook gathers it, the forward hook partitions it again), and each block alone for its backward
over all batches (``on_device``). So a rank never holds more than one block plus the glue gathered;
each block's sums are all-reduced after its backward and handed to the consumer once it is
partitioned again. ``offload=True`` keeps the boundary activations on ``activation_device``; the
weights stay where DeepSpeed keeps them. See :mod:`loralab.core.gradients` for the rules (equal
batch counts on every rank, no ``deepspeed.initialize`` hooks).

On an FSDP2 model (``fully_shard`` on each block, then the root) the in-place order runs through
FSDP2's own hooks: the recording gathers each block for its own call, the stand-in passes silence the
blocks' hooks (no block is gathered), and each block runs alone with ``torch.autograd.backward`` so
that FSDP2 reduce-scatters its gradients into the targets' post-accumulate hooks, where this rank's
rows are summed; a finished layer's rows are all-gathered whole for the consumer. See
:mod:`loralab.core.gradients` for what a rank holds.

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.core.gradients import estimate_gradients
    >>> grads = estimate_gradients(tiny_llama(), make_lm_batches(2), offload=True, device="cpu", progress=False)
    >>> grads["model.layers.1.mlp.down_proj"].shape
    torch.Size([64, 128])
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from loralab.core import gradient_sums
from loralab.core.distributed import (
    _is_partitioned_now,
    _is_zero3_partitioned,
    _refuse_zero3_engine,
    all_reduce_mean_,
    gathered_parameters,
    is_distributed,
    is_main_process,
)
from loralab.core.estimation import (
    GradientConsumer,
    GradientEstimationError,
    LossFn,
    check_finite,
    default_loss,
    estimation_mode,
)
from loralab.core.host_memory import release_freed_host_memory
from loralab.core.sharding import gather_rows, is_dtensor
from loralab.core.targets import TargetLayer, to_storage_layout

__all__ = [
    "DEFAULT_BLOCK_CLASSES",
    "estimate_gradients_blockwise",
    "estimate_gradients_offloaded",
    "find_blocks",
]

logger = logging.getLogger(__name__)

DEFAULT_BLOCK_CLASSES: tuple[str, ...] = (
    # decoder-only LMs
    "LlamaDecoderLayer",
    "MistralDecoderLayer",
    "MixtralDecoderLayer",
    "Qwen2DecoderLayer",
    "Qwen3DecoderLayer",
    "GemmaDecoderLayer",
    "Gemma2DecoderLayer",
    "Phi3DecoderLayer",
    "GPT2Block",
    "GPTNeoXLayer",
    "OPTDecoderLayer",
    # encoder-decoder: T5's encoder and decoder stacks are both made of T5Block
    "T5Block",
    "MT5Block",
    # encoders
    "BertLayer",
    "RobertaLayer",
    "XLMRobertaLayer",
    "DebertaV2Layer",
)
"""Block classes recognised without ``no_split_module_classes``; other models fall back to their
``_no_split_modules`` (transformers' list for ``device_map``), minus embedding modules."""


class _BlockStructureError(GradientEstimationError):
    """The model's blocks cannot be streamed: none found, or not called once each, in one fixed order,
    per forward pass."""


def _class_name(module: nn.Module) -> str:
    """The module's class name; for a module FSDP2's ``fully_shard`` wrapped (its class replaced by
    ``FSDP<Class>``, a subclass of ``(FSDPModule, Class)``), the original class's."""
    cls = type(module)
    bases = cls.__bases__
    if (
        len(bases) == 2
        and bases[0].__name__ == "FSDPModule"
        and cls.__name__ == f"FSDP{bases[1].__name__}"
    ):
        return bases[1].__name__
    return cls.__name__


def find_blocks(
    model: nn.Module, no_split_module_classes: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The outermost sub-modules whose class name is a block class, in module order (a block
    ``fully_shard``-ed by FSDP2 is found under its own class name).

    Raises:
        GradientEstimationError: no block found; the message lists the classes tried.

    Example:
        >>> from loralab.core.testing import tiny_t5
        >>> list(find_blocks(tiny_t5()))  # encoder and decoder stacks
        ['encoder.block.0', 'encoder.block.1', 'decoder.block.0', 'decoder.block.1']
    """
    if no_split_module_classes is None:
        names = set(DEFAULT_BLOCK_CLASSES)
        present = {_class_name(m) for m in model.modules()}
        if not names & present:
            fallback = getattr(model, "_no_split_modules", None) or []
            names = {c for c in fallback if "Embedding" not in c}
    else:
        if isinstance(no_split_module_classes, str):
            no_split_module_classes = [no_split_module_classes]
        names = set(no_split_module_classes)
    blocks: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        if _class_name(mod) in names and not any(name.startswith(b + ".") for b in blocks):
            blocks[name] = mod
    if not blocks:
        raise _BlockStructureError(
            f"block-wise estimation (offload=True, blockwise=True) found no block of {type(model).__name__}: "
            f"tried classes {sorted(names) or '[]'}. Pass no_split_module_classes=['YourDecoderLayer'] naming "
            "the repeated block class"
        )
    return blocks


# --------------------------------------------------------------------------------------------------
# small tree helpers: a block's inputs are (args, kwargs), its output any pytree of tensors
# --------------------------------------------------------------------------------------------------


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, Tensor) else x


def _check_all_ran(off: _Offloader) -> None:
    """After the first recording: every block holding targets ran (as a block) in the forward pass.

    A target the loss reaches some other way (its block's submodule called directly) gets no gradient
    block by block: the automatic mode takes the hook path then, explicit block-wise modes raise.
    """
    never_ran = [
        off.block_names[k]
        for k in range(len(off.blocks))
        if k not in (off.order or []) and off.block_targets[k]
    ]
    if never_ran:
        raise _BlockStructureError(
            f"blocks {never_ran} never ran in the forward pass, so their targets would get no gradient "
            "block by block; exclude them (or estimate with blockwise=False, which follows the loss however "
            "it reaches the layers)"
        )


class _Declined(Exception):
    """Automatic mode only: block-wise streaming does not apply to this model or would hold more than
    the hook path; ``consumed`` are the batches read so far, to be replayed there."""

    def __init__(self, reason: str, consumed: list[Any]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.consumed = consumed


def _size(nbytes: float) -> str:
    """``nbytes`` for a message: ``"3.2 MiB"``, ``"34.1 KiB"``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, Tensor):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


@dataclass
class _Record:
    """One block's boundary activations for one batch."""

    in_leaves: list[Any]
    in_spec: Any
    out_leaves: list[Any]
    out_spec: Any
    rng: Any = None


@dataclass
class _Batch:
    records: dict[int, _Record] = field(default_factory=dict)
    # head pass results: D_k[c] = ∂L/∂O_k[c] for output components that receive a gradient
    direct: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    # identity edges: (consumer block k, input leaf c) -> (producer block j, output leaf m)
    edges: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    # input leaves of block k that need an adjoint (identity or glue edges)
    grad_inputs: dict[int, list[int]] = field(default_factory=dict)
    # adjoints of block inputs, T'_k[c] (kept until used; all of them in general mode)
    in_adjoints: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    # accumulated adjoints of block outputs from identity edges
    out_adjoints: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    glue_rng: Any = None

    def nbytes(self) -> int:
        """Bytes this batch keeps between passes (boundary activations and head-pass adjoints)."""
        kept = [x for r in self.records.values() for x in r.in_leaves + r.out_leaves]
        return _storage_bytes(kept + list(self.direct.values()))


def _zero3_parts(
    model: nn.Module, blocks: Sequence[nn.Module]
) -> tuple[list[list[nn.Parameter]], list[nn.Parameter]]:
    """The DeepSpeed ZeRO-3 parameters partitioned now, split into each block's and the rest (the
    glue: embeddings, final norm, head), each list in module order (the same on every rank).

    A parameter is listed once, under the first block holding it, or under the glue when it is
    outside every block. One whole block (or the glue) is all a rank holds gathered at a time.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> model = tiny_llama()  # not partitioned: nothing to gather
        >>> _zero3_parts(model, list(find_blocks(model).values()))
        ([[], []], [])
    """
    seen: set[int] = set()
    per_block: list[list[nn.Parameter]] = []
    for b in blocks:
        mine = [p for p in b.parameters() if _is_partitioned_now(p) and id(p) not in seen]
        seen.update(id(p) for p in mine)
        per_block.append(mine)
    glue = [p for p in model.parameters() if _is_partitioned_now(p) and id(p) not in seen]
    return per_block, glue


class _Offloader:
    def __init__(
        self,
        model: nn.Module,
        blocks: dict[str, nn.Module],
        targets: dict[str, TargetLayer],
        loss_fn: LossFn,
        device: torch.device,
        activation_device: torch.device,
        train: bool,
        in_place: bool = False,
        zero3: bool = False,
        fsdp: bool = False,
    ) -> None:
        self.model = model
        # FSDP2 (fully_shard, each block its own FSDP module): every block runs through FSDP2's hooks
        # (all-gather, reduce-scatter into the targets' post-accumulate hooks), except as a stand-in
        self.fsdp = fsdp
        # in place (the plain path's block-wise mode): nothing is moved, every block runs where it is
        self.in_place = in_place
        self.block_names = list(blocks)
        self.blocks = list(blocks.values())
        # DeepSpeed ZeRO-3 partitions (deepspeed.zero.Init, before deepspeed.initialize): each
        # block's, and the glue's, are gathered only while that part runs (see _zero3_parts)
        self.block_params, self.glue_params = (
            _zero3_parts(model, self.blocks) if zero3 else ([[] for _ in self.blocks], [])
        )
        self.loss_fn = loss_fn
        self.device = device
        self.act_device = activation_device
        self.train = train
        self.block_targets: list[dict[str, TargetLayer]] = [{} for _ in self.blocks]
        self.glue_targets: dict[str, TargetLayer] = {}
        for name, t in targets.items():
            for k, b in enumerate(self.block_names):
                if name.startswith(b + "."):
                    self.block_targets[k][name] = t
                    break
            else:
                self.glue_targets[name] = t
        self.index = {id(b): k for k, b in enumerate(self.blocks)}
        self.order: list[int] | None = None  # execution order of blocks (indices into self.blocks)

    # -------------------------------------------------------------- devices
    @contextmanager
    def placed(self) -> Any:
        """Glue on the device, blocks on the CPU (their home) for the whole estimation; restored after."""
        if self.in_place:
            yield
            return
        in_block = {id(p) for b in self.blocks for p in b.parameters()} | {
            id(t) for b in self.blocks for t in b.buffers()
        }
        moved: list[tuple[Tensor, torch.device]] = []
        block_homes = [
            next((p.device for p in b.parameters()), torch.device("cpu")) for b in self.blocks
        ]
        try:
            for t in list(self.model.parameters()) + list(self.model.buffers()):
                if id(t) not in in_block and t.device != self.device:
                    moved.append((t, t.device))
                    t.data = t.data.to(self.device)
            for b, home in zip(self.blocks, block_homes):
                if home.type != "cpu":
                    b.to("cpu")
            yield
        finally:
            for t, dev in moved:
                t.data = t.data.to(dev)
            for b, home in zip(self.blocks, block_homes):
                b.to(home)

    def gathered_glue(self) -> Any:
        """ZeRO-3: the glue's (embeddings, final norm, head) partitions whole inside the block."""
        return gathered_parameters(self.glue_params) if self.glue_params else nullcontext()

    @contextmanager
    def on_device(self, block: nn.Module) -> Any:
        """``block`` ready to run: on the device (offload) and, under ZeRO-3, gathered whole."""
        with gathered_parameters(self.block_params[self.index[id(block)]]):
            if self.in_place or self.device.type == "cpu":
                yield
                return
            block.to(self.device)
            try:
                yield
            finally:
                block.to("cpu")

    def _rng_state(self) -> Any:
        if not self.train:
            return None
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return (torch.get_rng_state(), cuda)

    def _set_rng(self, state: Any) -> None:
        if state is None:
            return
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)

    def _loss(self, batch: Any) -> Tensor:
        if isinstance(batch, Mapping):
            batch = {k: _to(v, self.device) for k, v in batch.items()}
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise GradientEstimationError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
            )
        return loss

    # -------------------------------------------------------------- 1. record
    def record(self, batch: Any, n: int) -> _Batch:
        rec = _Batch()
        memo: dict[
            int, tuple[Tensor, Tensor]
        ] = {}  # id(live tensor) -> (live, stored): one copy per object
        order: list[int] = []
        handles = []
        gathers: dict[int, ExitStack] = {}  # ZeRO-3: the blocks gathered now (one, between hooks)

        def store(x: Any) -> Any:
            if not isinstance(x, Tensor):
                return x
            hit = memo.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            s = x.detach().to(self.act_device)
            memo[id(x)] = (x, s)
            return s

        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            k = self.index[id(module)]
            if k in rec.records:
                raise _BlockStructureError(
                    f"block {self.block_names[k]!r} ran twice in one forward pass; block-wise estimation "
                    "(offload=True, blockwise=True) needs every block (no_split_module_classes) called once per forward"
                )
            order.append(k)
            if self.block_params[k]:  # ZeRO-3: this block whole for its own call only
                gathers[k] = ExitStack()
                gathers[k].enter_context(gathered_parameters(self.block_params[k]))
            if self.device.type != "cpu" and not self.in_place:
                module.to(self.device)
            leaves, spec = tree_flatten((args, kwargs))
            rec.records[k] = _Record([store(x) for x in leaves], spec, [], None, self._rng_state())

        def post(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            k = self.index[id(module)]
            leaves, spec = tree_flatten(output)
            r = rec.records[k]
            r.out_leaves = [store(x) for x in leaves]
            r.out_spec = spec
            if self.device.type != "cpu" and not self.in_place:
                module.to("cpu")
            if k in gathers:
                gathers.pop(k).close()
            release_freed_host_memory()

        for b in self.blocks:
            handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(b.register_forward_hook(post, with_kwargs=True))
        try:
            with torch.no_grad(), self.gathered_glue():
                loss = self._loss(batch)
        finally:
            for h in handles:
                h.remove()
            for stack in gathers.values():  # a forward that raised inside a block
                stack.close()
        if not torch.isfinite(loss):
            raise GradientEstimationError(
                f"non-finite loss ({loss.item()}) on batch {n}; the gradient would be NaN"
            )
        if self.order is None:
            self.order = order
        elif order != self.order:
            raise _BlockStructureError(
                f"batch {n} ran the blocks in a different order than batch 0; block-wise estimation "
                "(offload=True, blockwise=True) needs a fixed block order"
            )
        return rec

    # -------------------------------------------------------------- stand-in (glue-only) passes
    @contextmanager
    def stand_ins(
        self, rec: _Batch, outputs: dict[int, list[Any]], seen: dict[int, list[Any]]
    ) -> Any:
        """Replace every block's forward by one returning ``outputs[k]``; record live inputs in ``seen``."""

        def make(k: int) -> Callable[..., Any]:
            def forward(*args: Any, **kwargs: Any) -> Any:
                seen[k], _ = tree_flatten((args, kwargs))
                return tree_unflatten(outputs[k], rec.records[k].out_spec)

            return forward

        # FSDP2: a stand-in runs none of its block's weights, so none of the block's forward hooks
        # either: they would all-gather the block, and their backward hooks would gather it again and
        # keep it whole until the end of the backward (every block at once)
        silenced = (
            [(b, b._forward_pre_hooks, b._forward_hooks) for b in self.blocks] if self.fsdp else []
        )
        try:
            for k in self.order or []:
                self.blocks[k].forward = make(k)
            for b, _, _ in silenced:
                b._forward_pre_hooks, b._forward_hooks = OrderedDict(), OrderedDict()
            yield
        finally:
            for b, pre, post in silenced:
                b._forward_pre_hooks, b._forward_hooks = pre, post
            for b in self.blocks:
                if "forward" in vars(b):
                    del b.forward

    def _outputs(
        self, rec: _Batch, grad_of: Callable[[int, int], bool]
    ) -> tuple[dict[int, list[Any]], dict[tuple[int, int], Tensor]]:
        outputs: dict[int, list[Any]] = {}
        leaves: dict[tuple[int, int], Tensor] = {}
        for k in self.order or []:
            out = []
            for m, x in enumerate(rec.records[k].out_leaves):
                x = _to(x, self.device)
                if _is_float(x) and grad_of(k, m):
                    x = x.detach().requires_grad_(True)
                    leaves[(k, m)] = x
                out.append(x)
            outputs[k] = out
        return outputs, leaves

    def head_pass(self, batch: Any, rec: _Batch, glue_sums: dict[str, Tensor]) -> bool:
        """Glue-only forward with every block output a leaf: ``D_k``, the wiring, glue targets' ∂L/∂θ.

        Returns True when every gradient-carrying block input is an identity edge.
        """
        with self.gathered_glue():
            return self._head_pass(batch, rec, glue_sums)

    def _head_pass(self, batch: Any, rec: _Batch, glue_sums: dict[str, Tensor]) -> bool:
        rec.glue_rng = self._rng_state()
        outputs, leaves = self._outputs(rec, lambda k, m: True)
        by_id = {id(v): key for key, v in leaves.items()}
        seen: dict[int, list[Any]] = {}
        with self.stand_ins(rec, outputs, seen), torch.enable_grad():
            loss = self._loss(batch)
        identity_only = True
        for k in self.order or []:
            need = []
            for c, x in enumerate(seen.get(k, [])):
                if not isinstance(x, Tensor) or not x.requires_grad:
                    continue
                need.append(c)
                src = by_id.get(id(x))
                if src is not None and leaves[src] is x:
                    rec.edges[(k, c)] = src
                else:
                    identity_only = False
            rec.grad_inputs[k] = need
        keys = list(leaves)
        glue = list(self.glue_targets.items())
        inputs = [leaves[key] for key in keys] + [t.weight for _, t in glue]
        grads: Sequence[Tensor | None]
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        else:
            grads = [None] * len(inputs)
        for key, g in zip(keys, grads[: len(keys)]):
            if g is not None:
                rec.direct[key] = g.detach().to(self.act_device)
        if identity_only:
            for (name, t), g in zip(glue, grads[len(keys) :]):
                if g is not None:
                    _accumulate(glue_sums, name, to_storage_layout(t.module, g))
        return identity_only

    def glue_adjoint(
        self, batch: Any, rec: _Batch, i: int, params: Sequence[Tensor] = ()
    ) -> tuple[dict[int, Tensor], list[Tensor | None]]:
        """General mode: ``∂S/∂O_i`` (and ``∂S/∂params``) with ``S = L + Σ_k ⟨in_k, T'_k⟩`` via one glue pass."""
        with self.gathered_glue():
            return self._glue_adjoint(batch, rec, i, params)

    def _glue_adjoint(
        self, batch: Any, rec: _Batch, i: int, params: Sequence[Tensor]
    ) -> tuple[dict[int, Tensor], list[Tensor | None]]:
        self._set_rng(rec.glue_rng)
        outputs, leaves = self._outputs(rec, lambda k, m: k == i)
        seen: dict[int, list[Any]] = {}
        with self.stand_ins(rec, outputs, seen), torch.enable_grad():
            s = self._loss(batch)
            for (k, c), adj in rec.in_adjoints.items():
                x = seen[k][c]
                if x.requires_grad:
                    s = s + (x * adj.to(self.device, x.dtype)).sum()
        inputs = list(leaves.values()) + list(params)
        if not inputs or not s.requires_grad:
            return {}, [None] * len(params)
        grads = torch.autograd.grad(s, inputs, allow_unused=True)
        out = {key[1]: g for key, g in zip(leaves, grads[: len(leaves)]) if g is not None}
        return out, list(grads[len(leaves) :])

    # -------------------------------------------------------------- 3. one block, one batch
    def block_backward(
        self, rec: _Batch, k: int, out_adjoint: dict[int, Tensor], sums: dict[str, Tensor]
    ) -> None:
        r = rec.records[k]
        need = rec.grad_inputs.get(k, [])
        leaves = []
        grad_leaves = {}
        for c, x in enumerate(r.in_leaves):
            x = _to(x, self.device)
            if c in need:
                x = x.detach().requires_grad_(True)
                grad_leaves[c] = x
            leaves.append(x)
        args, kwargs = tree_unflatten(leaves, r.in_spec)
        block = self.blocks[k]
        with torch.random.fork_rng(
            devices=[self.device] if self.device.type == "cuda" else [], enabled=self.train
        ):
            self._set_rng(r.rng)
            with torch.enable_grad():
                out = block(*args, **kwargs)
        outs, _ = tree_flatten(out)
        ys, gs = [], []
        for m, adj in out_adjoint.items():
            y = outs[m]
            if isinstance(y, Tensor) and y.requires_grad:
                ys.append(y)
                gs.append(adj.to(y.device, y.dtype))
        if not ys:
            return
        if self.fsdp:
            # FSDP2: the block's whole weights exist only inside this call, so autograd accumulates
            # into them (.grad) and FSDP2's post-backward reduce-scatters each one, averaging it over
            # the ranks, into the sharded weight's post-accumulate hook (gradient_sums.summing_gradients, open
            # around this block's batches): this rank's rows go into the block's float32 sums there
            torch.autograd.backward(ys, gs)
            for c, x in grad_leaves.items():
                if x.grad is not None:
                    rec.in_adjoints[(k, c)] = x.grad.detach().to(self.act_device)
            return
        targets = self.block_targets[k]
        weights = [t.weight for t in targets.values()]
        inputs = weights + list(grad_leaves.values())
        grads = torch.autograd.grad(ys, inputs, gs, allow_unused=True)
        for (name, t), g in zip(targets.items(), grads[: len(weights)]):
            if g is not None:
                _accumulate(sums, name, to_storage_layout(t.module, g))
        for c, g in zip(grad_leaves, grads[len(weights) :]):
            if g is not None:
                rec.in_adjoints[(k, c)] = g.detach().to(self.act_device)


def _fsdp_blocker(blocks: Mapping[str, nn.Module], targets: Mapping[str, Any]) -> str | None:
    """Why the block-wise order cannot run on a model sharded by FSDP2 (``None``: it can).

    Each block must be an FSDP2 module of its own (``fully_shard`` on each block, as for training):
    FSDP2 gathers a block's weights only inside the forward of a module it wraps, so a block run alone
    needs its own. Targets outside every block (a head) are refused: their gradient would be taken
    through the glue's gathered weights, which only a whole backward reduce-scatters.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> from loralab.core.targets import find_targets
        >>> model = tiny_llama()  # not sharded: no block is an FSDP2 module
        >>> _fsdp_blocker(find_blocks(model), find_targets(model))
        "block 'model.layers.0' is not an FSDP2 module of its own (apply fully_shard to each block)"
    """
    from torch.distributed.fsdp import FSDPModule

    plain = [name for name, b in blocks.items() if not isinstance(b, FSDPModule)]
    if plain:
        return f"block {plain[0]!r} is not an FSDP2 module of its own (apply fully_shard to each block)"
    outside = [n for n in targets if not any(n.startswith(b + ".") for b in blocks)]
    if outside:
        return (
            f"target {outside[0]!r} is outside every block (FSDP2 reduces its gradient only in a "
            "whole backward)"
        )
    return None


def _same_count(
    batches: Iterable[Any], check: bool, device: torch.device, engine: str = "DeepSpeed ZeRO-3"
) -> Iterator[Any]:
    """``batches``; with ``check`` (ZeRO-3 or FSDP2 across ranks: every recording gathers each
    block, a collective), the ranks agree before each batch that all of them have one, and raise
    together when some rank has run out (the gathers would pair different batches, or hang)."""
    it = iter(batches)
    n = 0
    while True:
        try:
            batch, more = next(it), 1.0
        except StopIteration:
            batch, more = None, 0.0
        if check:
            have = all_reduce_mean_(torch.tensor([more], device=device)).item()
            if 0.0 < have < 1.0:
                mine, theirs = (f"more than {n}", str(n)) if more else (str(n), f"more than {n}")
                raise GradientEstimationError(
                    f"{engine}: this rank has {mine} batch(es), another rank {theirs}; the "
                    "block-wise estimate gathers every block for each batch on all ranks together, so "
                    "every rank needs the same number of batches (num_batches, or even shards)"
                )
        if not more:
            return
        yield batch
        n += 1


def _accumulate(sums: dict[str, Tensor], name: str, g: Tensor) -> None:
    # g is a fresh autograd result (or a transposed view of one): we own it, no copy needed
    g = g.detach().float()
    if name in sums:
        sums[name].add_(g)
    else:
        sums[name] = g.contiguous()


def _default_device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


@contextmanager
def _no_cache(model: nn.Module) -> Any:
    # A KV cache object is updated in place by the blocks and would not survive re-running them.
    saved = []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None):
            saved.append(cfg)
            cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in saved:
            cfg.use_cache = True


def estimate_gradients_offloaded(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Mapping[str, TargetLayer],
    *,
    loss_fn: LossFn | None = None,
    consumer: GradientConsumer | None = None,
    device: torch.device | str | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    train: bool = False,
    reduce: bool = True,
    progress: bool = True,
    total: int | None = None,
    activation_device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Block-wise offloaded :func:`~loralab.core.gradients.estimate_gradients` (see the module docstring).

    Usually called through ``estimate_gradients(..., offload=True)``, which resolves ``targets``.
    On a DeepSpeed ZeRO-3 partitioned model nothing is moved: each block is gathered where DeepSpeed
    keeps it, one at a time, and only the boundary activations go to ``activation_device``.

    Args:
        model: the float model; its weights may live on the CPU (its blocks are returned there).
        batches: the batches (all of them are iterated once and their boundary activations kept).
        targets: ``{name: TargetLayer}``, e.g. from :func:`loralab.core.targets.find_targets`.
        loss_fn: ``loss_fn(model, batch)``; the batch's tensors are already on ``device``.
        consumer: ``consumer(name, grad)`` per finished gradient, called block by block (last block
            first); with it, the result is an empty dict and at most one block's gradients exist.
        device: compute device (default: the current CUDA device, else the CPU; ZeRO-3: the
            partitions' device, and another one is refused).
        no_split_module_classes: block class names (default: :data:`DEFAULT_BLOCK_CLASSES`, else the
            model's ``_no_split_modules``).
        train, reduce, progress: as in :func:`~loralab.core.gradients.estimate_gradients`.
        total: number of batches, for the progress bar only.
        activation_device: where the boundary activations are kept between passes.

    Returns:
        ``{name: grad}`` (fp32, (out, in), on the CPU) in the targets' order, or ``{}`` with a consumer.

    Raises:
        GradientEstimationError: no block found, blocks not called once each in a fixed order, no
            batch, an unused target, a non-finite loss or gradient; ZeRO-3: ranks with different
            numbers of batches.
        ValueError: ZeRO-3: ``device`` other than the partitions' device, or several devices.
        TypeError: a ZeRO-3 model whose modules ``deepspeed.initialize`` has hooked.
    """
    zero3 = _is_zero3_partitioned(model)
    if zero3:
        # DeepSpeed keeps each partition where it put it and gathers a block there: nothing to move
        _refuse_zero3_engine(model, "gradient estimate")
        home = _one_device(model, "offload=True")
        if device is not None and not _same_device(torch.device(device), home):
            raise ValueError(
                f"offload=True on a DeepSpeed ZeRO-3 partitioned model computes where DeepSpeed gathers "
                f"the partitions ({home}), got device={device}: omit device"
            )
        device = home
    else:
        device = torch.device(device) if device is not None else _default_device()
    return _run(
        model,
        batches,
        targets,
        loss_fn=loss_fn,
        consumer=consumer,
        device=device,
        act_device=torch.device(activation_device),
        result_device=torch.device("cpu"),
        blocks=find_blocks(model, no_split_module_classes),
        in_place=zero3,
        train=train,
        reduce=reduce,
        progress=progress,
        total=total,
        zero3=zero3,
    )


def _same_device(a: torch.device, b: torch.device) -> bool:
    # "cuda" names the current CUDA device
    if a.type != b.type:
        return False
    if a.type == "cuda":
        current = torch.cuda.current_device()
        return (a.index if a.index is not None else current) == (
            b.index if b.index is not None else current
        )
    return a.index is None or b.index is None or a.index == b.index


def _one_device(model: nn.Module, what: str) -> torch.device:
    device = model_device(model)
    if device is None:
        raise ValueError(
            f"{what} runs every block where it is, so the model must be on one device; its "
            "parameters and buffers are on several (or on meta): move it"
            + ("" if what == "offload=True" else ", or use offload=True")
        )
    return device


def model_device(model: nn.Module) -> torch.device | None:
    """The one device holding every parameter and buffer of ``model``; ``None`` if several (or meta)."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    if len(devices) != 1:
        return None
    (device,) = devices
    return None if device.type == "meta" else device


def estimate_gradients_blockwise(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Mapping[str, TargetLayer],
    *,
    loss_fn: LossFn | None = None,
    consumer: GradientConsumer | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    train: bool = False,
    reduce: bool = True,
    progress: bool = True,
    total: int | None = None,
) -> dict[str, Tensor]:
    """The plain path block by block, in place: the same algorithm as offload, nothing moved.

    Usually reached through ``estimate_gradients(..., blockwise=True)`` (or its default, which picks
    it when it holds less memory). Every parameter and buffer must be on one device; the boundary
    activations stay there too. With a ``consumer`` at most one block's gradient sums exist at a time
    (plus the targets outside every block, e.g. a head, which are summed over all batches). A
    DeepSpeed ZeRO-3 partitioned model is gathered one block (or the glue) at a time (module
    docstring).

    Args:
        model, batches, targets, loss_fn, consumer, no_split_module_classes, train, reduce, progress,
        total: as in :func:`estimate_gradients_offloaded`.

    Returns:
        ``{name: grad}`` (fp32, (out, in), on the model's device) in the targets' order, or ``{}``
        with a consumer.

    Raises:
        ValueError: the model's parameters and buffers are not on one device.
        GradientEstimationError: as :func:`estimate_gradients_offloaded`; under ZeRO-3 also ranks
            with different numbers of batches.
        TypeError: a ZeRO-3 model whose modules ``deepspeed.initialize`` has hooked.

    Example:
        >>> from loralab.core.testing import tiny_llama, make_lm_batches
        >>> from loralab.core.targets import find_targets
        >>> model = tiny_llama()
        >>> got = estimate_gradients_blockwise(model, make_lm_batches(2), find_targets(model), progress=False)
        >>> got["model.layers.0.mlp.up_proj"].shape
        torch.Size([128, 64])
    """
    device = _one_device(model, "blockwise=True")
    zero3 = _is_zero3_partitioned(model)
    if zero3:
        _refuse_zero3_engine(model, "gradient estimate")
    return _run(
        model,
        batches,
        targets,
        loss_fn=loss_fn,
        consumer=consumer,
        device=device,
        act_device=device,
        result_device=device,
        blocks=find_blocks(model, no_split_module_classes),
        in_place=True,
        train=train,
        reduce=reduce,
        progress=progress,
        total=total,
        zero3=zero3,
    )


def _run(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Mapping[str, TargetLayer],
    *,
    loss_fn: LossFn | None,
    consumer: GradientConsumer | None,
    device: torch.device,
    act_device: torch.device,
    result_device: torch.device,
    blocks: dict[str, nn.Module],
    in_place: bool,
    train: bool,
    reduce: bool,
    progress: bool,
    total: int | None,
    budget: float | None = None,
    expected_batches: int | None = None,
    zero3: bool = False,
) -> dict[str, Tensor]:
    """The block-wise estimate. ``budget`` (automatic mode, ``in_place`` only): raise
    :class:`_Declined` as soon as the boundary activations of all batches (projected over
    ``expected_batches`` when known) would exceed it, or when the blocks' structure does not allow the
    block-wise order; the caller replays the consumed batches on the hook path. ``zero3``
    (``in_place`` only): the DeepSpeed ZeRO-3 partitions are gathered one block (or the glue) at a
    time. Targets sharded by FSDP2 (``in_place`` only): each block runs through FSDP2's own hooks,
    its gradients are summed as this rank's rows and gathered one layer at a time when finished."""
    loss_fn = loss_fn or default_loss
    targets = dict(targets)
    weights = [t.weight for t in targets.values()]
    if len({id(w) for w in weights}) != len(weights):
        raise GradientEstimationError(
            "two targets share one weight tensor (tied weights); exclude one of them"
        )
    fsdp = any(is_dtensor(w) for w in weights)
    if fsdp:
        if not in_place:
            raise ValueError("offload=True cannot stream a model sharded by FSDP2 (fully_shard)")
        if not reduce:
            raise ValueError("reduce=False cannot apply to a model sharded by FSDP2 (fully_shard)")
        blocker = _fsdp_blocker(blocks, targets)
        if blocker is not None:
            raise ValueError(f"blockwise=True cannot run here: {blocker}")
    off = _Offloader(
        model, blocks, targets, loss_fn, device, act_device, train, in_place, zero3, fsdp
    )
    results: dict[str, Tensor] = {}
    done: list[str] = []

    def finish(name: str, g: Tensor, n: int, rows: bool = False) -> None:
        g.div_(n)
        if rows:
            # FSDP2 averaged over the ranks already: gather this layer's rows into the whole
            # (out, in) matrix on every rank (a collective, in the same order everywhere)
            t = targets[name]
            g = to_storage_layout(t.module, gather_rows(t.weight, g))
        elif reduce:
            all_reduce_mean_(g)
        check_finite(name, g)
        g = g.to(result_device)
        done.append(name)
        if consumer is not None:
            consumer(name, g)
        else:
            results[name] = g

    bar = None
    if progress and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=None, desc="block-wise gradients", leave=False)

    try:
        with estimation_mode(model, weights, train), _no_cache(model), off.placed():
            recs: list[_Batch] = []
            batch_list: list[Any] = []
            glue_sums: dict[str, Tensor] = {}
            identity_only = True
            kept = 0
            # automatic mode across ranks: every rank must take the same order (the per-layer
            # all-reduces would pair different layers otherwise), so the ranks decide together, once,
            # after their first batch (projected over the known number of batches)
            multi = budget is not None and reduce and is_distributed()
            check_count = (zero3 or fsdp) and is_distributed()
            engine = "FSDP2" if fsdp else "DeepSpeed ZeRO-3"
            for n, batch in enumerate(_same_count(batches, check_count, device, engine)):
                batch_list.append(batch)
                reason = None
                try:
                    rec = off.record(batch, n)
                    if n == 0:
                        _check_all_ran(off)
                except _BlockStructureError as e:
                    if budget is None or (multi and n > 0):
                        raise
                    reason = str(e)
                else:
                    identity_only &= off.head_pass(batch, rec, glue_sums)
                    recs.append(rec)
                    kept += rec.nbytes()
                if budget is not None and reason is None and (not multi or n == 0):
                    count = max(len(recs), expected_batches or 0)
                    projected = kept / len(recs) * count
                    if projected > budget:
                        reason = (
                            f"the boundary activations of {count} batch(es) (about "
                            f"{_size(projected)}) would exceed the gradient sums the block-wise "
                            f"order saves ({_size(budget)})"
                        )
                if multi and n == 0:
                    declined = torch.tensor([0.0 if reason is None else 1.0], device=device)
                    if all_reduce_mean_(declined).item() > 0 and reason is None:
                        reason = "another rank declined the block-wise order"
                if reason is not None:
                    raise _Declined(reason, batch_list)
                # this batch's forward freed its activations around the few it records
                release_freed_host_memory()
                if bar is not None:
                    bar.update(1)
            n = len(recs)
            if n == 0:
                raise GradientEstimationError(
                    "no batches: the data iterable was empty (check the dataloader and num_batches)"
                )
            order = off.order or []
            if bar is not None:
                bar.reset(total=n * len(order))
                bar.set_description("block-wise backward (blocks)")
            if fsdp:
                # the recording leaves no FSDP2 module gathered (the root keeps its weights whole
                # after a forward, for a training backward that will not come)
                from torch.distributed.fsdp import FSDPModule

                for mod in model.modules():
                    if isinstance(mod, FSDPModule):
                        mod.reshard()
            logger.info(
                "%s: %d blocks, %d batches, %s wiring",
                ("block-wise (in place, FSDP2)" if fsdp else "block-wise (in place)")
                if in_place
                else "offload",
                len(order),
                n,
                "identity" if identity_only else "general (glue between blocks)",
            )
            # 3. blocks in reverse execution order; each block's gradients final after its batches
            for k in reversed(order):
                acc = (
                    gradient_sums.GradientSums()
                )  # FSDP2: this block's targets' rows, summed by their hooks
                sums: dict[str, Tensor] = acc.sums
                with (
                    off.on_device(off.blocks[k]),
                    gradient_sums.summing_gradients(off.block_targets[k], acc)
                    if fsdp
                    else nullcontext(),
                ):
                    for batch, rec in zip(batch_list, recs):
                        if identity_only:
                            adj = {
                                m: rec.direct.pop((kk, m)).to(device)
                                for (kk, m) in list(rec.direct)
                                if kk == k
                            }
                            for m in [m for (kk, m) in rec.out_adjoints if kk == k]:
                                extra = rec.out_adjoints.pop((k, m)).to(device)
                                adj[m] = adj[m] + extra if m in adj else extra
                        else:
                            adj, _ = off.glue_adjoint(batch, rec, k)
                        if adj and (off.block_targets[k] or rec.grad_inputs.get(k)):
                            off.block_backward(rec, k, adj, sums)
                            release_freed_host_memory()
                        if identity_only:
                            # route T'_k to the producers of block k's inputs, then drop it
                            for kk, c in [key for key in rec.in_adjoints if key[0] == k]:
                                g = rec.in_adjoints.pop((kk, c))
                                src = rec.edges[(kk, c)]
                                rec.out_adjoints[src] = (
                                    rec.out_adjoints[src].add_(g) if src in rec.out_adjoints else g
                                )
                        if identity_only:
                            # block k's records are used by no later pass: drop them now
                            rec.records[k].in_leaves = []
                            rec.records[k].out_leaves = []
                        if bar is not None:
                            bar.update(1)
                missing = [name for name in off.block_targets[k] if name not in sums]
                if missing:  # (the same blocks on every rank: under FSDP2 all of them raise here)
                    raise GradientEstimationError(
                        f"{len(missing)} target layer(s) received no gradient (unused in the forward pass?): "
                        + ", ".join(missing[:10])
                        + ". Exclude them from the targets."
                        + (
                            " (FSDP2: the layer's weight got no gradient on this rank.)"
                            if fsdp
                            else ""
                        )
                    )
                for name in off.block_targets[k]:  # same order on every rank (all-reduce)
                    finish(name, sums.pop(name), n, rows=name in acc.fsdp)
                del sums, acc
                # the block's passes freed their activations around the records kept for the
                # blocks before it (see loralab.core.host_memory)
                release_freed_host_memory()
            # 4. targets outside the blocks
            if off.glue_targets:
                if not identity_only:
                    params = [t.weight for t in off.glue_targets.values()]
                    for batch, rec in zip(batch_list, recs):
                        _, grads = off.glue_adjoint(batch, rec, -1, params)
                        for (name, t), gw in zip(off.glue_targets.items(), grads):
                            if gw is not None:
                                _accumulate(glue_sums, name, to_storage_layout(t.module, gw))
                missing = [name for name in off.glue_targets if name not in glue_sums]
                if missing:
                    raise GradientEstimationError(
                        f"{len(missing)} target layer(s) received no gradient (unused in the forward pass?): "
                        + ", ".join(missing[:10])
                    )
                for name in off.glue_targets:
                    finish(name, glue_sums.pop(name), n)
    finally:
        if bar is not None:
            bar.close()
    if consumer is not None:
        return {}
    return {name: results[name] for name in targets if name in results}
