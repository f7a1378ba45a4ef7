"""Estimate the mean full-weight gradient of each target layer over a few batches.

Gradient-initialised methods (LoRA-GA, LoRA-SB) need ``G = mean_b ∇_W L(batch_b)`` for every adapted
weight ``W`` (as an (out, in) matrix). :func:`estimate_gradients` computes it with:

- fp32 accumulation whatever the weights' dtype, and only the target weights requiring grad;
- per-parameter post-accumulate hooks that move each gradient into its fp32 buffer and free
  ``weight.grad`` at once, so no second copy of the gradients lives in the parameter dtype;
- an all-reduce (mean) across ranks under ``torch.distributed`` so every rank gets the same result;
- a per-layer ``consumer(name, grad)`` that receives each finished gradient, after which loralab
  drops its reference: a method turns the gradient into factors and holds only those. With
  ``offload=True`` (see :mod:`loralab.core.offload`) gradients finish block by block, so at most one
  block's gradients exist at any time;
- two orders for the plain path. *Hooks*: ordinary backward passes, batch by batch, each target's
  float32 sum kept until the last batch (every target's sum exists at the end, as PEFT's
  ``weight.grad``). *Block-wise* (``blockwise``): the offload algorithm in place, nothing moved:
  the boundary hidden states of every batch are recorded, then block by block from the last one its
  backward runs over all batches, its gradients are finished and handed to the consumer, so at most
  one block's sums (and one block's autograd graph) exist. The default picks block-wise when it holds
  less: a consumer is given, the model is on one device (not inside a DDP / DeepSpeed wrapper; a
  ZeRO-3 partitioned model is always block-wise, below; an FSDP2 one needs each block sharded on its
  own, below), its blocks are found, and the boundary activations of all batches stay under the
  gradient sums it saves (checked on the first batch's recording; otherwise the batches read so far
  are replayed on the hook path, and the log says why). Both orders compute the same float32
  operations, summed over batches in the same order;
- the model's train/eval mode, ``requires_grad`` flags and existing ``.grad`` restored afterwards;
- FSDP2 (``torch.distributed.fsdp.fully_shard``): the estimate runs on the sharded model itself (below);
- DeepSpeed ZeRO-3 before ``deepspeed.initialize`` (``deepspeed.zero.Init``, transformers' ZeRO-3
  loading): the estimate runs block by block (below), never on the whole model.

DeepSpeed ZeRO-3. No engine hook fetches the partitions of a model partitioned before
``deepspeed.initialize``, and gathering it whole on every rank would defeat ZeRO-3 (a model larger
than one device). So a partitioned model always takes the block-wise order, with each part gathered
only while it runs (``deepspeed.zero.GatheredParameters``, no broadcast back): the glue (embeddings,
final norm, head) for each batch's recording and head pass, each block inside the recording for its
own call, and each block again, alone, for its backward over all batches. Each block's float32 sums
are whole on every rank (the gathered weight's gradient, this rank's batches); they are all-reduced
(mean) one layer at a time, as under DDP, and handed to the consumer once the block is partitioned
again, so the consumer gathers only the layer it writes (LoRA-GA's ``W0`` offset and factors,
LoRA-SB's ``B``, ``R``, ``A``). Every rank ends with the same gradients, equal to one process's on
all the batches. Peak per rank: one block plus the glue gathered, one block's sums, and the boundary
hidden states of this rank's batches (on the CPU with ``offload=True``, which otherwise runs the
same way: DeepSpeed decides where a gathered block lives, so another ``device`` is refused). Every
gather is a collective: the ranks check before each batch that all of them have one
(``GradientEstimationError`` on every rank otherwise), and a model whose blocks are not found, or
not called once each per forward, raises (``no_split_module_classes`` names the blocks).
``blockwise=False`` asks for the hook path instead, for architectures the block-wise order cannot
handle: each module's parameters are gathered only while its forward or backward runs
(:func:`loralab.core.zero3_fetch.fetching_zero3_parameters`, what DeepSpeed's engine does with its
own hooks), so the whole model is never gathered, but every batch's activations live until its
backward as in any training step. A module hooked by ``deepspeed.initialize`` raises ``TypeError`` (estimate
before it).

FSDP2. The choice is to estimate on the sharded model, as a training step would, not before
``fully_shard`` (which would need the whole model on every rank) nor with hooks on the gathered
weights (which would hold every layer's whole gradient across batches). It works because:

- ``requires_grad`` can be toggled after ``fully_shard``: FSDP2 copies each sharded parameter's flag
  to its gathered twin every time it all-gathers it (``FSDPParam.to_unsharded``), so the frozen base
  weights of a PEFT model get gradients inside :func:`~loralab.core.estimation.estimation_mode` and
  are frozen again after it;
- each backward's whole gradient of a block exists only while FSDP2 reduce-scatters it (exactly as in
  training); the reduce-scatter averages it over the ranks, and FSDP2 then runs the parameter's
  post-accumulate-grad hooks on the sharded parameter, where this rank's rows are added into a float32
  sum (in the weight's storage layout) and ``.grad`` is freed. No further all-reduce is made;
- a gradient is finished one layer at a time: the layer's rows are all-gathered
  (:func:`loralab.core.sharding.gather_rows`) into the whole (out, in) matrix on every rank, checked,
  handed to the consumer, and dropped before the next layer's gather.

The order is block-wise by default, whatever the size of the boundary activations (as under ZeRO-3:
the order that bounds a rank's sums and autograd graph to one block), when each decoder block is its
own FSDP2 module
(``fully_shard`` on each block, then the root, as training shards a transformer), and FSDP2 runs a
block called alone exactly as inside the model (all-gather before its forward, reduce-scatter into
the hooks after its backward). So the recording (no grad) runs the sharded model through FSDP2's
hooks, each block gathered only for its own call; the head passes run the glue with the blocks as
stand-ins (their FSDP2 hooks silenced: no block is gathered); then, from the last block, each block
runs alone over every batch (``torch.autograd.backward`` with the adjoint of its outputs), its
targets' rows are summed by the hooks, and the block's layers are gathered and handed to the
consumer before the block before it runs. Every rank runs the same blocks and batches in the same
order (each gather and reduce-scatter is a collective); the ranks check before each batch that all of
them have one (``GradientEstimationError`` on every rank otherwise). Where the order cannot apply
(no block found, a block that is not an FSDP2 module of its own, a target outside every block such as
a head, blocks not called once each in a fixed order), the default takes the hook path on the
sharded model and logs why; ``blockwise=True`` raises ``ValueError`` naming the reason.
:func:`estimate_gradients_from_step` (the caller's own loop) always takes the hook path.

Memory per rank under FSDP2, block-wise: the model's shards; this rank's float32 row sums of one
block's targets (``1/world`` of one block's gradients); the recorded boundary hidden states of this
rank's batches (``batches × (blocks + 1) × local tokens × hidden``); one block gathered with its
autograd graph for one batch (or the glue's for a head pass); and one whole (out, in) gradient (plus
what the consumer makes of it) at a time while finishing. On the hook path the sums are those of every
target (``1/world`` of all target gradients, as a training step's sharded float32 gradients) and the
saved activations those of one batch through every block (the forward runs whole before its
backward). With the shard, a float32 rank thus holds about ``1/world`` of the model plus one block on
the block-wise order, against ``(1 + s)/world`` on the hook path, ``s`` the targets' share of the
parameters (measured in benchmarks/lora_ga_init.py ``--fsdp2``).

Every rank receives the same whole gradient (an all-gather has no reduction order), so a deterministic consumer gives identical results on every rank with no broadcast; the price
is that each rank runs every layer's consumer (redundant compute, not memory). Every function here is
then a collective: call it on every rank, with the same targets. ``offload=True`` and ``reduce=False``
are refused with sharded targets (the shards already bound memory; FSDP2 always averages).

Example:
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> from loralab.core.gradients import estimate_gradients
    >>> model = tiny_llama()
    >>> grads = estimate_gradients(model, make_lm_batches(2), progress=False)
    >>> grads["model.layers.0.self_attn.q_proj"].shape
    torch.Size([64, 64])
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, islice
from typing import Any, Union, cast

import torch
from torch import Tensor, nn

from loralab.core import gradient_sums
from loralab.core.distributed import (
    _is_zero3_partitioned,
    all_reduce_mean_,
    is_distributed,
    is_main_process,
    unwrap_model,
)
from loralab.core.estimation import (
    GradientConsumer,
    GradientEstimationError,
    LossFn,
    check_finite,
    default_loss,
    estimation_mode,
)
from loralab.core.sharding import all_ranks_agree, gather_rows, is_dtensor
from loralab.core.targets import TargetLayer, find_targets, to_storage_layout
from loralab.core.zero3_fetch import fetching_zero3_parameters

__all__ = [
    "GradientConsumer",
    "GradientEstimationError",
    "default_loss",
    "estimate_gradients",
    "estimate_gradients_from_step",
    "resolve_targets",
]

logger = logging.getLogger(__name__)

Targets = Union[str, Sequence[str], Mapping[str, TargetLayer]]


def resolve_targets(model: nn.Module, targets: Targets) -> dict[str, TargetLayer]:
    """Turn ``"all-linear"``, a regex, a name list, or an existing mapping into ``{name: TargetLayer}``."""
    if isinstance(targets, Mapping):
        if not targets:
            raise GradientEstimationError("targets is an empty mapping: nothing to estimate")
        return dict(targets)
    return find_targets(model, targets)


def _check_float_weights(targets: Mapping[str, TargetLayer]) -> None:
    quantized = [f"{n} ({t.kind})" for n, t in targets.items() if t.is_quantized]
    if quantized:
        raise GradientEstimationError(
            "cannot estimate full-weight gradients of quantized layers: "
            + ", ".join(quantized[:5])
            + (" ..." if len(quantized) > 5 else "")
            + ". Estimate on a float copy of the same checkpoint (loralab.core.quant.load_float_model_for_estimation, "
            "with offload=True to bound memory), then initialise the quantized model from those gradients."
        )


def _distinct_weights(targets: Mapping[str, TargetLayer]) -> list[nn.Parameter]:
    """The targets' weights; tied weights (one tensor, two targets) are refused."""
    weights = [t.weight for t in targets.values()]
    if len({id(w) for w in weights}) != len(weights):
        raise GradientEstimationError(
            "two targets share one weight tensor (tied weights); exclude one of them"
        )
    return weights


def _check_sharding(targets: Mapping[str, TargetLayer], *, reduce: bool, offload: bool) -> bool:
    """Whether any target weight is a ``DTensor`` (FSDP2); refuses what cannot apply to one."""
    sharded = [n for n, t in targets.items() if is_dtensor(t.weight)]
    if not sharded:
        return False
    if offload:
        raise ValueError(
            f"offload=True streams the blocks of a whole model, but target {sharded[0]!r} is sharded by "
            "FSDP2 (fully_shard): estimate with offload=False, the shards already bound the memory"
        )
    if not reduce:
        raise ValueError(
            f"reduce=False cannot apply to target {sharded[0]!r}, sharded by FSDP2 (fully_shard): its "
            "reduce-scatter always averages the gradient over the ranks"
        )
    return True


def _check_reached(
    targets: Mapping[str, TargetLayer], acc: gradient_sums.GradientSums, sharded: bool, what: str
) -> None:
    """Raise naming the targets no backward pass reached; under FSDP2 every rank raises together."""
    missing = [name for name in targets if name not in acc.sums]
    if sharded and not all_ranks_agree(not missing, (t.weight for t in targets.values())):
        if not missing:  # only another rank lacks one: raise here too, or this rank would hang
            raise GradientEstimationError(
                f"a target layer received no gradient {what} on another rank (FSDP2): every rank must "
                "reach every target; exclude the unused layers from the targets"
            )
    if missing:
        raise GradientEstimationError(
            f"{len(missing)} target layer(s) received no gradient {what}: "
            + ", ".join(missing[:10])
            + ". Exclude them from the targets."
            + (" (FSDP2: the layer's weight got no gradient on this rank.)" if sharded else "")
        )


def _finish(
    targets: Mapping[str, TargetLayer],
    acc: gradient_sums.GradientSums,
    divisor: Callable[[str], int],
    reduce: bool,
    consumer: GradientConsumer | None,
) -> dict[str, Tensor]:
    """Mean, reduce across ranks (plain) or gather the rows (FSDP2), check, and hand out one layer at a
    time, in module order (the same on every rank: the reductions and gathers are collectives)."""
    for name in targets:
        g = acc.sums.pop(name).div_(divisor(name))
        if name in acc.fsdp:
            t = targets[name]
            # the whole (out, in) mean gradient on every rank, this layer only
            g = to_storage_layout(t.module, gather_rows(t.weight, g))
        elif reduce:
            all_reduce_mean_(g)
        check_finite(name, g)
        if consumer is not None:
            consumer(name, g)
            del g
        else:
            acc.sums[name] = g
    return {} if consumer is not None else {name: acc.sums[name] for name in targets}


def _progress(
    iterable: Iterable[Any], total: int | None, desc: str, enabled: bool
) -> Iterable[Any]:
    if not enabled or not is_main_process():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False)


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    targets: Targets = "all-linear",
    *,
    num_batches: int | None = None,
    loss_fn: LossFn | None = None,
    consumer: GradientConsumer | None = None,
    offload: bool = False,
    device: torch.device | str | None = None,
    no_split_module_classes: Sequence[str] | None = None,
    train: bool = False,
    reduce: bool = True,
    progress: bool = True,
    blockwise: bool | None = None,
) -> dict[str, Tensor]:
    """Mean gradient of the loss w.r.t. each target weight, as (out, in) float32 matrices.

    Args:
        model: the model (float weights; see :mod:`loralab.core.quant` for quantized models).
        batches: an iterable of batches (dicts of model inputs with ``labels`` unless ``loss_fn`` is
            given), e.g. a ``DataLoader``. Each batch's loss is a mean, and the result is the mean over
            batches: ``G = (1/N) Σ_b ∇_W L_b``.
        targets: ``"all-linear"``, a regex, a list of layer names (as ``peft.LoraConfig``), or a
            ``{name: TargetLayer}`` mapping from :func:`loralab.core.targets.find_targets`.
        num_batches: use at most this many batches (``None``: all of them).
        loss_fn: ``loss_fn(model, batch) -> scalar loss``; defaults to :func:`default_loss`.
        consumer: called as ``consumer(name, grad)`` with each finished gradient, which is then
            dropped; the function returns ``{}``. Without it, all gradients are returned in a dict
            (under FSDP2 that holds every layer's whole gradient: pass a consumer at scale).
        offload: block-wise mode: weights stay on the CPU and one decoder block at a time is moved to
            ``device`` (see :func:`loralab.core.offload.estimate_gradients_offloaded`); on a
            DeepSpeed ZeRO-3 partitioned model: the block-wise estimate with the boundary
            activations on the CPU.
        device: compute device of the offloaded blocks (default: CUDA if available, else CPU).
        no_split_module_classes: block class names for ``offload`` and ``blockwise`` (defaults per
            architecture, see :func:`loralab.core.offload.find_blocks`).
        train: run the model in train mode (dropout on); the default eval mode gives a deterministic
            estimate of the same expected gradient.
        reduce: average the gradients across ranks under ``torch.distributed`` (default on), so every
            rank gets the same result.
        progress: show a tqdm bar over batches (on the main process only).
        blockwise: the order of the plain path (see the module docstring). ``None`` (default):
            block-wise when it holds less memory (with a consumer, a model on one device, its
            blocks found, and the recorded boundary activations of all batches below the gradient
            sums it saves; under FSDP2 whenever each block is its own FSDP2 module and no target
            is outside them), else hooks; the choice is logged. ``True``: block-wise, refused where it
            cannot run; it costs one more forward per batch and keeps ``batches × (blocks + 1)``
            hidden states on the model's device. ``False``: the hook path. ``offload=True`` is
            block-wise by construction (``blockwise=False`` with it is refused). A DeepSpeed ZeRO-3
            partitioned model is always block-wise, one block gathered at a time, unless
            ``blockwise=False``, which gathers each module only while it runs (module docstring).

    Returns:
        ``{name: grad}`` on the weights' device (offload: on the CPU), or an empty dict with a consumer.

    Raises:
        GradientEstimationError: no batch, a target that received no gradient (an unused layer), a
            quantized target, or a non-finite gradient (the message names the layer); ZeRO-3: ranks
            with different numbers of batches, blocks not found (the message offers
            ``blockwise=False``).
        ValueError: ``device`` without ``offload`` (with ``offload`` on a ZeRO-3 model: a device
            other than the one DeepSpeed gathers the blocks on), ``blockwise=False`` with
            ``offload=True``, ``blockwise=True`` where it cannot run (a wrapped model, several
            devices; FSDP2: a block that is not its own FSDP2 module, a target outside every block).
        TypeError: a ZeRO-3 model whose modules ``deepspeed.initialize`` has hooked.

    Example:
        >>> from loralab.core.testing import tiny_gpt2, make_lm_batches
        >>> norms = {}
        >>> estimate_gradients(tiny_gpt2(), make_lm_batches(2), ["c_attn"],
        ...                    consumer=lambda n, g: norms.__setitem__(n, g.norm().item()), progress=False)
        {}
        >>> sorted(norms)
        ['transformer.h.0.attn.c_attn', 'transformer.h.1.attn.c_attn']
    """
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be >= 1 or None, got {num_batches}")
    resolved = resolve_targets(model, targets)
    _check_float_weights(resolved)
    loss_fn = loss_fn or default_loss
    expected = num_batches  # the number of batches the estimate will read, when known
    try:
        n_given = len(cast(Sequence[Any], batches))
        expected = n_given if expected is None else min(expected, n_given)
    except TypeError:  # an iterator, a generator, a DataLoader over an IterableDataset
        pass
    if num_batches is not None:
        batches = islice(batches, num_batches)
    sharded = _check_sharding(resolved, reduce=reduce, offload=offload)
    if offload and blockwise is False:
        raise ValueError(
            "blockwise=False asks for the hook path, but offload=True always estimates block by block; "
            "drop one of them"
        )
    if offload:
        from loralab.core.offload import estimate_gradients_offloaded

        return estimate_gradients_offloaded(
            model,
            batches,
            resolved,
            loss_fn=loss_fn,
            consumer=consumer,
            device=device,
            no_split_module_classes=no_split_module_classes,
            train=train,
            reduce=reduce,
            progress=progress,
            total=num_batches,
        )
    if device is not None:
        raise ValueError(
            "device applies to offload=True only; move the model yourself for the plain path"
        )

    def run_blockwise() -> dict[str, Tensor]:
        from loralab.core.offload import estimate_gradients_blockwise

        return estimate_gradients_blockwise(
            model,
            batches,
            resolved,
            loss_fn=loss_fn,
            consumer=consumer,
            no_split_module_classes=no_split_module_classes,
            train=train,
            reduce=reduce,
            progress=progress,
            total=num_batches,
        )

    if blockwise is not False and _is_zero3_partitioned(model):
        # DeepSpeed ZeRO-3 before deepspeed.initialize: no hook fetches the partitions, so the
        # estimate gathers one block (or the glue) at a time, whatever its memory (see above)
        from loralab.core.offload import _BlockStructureError

        try:
            return run_blockwise()
        except _BlockStructureError as e:
            raise GradientEstimationError(
                f"{e}; or pass blockwise=False to estimate with hooks, which gather each module of "
                "the DeepSpeed ZeRO-3 model only while it runs"
            ) from None
    if blockwise is not False:
        blocker = _blockwise_blocker(model)
        if blockwise and blocker:
            raise ValueError(f"blockwise=True cannot run here: {blocker}")
        if blockwise is None and not blocker and consumer is None:
            blocker = "no consumer (every finished gradient is kept anyway)"
        if blocker:
            logger.info("plain path with hooks: %s", blocker)
        else:
            if blockwise:
                return run_blockwise()
            done, batches = _try_blockwise(
                model,
                batches,
                resolved,
                loss_fn,
                consumer,
                no_split_module_classes,
                train,
                reduce,
                progress,
                num_batches,
                expected,
            )
            if done is not None:
                return done
    # DeepSpeed ZeRO-3 with blockwise=False (asked for): each module's parameters are gathered only
    # while its forward or backward runs (a no-op for any other model)
    with fetching_zero3_parameters(model, "gradient estimate"):
        return _estimate_plain(
            model,
            batches,
            resolved,
            loss_fn,
            consumer,
            train,
            reduce,
            progress,
            num_batches,
            sharded,
        )


def _blockwise_blocker(model: nn.Module) -> str | None:
    """Why the plain path cannot run block by block on this model (``None``: it can)."""
    from loralab.core.offload import model_device

    if any(hasattr(m, "ds_id") for m in model.modules()):
        return "the model's modules are hooked by deepspeed.initialize (ZeRO-3)"
    if unwrap_model(model) is not model:
        return f"the model is wrapped by {type(model).__name__}, whose hooks reduce every backward"
    if model_device(model) is None:
        return "the model's parameters and buffers are on several devices (or on meta)"
    return None


def _try_blockwise(
    model: nn.Module,
    batches: Iterable[Any],
    targets: dict[str, TargetLayer],
    loss_fn: LossFn,
    consumer: GradientConsumer | None,
    no_split_module_classes: Sequence[str] | None,
    train: bool,
    reduce: bool,
    progress: bool,
    total: int | None,
    expected: int | None,
) -> tuple[dict[str, Tensor] | None, Iterable[Any]]:
    """The default's block-wise attempt: ``(result, _)``, or ``(None, batches to replay)`` when it
    does not apply (no block found, blocks not called once each in a fixed order) or would hold more
    than the hook path (its budget: every target's float32 sum minus the largest block's)."""
    from loralab.core.offload import _Declined, _fsdp_blocker, _run, find_blocks, model_device

    try:
        blocks = find_blocks(model, no_split_module_classes)
    except GradientEstimationError:
        logger.info("plain path with hooks: no decoder block found")
        return None, batches
    sharded = any(is_dtensor(t.weight) for t in targets.values())
    if sharded:
        blocker = _fsdp_blocker(blocks, targets)
        if blocker is not None:
            logger.info("plain path with hooks (FSDP2): %s", blocker)
            return None, batches
    grad_bytes = {name: t.weight.numel() * 4 for name, t in targets.items()}
    per_block = [
        sum(b for name, b in grad_bytes.items() if name.startswith(block + ".")) for block in blocks
    ]
    # FSDP2: block-wise whatever the boundary activations' size, as under ZeRO-3 (the order that
    # bounds a rank's sums and graph to one block); only a block structure it cannot order declines
    budget = math.inf if sharded else sum(grad_bytes.values()) - max(per_block)
    if reduce and is_distributed() and expected is None and not sharded:
        # the ranks decide together after their first batch, projecting over the known count
        logger.info("plain path with hooks: the number of batches is unknown (pass num_batches)")
        return None, batches
    device = cast(torch.device, model_device(model))
    it = iter(batches)
    try:
        return (
            _run(
                model,
                it,
                targets,
                loss_fn=loss_fn,
                consumer=consumer,
                device=device,
                act_device=device,
                result_device=device,
                blocks=blocks,
                in_place=True,
                train=train,
                reduce=reduce,
                progress=progress,
                total=total,
                budget=budget,
                expected_batches=expected,
            ),
            it,
        )
    except _Declined as e:
        logger.info("plain path with hooks: %s", e.reason)
        consumed = e.consumed
    return None, chain(consumed, it)


def _estimate_plain(
    model: nn.Module,
    batches: Iterable[Any],
    targets: dict[str, TargetLayer],
    loss_fn: LossFn,
    consumer: GradientConsumer | None,
    train: bool,
    reduce: bool,
    progress: bool,
    total: int | None,
    sharded: bool,
) -> dict[str, Tensor]:
    acc = gradient_sums.GradientSums()
    weights = _distinct_weights(targets)
    n = 0
    with (
        estimation_mode(model, weights, train),
        gradient_sums.summing_gradients(targets, acc),
        torch.enable_grad(),
    ):
        for batch in _progress(batches, total, "estimating gradients", progress):
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise GradientEstimationError(
                    f"non-finite loss ({loss.item()}) on batch {n}; the gradient would be NaN"
                )
            loss.backward()
            n += 1
    if n == 0:
        raise GradientEstimationError(
            "no batches: the data iterable was empty (check the dataloader and num_batches)"
        )
    _check_reached(targets, acc, sharded, "(unused in the forward pass?)")
    logger.info("estimated gradients of %d layers over %d batches", len(acc.sums), n)
    return _finish(targets, acc, lambda name: n, reduce, consumer)


def estimate_gradients_from_step(
    model: nn.Module,
    train_step: Callable[[], None],
    targets: Targets = "all-linear",
    *,
    consumer: GradientConsumer | None = None,
    train: bool = True,
    reduce: bool = True,
) -> dict[str, Tensor]:
    """Mean gradient of each target weight over the backward passes ``train_step()`` runs.

    For callers that own the forward/backward loop (PEFT's ``preprocess_loraga(model, config,
    train_step)`` contract): ``train_step`` runs any number of ``loss.backward()`` calls on ``model``;
    each target's gradient is summed in float32 as it arrives (its ``.grad`` is freed at once, as in
    :func:`estimate_gradients`) and divided by the number of backward passes that reached it, then
    averaged across ranks (``reduce``) and handed to ``consumer`` one layer at a time. A model
    partitioned by DeepSpeed ZeRO-3 before ``deepspeed.initialize`` has each module's parameters
    gathered only while its forward or backward runs
    (:func:`~loralab.core.zero3_fetch.fetching_zero3_parameters`); a consumer that reads or writes a
    weight gathers it itself.

    Args:
        model: the model ``train_step`` runs (float target weights).
        train_step: ``() -> None``; runs forward and backward passes.
        targets: as :func:`estimate_gradients`.
        consumer: ``consumer(name, grad)`` per finished gradient (then dropped); without it the
            gradients are returned.
        train: train mode during ``train_step`` (PEFT's default for this contract); ``False``: eval mode.
        reduce: average across ranks under ``torch.distributed``.

    Raises:
        GradientEstimationError: a quantized target, a target no backward pass reached (the message
            names it), shared weights, or a non-finite gradient.

    Example:
        >>> from loralab.core.testing import tiny_llama, make_lm_batches
        >>> model, batches = tiny_llama(), make_lm_batches(2)
        >>> def train_step():
        ...     for b in batches:
        ...         model(**b).loss.backward()
        >>> grads = estimate_gradients_from_step(model, train_step, ["q_proj"])
        >>> sorted(grads)[0], grads["model.layers.0.self_attn.q_proj"].shape
        ('model.layers.0.self_attn.q_proj', torch.Size([64, 64]))
    """
    resolved = resolve_targets(model, targets)
    _check_float_weights(resolved)
    sharded = _check_sharding(resolved, reduce=reduce, offload=False)
    weights = _distinct_weights(resolved)
    acc = gradient_sums.GradientSums()
    with (
        # a DeepSpeed ZeRO-3 partitioned model: each module gathered only while its forward or
        # backward runs, since the loop is the caller's and cannot be run block by block
        fetching_zero3_parameters(model, "gradient estimate"),
        estimation_mode(model, weights, train),
        gradient_sums.summing_gradients(resolved, acc),
        torch.enable_grad(),
    ):
        train_step()
    _check_reached(
        resolved, acc, sharded, "from train_step (unused in its forward passes, or no backward?)"
    )
    logger.info(
        "estimated gradients of %d layers over %d backward passes",
        len(acc.sums),
        max(acc.counts.values()),
    )
    return _finish(resolved, acc, lambda name: acc.counts[name], reduce, consumer)
