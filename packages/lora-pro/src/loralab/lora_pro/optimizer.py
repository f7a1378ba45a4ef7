"""``LoraProAdamW``: AdamW on LoRA-Pro's adjusted gradients, a real ``torch.optim.Optimizer``.

Two modes (arXiv 2407.18242):

- ``mode="efficient"`` (default; the official code's older ``step_efficient``): adjust the LoRA
  gradients with :func:`~loralab.lora_pro.adjust.lora_pro_gradients` (Theorem 2.1, ``X`` from
  ``x_mode``), then run AdamW on them with LoRA-sized states (two moments per factor).
- ``mode="full"`` (the paper's Algorithm 1, official ``step_full``): run Adam on the optimal
  equivalent gradient ``g̃`` (m×n states per layer — as much optimizer memory as full fine-tuning of
  the adapted weights), then bring the Adam direction ``N`` back to the factors with the same
  adjustment applied to ``(s·BᵀN, s·N·Aᵀ)``, so that the factor update moves ``W`` as close as possible
  to ``−lr·N``.

Layers are paired by module (:func:`loralab.core.find_lora_pairs`), never by parameter order; each
layer's own scaling (α/r, rsLoRA α/√r, rank/alpha patterns) is read from PEFT. Trainable parameters
that are not LoRA factors (a classifier head, ``modules_to_save``, biases) get plain AdamW in the same
optimizer. All layers with equal shapes are adjusted in one batched call (r×r solves on the
parameters' device). Bias correction is right from step 1; weight decay is decoupled.

Under FSDP2 (``fully_shard``: parameters are ``DTensor`` row shards) each step gathers every layer's
(small) factors and gradients whole (:mod:`loralab.core.sharding`), adjusts them as in one process, and
updates this rank's rows only; the optimizer state holds this rank's rows only (in full mode the
m×n moments too: the rows of B's shard, ``g̃`` built for those rows only, with ``s·BᵀN`` summed over
the row shards and ``s·N·Aᵀ`` gathered, so no m×n matrix is ever gathered or built whole). The result equals one process on the whole batch.

Example:
    >>> import peft, torch
    >>> from loralab.core.testing import tiny_llama
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    >>> opt = LoraProAdamW(model, lr=1e-3)
    >>> batch = {"input_ids": torch.randint(0, 100, (2, 8))}
    >>> model(**batch, labels=batch["input_ids"]).loss.backward()
    >>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from loralab.core.adamw import (
    adamw_direction,
    adamw_step_,
    check_adamw_hparams,
    fused_adamw_,
    fused_adamw_available,
    moment_dtype,
)
from loralab.core.linalg import accumulation_dtype
from loralab.core.lora_layers import LoraPair, LoraPairError, find_lora_pairs
from loralab.core.sharding import (
    all_ranks_agree,
    gather_rows,
    local_tensor,
    rows_of,
    sum_over_shards_,
    whole,
)
from loralab.core.zero_views import (
    GroupOriginals,
    ZeroPartition,
    flat_partition,
    full_shape,
    is_zero3_param,
    is_zero_partition,
    zero_partition,
)
from loralab.lora_pro.adjust import (
    X_MODES,
    XMode,
    lora_gradients,
    lora_pro_gradients,
    lora_pro_gradients_buckets,
    optimal_equivalent_gradient,
)

__all__ = ["LoraProAdamW", "Mode", "WeightDecayMode"]

logger = logging.getLogger(__name__)

Mode = Literal["efficient", "full"]
WeightDecayMode = Literal["factors", "effective"]
MODES = ("efficient", "full")
WEIGHT_DECAY_MODES = ("factors", "effective")


def _factor_dtype(like: Tensor) -> torch.dtype:
    """Full mode maps the Adam direction back to the factors in float64 (LoRA-sized work; MPS has
    none): the factor update ``(1/s²)(BᵀB)⁻¹·s·BᵀN`` computed with a float32 inverse is off by about
    ``u·κ(B)²`` along B's large singular directions, which is what moves ``W`` (κ(B) ≈ 10³ a few steps
    after ``B = 0``: 5e-2 relative on a GLUE run; see :mod:`loralab.lora_pro.adjust`, "Precision")."""
    return torch.float32 if like.device.type == "mps" else torch.float64


def _all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every entry is finite: one reduction per tensor, the exact element-wise test only when
    the sums are not finite (which finite tensors can also give, by overflow)."""
    tensors = list(tensors)
    total = sum(
        t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32) for t in tensors
    )
    # callers pass at least one tensor, so the sum is a Tensor, never sum()'s start value 0
    return bool(torch.isfinite(cast(Tensor, total))) or all(
        bool(torch.isfinite(t).all()) for t in tensors
    )


def _grad(t: Tensor) -> Tensor:
    # ``t.grad`` of a tensor the step selected for having one (the checker sees ``Tensor | None``)
    return cast(Tensor, t.grad)


class LoraProAdamW(torch.optim.Optimizer):
    """AdamW on LoRA-Pro's equivalent-gradient-optimal LoRA gradients.

    Args:
        params_or_model: the ``PeftModel`` (or any module with PEFT LoRA layers; its trainable
            parameters are optimised, LoRA pairs found by module), or an iterable of parameters /
            param-group dicts together with ``pairs=``.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        mode: ``"efficient"`` (LoRA-sized Adam states) or ``"full"`` (m×n Adam states on ``g̃``).
        x_mode: ``"sylvester"`` (Theorem 2.3), ``"zero"``, ``"symmetry"`` (official closed form) or
            ``"sylvester_swapped"`` (``AAᵀ·X + X·BᵀB``, lora-pro-adamw's "vec" solver).
        ridge: relative ridge of the r×r inverses; ``0`` = pseudo-inverse (exact minimum-norm
            least squares, handles ``B = 0`` at initialisation).
        jitter: absolute ``jitter·I`` added to ``BᵀB`` and ``AAᵀ`` before every inverse and the
            Sylvester solve (default ``0``; lora-pro-adamw's regularisation, which its drop-in sets).
        weight_decay_mode: ``"factors"`` multiplies A and B by ``1 − lr·λ`` (official efficient mode);
            ``"effective"`` decays the effective weight ``W0 + s·B·A`` by ``1 − lr·λ``: A and B by
            ``√(1 − lr·λ)`` and the frozen base weight by ``1 − lr·λ`` (official full mode). Default:
            ``"effective"`` in full mode, ``"factors"`` in efficient mode.
        pairs: the LoRA pairs when ``params_or_model`` is an iterable of parameters.
        adapter_name: which adapter's pairs to use (default: the active one).
        scaling: override every layer's scaling ``s`` (the seed API's ``scaling_factor``).
        check_finite: raise ``FloatingPointError`` naming the layer when a gradient is NaN/Inf.

    Param groups carry ``mode``, ``x_mode``, ``ridge``, ``jitter`` and ``weight_decay_mode``; a LoRA layer's A and
    B must be in the same group.

    Example:
        >>> # see the module docstring
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        mode: Mode = "efficient",
        x_mode: XMode = "sylvester",
        ridge: float = 0.0,
        jitter: float = 0.0,
        weight_decay_mode: WeightDecayMode | None = None,
        pairs: Iterable[LoraPair] | None = None,
        adapter_name: str | None = None,
        scaling: float | None = None,
        check_finite: bool = True,
    ) -> None:
        check_adamw_hparams(lr, tuple(betas), eps, weight_decay)
        if isinstance(params_or_model, nn.Module):
            model = params_or_model
            self._names = {id(p): n for n, p in model.named_parameters()}
            found = find_lora_pairs(model, adapter_name) if pairs is None else list(pairs)
            params: Any = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"{type(model).__name__} has no trainable parameters")
        else:
            if pairs is None:
                raise TypeError(
                    "LoraProAdamW pairs LoRA factors by module: pass the PeftModel itself "
                    "(LoraProAdamW(model, ...)), or the parameters together with pairs=find_lora_pairs(model)"
                )
            found = list(pairs)
            params = params_or_model
            self._names = {}
        if scaling is not None:
            if not isinstance(scaling, (int, float)) or scaling == 0 or not math.isfinite(scaling):
                raise ValueError(f"scaling must be a non-zero finite number, got {scaling!r}")
            found = [LoraPair(p.name, p.module, p.adapter, p.A, p.B, float(scaling)) for p in found]
        for p in found:
            if p.scaling == 0:
                raise ValueError(
                    f"layer {p.name!r} has scaling 0 (lora_alpha = 0): LoRA-Pro divides by s²"
                )
        self._all_pairs = found
        self._roles: dict[int, tuple[str, LoraPair]] = {}
        for pair in found:
            self._roles[id(pair.A)] = ("A", pair)
            self._roles[id(pair.B)] = ("B", pair)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            mode=mode,
            x_mode=x_mode,
            ridge=ridge,
            jitter=jitter,
            weight_decay_mode=weight_decay_mode,
        )
        self.check_finite = check_finite
        self._originals = GroupOriginals()  # to find each group's parameters in a ZeRO partition
        self._workspace: dict[tuple, tuple[Tensor, Tensor]] = {}  # see _stacking_buffers
        self._own_ids: set[int] = set()
        # efficient mode: per bucket of equal-shape layers, stacked Adam state (see _stacked_state)
        self._stacked: dict[
            tuple[int, ...],
            tuple[list[Tensor], Tensor, tuple[list[Tensor], list[Tensor], list[Tensor]]],
        ] = {}
        super().__init__(params, defaults)
        self._finalise_pairs()

    # ----------------------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adamw_hparams(group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
        if group["mode"] not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {group['mode']!r}")
        if group["x_mode"] not in X_MODES:
            raise ValueError(f"x_mode must be one of {X_MODES}, got {group['x_mode']!r}")
        if not group["ridge"] >= 0:
            raise ValueError(f"ridge must be >= 0, got {group['ridge']!r}")
        if not group["jitter"] >= 0:
            raise ValueError(f"jitter must be >= 0, got {group['jitter']!r}")
        if group["weight_decay_mode"] is None:
            group["weight_decay_mode"] = "effective" if group["mode"] == "full" else "factors"
        if group["weight_decay_mode"] not in WEIGHT_DECAY_MODES:
            raise ValueError(
                f"weight_decay_mode must be one of {WEIGHT_DECAY_MODES}, got {group['weight_decay_mode']!r}"
            )
        if group["weight_decay_mode"] == "effective" and group["mode"] != "full":
            raise ValueError(
                "weight_decay_mode='effective' is the official full mode's rule; use mode='full' or weight_decay_mode='factors'"
            )
        for p in group["params"]:
            self._own_ids.add(id(p))
        self._originals.record(group, len(self.param_groups) - 1)
        if hasattr(self, "_pair_groups"):
            self._finalise_pairs()

    def _finalise_pairs(self) -> None:
        where: dict[int, int] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                where[id(p)] = gi
        pairs: list[LoraPair] = []
        for pair in self._all_pairs:
            ga, gb = where.get(id(pair.A)), where.get(id(pair.B))
            if ga is None and gb is None:
                continue  # a frozen adapter: not ours to train
            if ga is None or gb is None:
                missing, present = ("A", "B") if ga is None else ("B", "A")
                raise LoraPairError(
                    f"layer {pair.name!r}: lora_{present} is optimised but lora_{missing} is not (frozen or left out); "
                    "LoRA-Pro needs both factors of every layer"
                )
            if ga != gb:
                raise LoraPairError(
                    f"layer {pair.name!r}: lora_A is in param group {ga} but lora_B in group {gb}; put both in one group"
                )
            # full_shape: a model built under deepspeed.zero.Init holds empty ZeRO-3 parameters
            a_shape, b_shape = full_shape(pair.A), full_shape(pair.B)
            if a_shape[0] != b_shape[1]:
                raise LoraPairError(
                    f"layer {pair.name!r}: A {tuple(a_shape)} and B {tuple(b_shape)} do not share a rank"
                )
            group = self.param_groups[ga]
            if (
                group["mode"] == "full"
                and group["weight_decay"] > 0
                and group["weight_decay_mode"] == "effective"
            ):
                w = self._base_weight(pair)
                if w is None or not w.is_floating_point():
                    raise ValueError(
                        f"layer {pair.name!r}: weight_decay_mode='effective' decays the base weight, which is "
                        "missing or quantized here; use weight_decay_mode='factors' or weight_decay=0"
                    )
            pairs.append(pair)
        if not pairs:
            logger.warning(
                "LoraProAdamW: no trainable LoRA pair among the parameters; every parameter gets plain AdamW"
            )
        self._pairs = pairs
        self._pair_groups = [where[id(p.A)] for p in pairs]

    @staticmethod
    def _base_weight(pair: LoraPair) -> Tensor | None:
        base = getattr(pair.module, "base_layer", None) if pair.module is not None else None
        return getattr(base, "weight", None)

    def attach_deepspeed(self, engine: Any) -> LoraProAdamW:
        """Check that a DeepSpeed engine (or its ZeRO optimizer) wraps this optimizer; not needed.

        Under DeepSpeed ZeRO (stage 1, 2 or 3) the optimizer finds its parameters in the flat
        partitions DeepSpeed hands it by itself (:mod:`loralab.core.zero_views`); this call is kept
        for code written when it was required, and only checks the wrapping.

        Example:
            >>> # engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
            >>> # opt.attach_deepspeed(engine)  # optional
        """
        inner = getattr(engine, "optimizer", None)
        wrapped = [getattr(c, "optimizer", None) for c in (engine, inner)]
        if not any(w is self for w in wrapped):
            raise TypeError(
                "attach_deepspeed expects the DeepSpeed engine returned by deepspeed.initialize (or its "
                f"ZeRO optimizer) wrapping this optimizer, got {type(engine).__name__}"
            )
        return self

    @property
    def lora_pairs(self) -> list[LoraPair]:
        """The LoRA layers this optimizer adjusts, in module order."""
        return list(self._pairs)

    # ------------------------------------------------------------------------------ state I/O

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state; moments keep the dtype they were saved in (float32 for bf16 parameters).

        ``torch.optim.Optimizer.load_state_dict`` casts every state tensor to its parameter's dtype,
        which would round float32 moments of bf16 parameters (and break exact resume). A state saved
        for another model, LoRA rank or ``mode`` / ``x_mode`` is refused
        (:func:`loralab.core.optim_state.check_state_dict`), naming the parameter and both shapes.
        """
        from loralab.core.optim_state import check_state_dict

        # under FSDP2, of this rank's rows (the state holds them only)
        full_shapes = {
            id(pair.B): (
                full_shape(pair.B)[0] if is_zero3_param(pair.B) else local_tensor(pair.B).shape[0],
                full_shape(pair.A)[1],
            )
            for pair in self._pairs
        }

        def expected(p: Tensor, group: Any) -> dict[str, tuple[int, ...]]:
            # efficient mode: moments of A and B themselves; full mode: (m, n) moments on B's entry
            out = dict.fromkeys(("exp_avg", "exp_avg_sq"), tuple(local_tensor(p).shape))
            if id(p) in full_shapes:
                out.update(dict.fromkeys(("full_exp_avg", "full_exp_avg_sq"), full_shapes[id(p)]))
            return out

        check_state_dict(self, state_dict, expected, settings=("mode", "x_mode"))
        old_groups = list(self.param_groups)
        super().load_state_dict(state_dict)
        self._originals.carry_over(old_groups, self.param_groups)  # torch rebuilt the group dicts
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            saved = state_dict["state"].get(i)
            if saved is None:
                continue
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor):
                    self.state[p][key] = value.to(device=p.device, dtype=value.dtype, copy=True)

    # ----------------------------------------------------------------------------------- step

    @torch.no_grad()
    # torch.optim.Optimizer.step types the closure's result as float; ours returns the loss Tensor
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One optimisation step (LoRA pairs: LoRA-Pro; everything else: AdamW)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Two phases: every group's gradients are adjusted and checked before any parameter or state
        # changes, so a NaN/Inf gradient anywhere raises with the model and optimizer untouched.
        updates: list[Callable[[], None]] = []
        for gi, group in enumerate(self.param_groups):
            if is_zero_partition(group["params"], self._own_ids):
                updates.append(partial(self._zero_step, group))
                continue
            pairs = [p for p, g in zip(self._pairs, self._pair_groups) if g == gi]
            lora_ids = {id(t) for pair in pairs for t in (pair.A, pair.B)}
            plain = [p for p in group["params"] if p.grad is not None and id(p) not in lora_ids]
            if plain:
                self._check_plain(gi, plain)
                updates.append(partial(self._plain_step, group, plain))
            active = []
            for pair in pairs:
                has_a, has_b = pair.A.grad is not None, pair.B.grad is not None
                if not (has_a or has_b):
                    continue
                if has_a != has_b:
                    raise RuntimeError(
                        f"layer {pair.name!r}: lora_{'A' if has_a else 'B'} has a gradient but lora_{'B' if has_a else 'A'} "
                        "has none; LoRA-Pro needs both (was one factor detached from the graph?)"
                    )
                active.append(pair)
            if not active:
                continue
            buckets: dict[tuple, list[LoraPair]] = defaultdict(list)
            for pair in active:
                buckets[
                    (tuple(pair.A.shape), tuple(pair.B.shape), pair.A.dtype, pair.A.device)
                ].append(pair)
            if group["mode"] == "efficient":
                for bucket, gA, gB in self._efficient_adjust(group, list(buckets.values())):
                    updates.append(partial(self._efficient_update, group, bucket, gA, gB))
            else:
                for bucket in buckets.values():
                    stacked = self._stack(bucket)
                    if self.check_finite:  # gradients and factors (full mode's step is slow anyway)
                        self._check_out(bucket, *stacked[:4])
                    updates.append(partial(self._full_bucket, group, bucket, stacked))
        for update in updates:
            update()
        return loss

    def _check_plain(self, gi: int, params: list[Tensor]) -> None:
        """Raise ``FloatingPointError`` naming the parameters whose gradient is NaN/Inf."""
        if not self.check_finite:
            return
        # sharded (FSDP2) gradients are checked on this rank's rows; every rank raises if one finds NaN
        if all_ranks_agree(_all_finite([local_tensor(_grad(p)) for p in params]), params):
            return
        bad = [
            self._names.get(id(p), f"param_groups[{gi}] #{i}")
            for i, p in enumerate(params)
            if not torch.isfinite(local_tensor(_grad(p))).all()
        ]
        raise FloatingPointError(
            f"LoraProAdamW: non-finite gradients (NaN/Inf) in {bad or 'another rank’s shard'}"
        )

    def _zero_step(self, group: dict[str, Any]) -> None:
        """One step of a group whose parameters DeepSpeed ZeRO (stage 1, 2 or 3) replaced by this
        rank's flat fp32 partition (:mod:`loralab.core.zero_views` finds the layers in it).

        The partition's master weights and gradient are all-gathered (LoRA-sized: one all-gather
        each), every layer is adjusted on its whole ``A, B, g_A, g_B`` (every rank computes the same
        r×r solves), and this rank's elements of the adjusted gradients replace the partition's
        gradient; AdamW then runs element-wise on the partition, exactly as efficient mode does on
        whole tensors. Trainable parameters that are not LoRA factors keep their gradient.
        """
        gi, originals = self._originals.of(group)
        where = f"LoraProAdamW param group {gi}"
        flat = flat_partition(group, where)
        if flat.grad is None:
            return
        zp = zero_partition(originals, flat, where)
        bad_local = self.check_finite and not _all_finite([flat.grad])
        if not zp.all_agree(not bad_local):
            raise FloatingPointError(
                f"{where}: non-finite gradients (NaN/Inf) in the DeepSpeed partition of "
                f"{'this rank' if bad_local else 'another rank'}"
            )
        buckets: dict[tuple, list[LoraPair]] = defaultdict(list)
        for pair in self._pairs:
            in_a, in_b = pair.A in zp, pair.B in zp
            if in_a != in_b:
                # ZeRO-3 splits a large group into sub-groups stepped one at a time
                raise LoraPairError(
                    f"layer {pair.name!r}: lora_A and lora_B are in different DeepSpeed ZeRO "
                    "partitions (ZeRO-3 sub-groups): raise zero_optimization.sub_group_size above "
                    "the number of trainable parameters"
                )
            if in_a:
                key = (tuple(zp.piece(pair.A).shape), tuple(zp.piece(pair.B).shape))
                buckets[key].append(pair)
        if not buckets:
            self._plain_step(group, [flat])
            return
        lora = [t for bucket in buckets.values() for pair in bucket for t in (pair.A, pair.B)]
        W = zp.wholes(flat, lora)
        G = zp.wholes(flat.grad, lora)
        if group["mode"] == "full":
            self._zero_full(group, zp, [p for b in buckets.values() for p in b], W, G)
            return
        adjusted: list[tuple[list[LoraPair], Tensor, Tensor]] = []
        for bucket in buckets.values():
            A = torch.stack([W[id(p.A)] for p in bucket])
            B = torch.stack([W[id(p.B)] for p in bucket])
            g_A = torch.stack([G[id(p.A)] for p in bucket])
            g_B = torch.stack([G[id(p.B)] for p in bucket])
            if self.check_finite and not _all_finite([g_A, g_B]):
                raise FloatingPointError(
                    f"LoraProAdamW: non-finite gradients (NaN/Inf) in LoRA layer(s) {[p.name for p in bucket]}"
                )
            s = torch.tensor([p.scaling for p in bucket], dtype=accumulation_dtype(A.dtype))
            try:
                gA, gB = lora_pro_gradients(
                    A,
                    B,
                    g_A,
                    g_B,
                    s,
                    x_mode=group["x_mode"],
                    ridge=group["ridge"],
                    jitter=group.get("jitter", 0.0),
                )
            except torch.linalg.LinAlgError:
                self._raise_non_finite_zero(bucket, W)
                raise
            if self.check_finite and not _all_finite([gA, gB]):
                self._raise_non_finite_zero(bucket, W)
            adjusted.append((bucket, gA, gB))
        for bucket, gA, gB in adjusted:  # every bucket checked: now change the gradient
            for k, pair in enumerate(bucket):
                zp.write_(flat.grad, pair.A, gA[k].to(flat.grad.dtype))
                zp.write_(flat.grad, pair.B, gB[k].to(flat.grad.dtype))
        # element-wise AdamW on this rank's partition: identical to efficient mode on whole tensors
        self._plain_step(group, [flat])

    def _zero_full(
        self,
        group: dict[str, Any],
        zp: ZeroPartition,
        pairs: list[LoraPair],
        W: dict[int, Tensor],
        G: dict[int, Tensor],
    ) -> None:
        """Full mode on a DeepSpeed ZeRO partition: each layer's m×n Adam state on one owner rank.

        Layer ``k`` of the partition is owned by rank ``k mod world``, which keeps its m×n moments
        (in the partition's state, under ``"param<i>.full_exp_avg"`` etc., ``i`` the index of B in
        the param group) and computes its step from the whole, all-gathered ``A, B, g_A, g_B`` exactly
        as in one process; the new factors reach every rank in one LoRA-sized all-reduce, and each
        rank writes its elements into its partition. The m×n state is split over the ranks, as ZeRO
        splits every other optimizer state; nothing m×n is communicated. Trainable parameters that
        are not LoRA factors get AdamW element-wise on the partition.
        """
        flat = zp.flat
        lr, wd = group["lr"], group["weight_decay"]
        state = self.state[flat]
        sizes = [(W[id(p.A)].numel(), W[id(p.B)].numel()) for p in pairs]
        new = torch.zeros(sum(a + b for a, b in sizes), dtype=flat.dtype, device=flat.device)
        bad: list[str] = []
        offset = 0
        for k, (pair, (na, nb)) in enumerate(zip(pairs, sizes)):
            here = slice(offset, offset + na + nb)
            offset += na + nb
            if k % zp.world != zp.rank:
                continue
            key = f"param{zp.piece(pair.B).index}."
            A, B = W[id(pair.A)][None], W[id(pair.B)][None]
            gA, gB = G[id(pair.A)][None], G[id(pair.B)][None]
            if self.check_finite and not _all_finite([gA, gB, A, B]):
                bad.append(pair.name)
                continue
            dt = accumulation_dtype(A.dtype)
            Ad, Bd = A.to(dt), B.to(dt)
            sd = torch.tensor([pair.scaling], dtype=dt)
            ridge, jitter = group["ridge"], group.get("jitter", 0.0)
            gt = optimal_equivalent_gradient(Ad, Bd, gA, gB, sd, ridge=ridge, jitter=jitter)
            if key + "step" not in state:
                state[key + "step"] = torch.tensor(0.0, dtype=torch.float32)
                for name in ("full_exp_avg", "full_exp_avg_sq"):
                    state[key + name] = torch.zeros(
                        gt.shape[1:], dtype=moment_dtype(flat), device=flat.device
                    )
            state[key + "step"] += 1
            (N,) = adamw_direction(
                [gt[0]],
                [state[key + "full_exp_avg"]],
                [state[key + "full_exp_avg_sq"]],
                step=int(state[key + "step"].item()),
                betas=tuple(group["betas"]),
                eps=group["eps"],
            )
            nA, nB = lora_gradients(Ad, Bd, N.to(gt.dtype)[None], sd)
            fd = _factor_dtype(Ad)  # LoRA-sized: in float64, as _full_bucket
            dA, dB = lora_pro_gradients(
                *(t.to(fd) for t in (Ad, Bd, nA, nB, sd)),
                x_mode=group["x_mode"],
                ridge=ridge,
                jitter=jitter,
            )
            if self.check_finite and not _all_finite([dA, dB]):
                bad.append(pair.name)
                continue
            a, b = A[0].clone(), B[0].clone()
            if wd:
                f = (
                    math.sqrt(1 - lr * wd)
                    if group["weight_decay_mode"] == "effective"
                    else 1 - lr * wd
                )
                a.mul_(f)
                b.mul_(f)
            a.add_(dA[0].to(a.dtype), alpha=-lr)
            b.add_(dB[0].to(b.dtype), alpha=-lr)
            new[here] = torch.cat([a.reshape(-1), b.reshape(-1)])
            # free this layer's m×n g̃ and direction before the next layer builds its own
            del gt, N
        if not zp.all_agree(not bad):  # every rank raises together, before any parameter changes
            raise FloatingPointError(
                f"LoraProAdamW: non-finite gradients, factors or adjusted directions (NaN/Inf) in "
                f"LoRA layer(s) {bad or 'of another rank'} (mode='full' under DeepSpeed ZeRO)"
            )
        zp.all_reduce_sum_(new)  # each layer's values come from its owner only
        # element-wise AdamW for the group's other parameters (its LoRA elements are overwritten)
        self._plain_step(group, [flat])
        offset = 0
        for pair, (na, nb) in zip(pairs, sizes):
            zp.write_(flat, pair.A, new[offset : offset + na].view(W[id(pair.A)].shape))
            zp.write_(flat, pair.B, new[offset + na : offset + na + nb].view(W[id(pair.B)].shape))
            offset += na + nb
            if wd and group["weight_decay_mode"] == "effective":
                w = self._base_weight(pair)  # frozen: replicated (ZeRO-1/2) or partitioned (ZeRO-3)
                assert w is not None  # checked at construction
                local = w.ds_tensor if is_zero3_param(w) else local_tensor(w)  # type: ignore[attr-defined]
                local.mul_(1 - lr * wd)

    @staticmethod
    def _raise_non_finite_zero(bucket: list[LoraPair], W: dict[int, Tensor]) -> None:
        bad = [
            p.name
            for p in bucket
            if not all(bool(torch.isfinite(W[id(t)]).all()) for t in (p.A, p.B))
        ]
        if bad:
            raise FloatingPointError(
                f"LoraProAdamW: non-finite LoRA factors (NaN/Inf parameters) in layer(s) {bad}"
            )
        raise FloatingPointError(
            f"LoraProAdamW: the LoRA-Pro adjustment produced NaN/Inf for layer(s) {[p.name for p in bucket]}; "
            "try ridge > 0 or float32 factors"
        )

    def _next_step(self, p: Tensor) -> int:
        return int(self._next_steps([p])[0].item())

    def _next_steps(self, params: list[Tensor]) -> list[Tensor]:
        """Advance the step counters of ``params`` (one ``_foreach_add_``) and return them.

        float32 tensors on the CPU, as ``torch.optim`` keeps ``state["step"]``.
        """
        counters = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            counters.append(state["step"])
        torch._foreach_add_(counters, 1.0)
        return counters

    def _moments(self, p: Tensor, shape: torch.Size, prefix: str = "") -> tuple[Tensor, Tensor]:
        state = self.state[p]
        if prefix + "exp_avg" not in state:
            state[prefix + "exp_avg"] = torch.zeros(shape, dtype=moment_dtype(p), device=p.device)
            state[prefix + "exp_avg_sq"] = torch.zeros(
                shape, dtype=moment_dtype(p), device=p.device
            )
        return state[prefix + "exp_avg"], state[prefix + "exp_avg_sq"]

    def _adam_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(
            lr=group["lr"],
            betas=tuple(group["betas"]),
            eps=group["eps"],
            weight_decay=group["weight_decay"],
        )

    def _plain_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            if _grad(p).is_sparse:
                raise RuntimeError("LoraProAdamW does not support sparse gradients")
        self._adamw(group, params, [_grad(p) for p in params])

    def _adamw(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        steps: list[Tensor] | None = None,
    ) -> None:
        """One AdamW step of ``params`` along ``grads`` (:func:`loralab.core.adamw_step_`: torch's
        fused kernel on CPU, ``torch._foreach_*`` elsewhere); ``steps`` are the advanced counters.

        Sharded (FSDP2) parameters step on their local rows, with moments of those rows (the
        gradients are local rows too: the caller's, or the parameters' own local shards)."""
        if steps is None:
            steps = self._next_steps(params)
        locals_ = [local_tensor(p) for p in params]
        ms, vs = zip(*(self._moments(p, lp.shape) for p, lp in zip(params, locals_)))
        grads = [local_tensor(g) for g in grads]
        adamw_step_(locals_, grads, ms, vs, steps, **self._adam_kwargs(group))

    def _stack(self, bucket: list[LoraPair]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # whole factors and gradients (gathered when FSDP2 shards them: they are LoRA-sized)
        A = torch.stack([whole(p.A.detach()) for p in bucket])
        B = torch.stack([whole(p.B.detach()) for p in bucket])
        gA = torch.stack([whole(_grad(p.A)) for p in bucket])
        gB = torch.stack([whole(_grad(p.B)) for p in bucket])
        s = torch.tensor([p.scaling for p in bucket], dtype=torch.float64)
        # non-finite gradients are caught together with the adjusted ones, in _check_out
        return A, B, gA, gB, s

    def _check_out(self, bucket: list[LoraPair], *tensors: Tensor, sharded: bool = False) -> None:
        """Raise if ``tensors`` hold NaN/Inf; ``sharded``: they are this rank's rows of the bucket's
        layers, so the ranks agree first (all raise together, or none)."""
        if not self.check_finite:
            return
        ok = _all_finite(tensors)
        if sharded:
            ok = all_ranks_agree(ok, [bucket[0].B])
        if ok:
            return
        self._raise_non_finite_inputs(bucket)
        raise FloatingPointError(
            f"LoraProAdamW: the LoRA-Pro adjustment produced NaN/Inf for layer(s) {[p.name for p in bucket]}; "
            "try ridge > 0 or float32 factors"
        )

    @staticmethod
    def _raise_non_finite_inputs(bucket: list[LoraPair]) -> None:
        """Raise ``FloatingPointError`` naming the layers whose gradients, or else factors, are NaN/Inf."""
        # whole tensors: every rank reaches here together (the adjusted outputs it checked are whole)
        bad = [
            p.name
            for p in bucket
            if any(
                t.grad is not None and not torch.isfinite(whole(t.grad)).all() for t in (p.A, p.B)
            )
        ]
        if bad:
            raise FloatingPointError(
                f"LoraProAdamW: non-finite gradients (NaN/Inf) in LoRA layer(s) {bad}"
            )
        bad = [
            p.name for p in bucket if not all(torch.isfinite(whole(t)).all() for t in (p.A, p.B))
        ]
        if bad:
            raise FloatingPointError(
                f"LoraProAdamW: non-finite LoRA factors (NaN/Inf parameters) in layer(s) {bad}: the model "
                "is already broken (a step taken with check_finite=False, or a bad checkpoint?)"
            )

    def _efficient_adjust(
        self, group: dict[str, Any], buckets: list[list[LoraPair]]
    ) -> list[tuple[list[LoraPair], Tensor, Tensor]]:
        """LoRA-Pro's adjusted gradients ``(bucket, gᴬ, gᴮ)`` of every bucket, checked for NaN/Inf."""
        # Each factor is stacked next to its gradient, [A; g_A] and [B | g_B], in the accumulation dtype:
        # one copy of every tensor, and the adjustment becomes four batched products per shape; the r×r
        # work of all shapes that share a rank, dtype and device runs as one batch (see
        # lora_pro_gradients_buckets).
        stacks: dict[tuple, list[tuple[list[LoraPair], Tensor, Tensor, Tensor]]] = defaultdict(list)
        for bucket in buckets:
            r, n = bucket[0].A.shape
            m = bucket[0].B.shape[0]
            dt = accumulation_dtype(bucket[0].A.dtype)
            kw: dict[str, Any] = dict(dtype=dt, device=bucket[0].A.device)
            if (
                kw["device"].type == "cpu"
            ):  # one copy of each tensor, per-layer copies are cheap here
                A_gA, B_gB = self._stacking_buffers(len(bucket), r, n, m, dt)
                for i, pair in enumerate(bucket):
                    # whole(): gathered when FSDP2 shards them (LoRA-sized), else the tensor itself
                    A_i, gA_i = whole(pair.A.detach()), whole(_grad(pair.A))
                    B_i, gB_i = whole(pair.B.detach()), whole(_grad(pair.B))
                    torch.cat([A_i, gA_i], dim=0, out=A_gA[i])
                    torch.cat([B_i, gB_i], dim=1, out=B_gB[i])
            else:  # accelerators: a few batched copy kernels rather than two launches per layer
                A_gA = torch.cat(
                    [
                        torch.stack([whole(p.A.detach()) for p in bucket]),
                        torch.stack([whole(_grad(p.A)) for p in bucket]),
                    ],
                    dim=1,
                ).to(dt)
                B_gB = torch.cat(
                    [
                        torch.stack([whole(p.B.detach()) for p in bucket]),
                        torch.stack([whole(_grad(p.B)) for p in bucket]),
                    ],
                    dim=2,
                ).to(dt)
            s = torch.tensor([p.scaling for p in bucket], **kw)
            stacks[(r, dt, A_gA.device)].append((bucket, A_gA, B_gB, s))
        done = []
        for items in stacks.values():
            try:
                outs = lora_pro_gradients_buckets(
                    [it[1] for it in items],
                    [it[2] for it in items],
                    [it[3] for it in items],
                    x_mode=group["x_mode"],
                    ridge=group["ridge"],
                    jitter=group.get("jitter", 0.0),
                )
            except torch.linalg.LinAlgError:
                # the r×r eigendecompositions fail on NaN/Inf factors: say which layer, not LAPACK's code
                for bucket, *_ in items:
                    self._raise_non_finite_inputs(bucket)
                raise
            for (bucket, _, _, _), (gA, gB) in zip(items, outs):
                # Checking the outputs suffices: each is a product with the stacked inputs, gᴬ = [X | S]·[A; g_A]
                # and gᴮ = [B | g_B]·[−(Y + X); T], and IEEE products carry NaN/Inf through (0·NaN = NaN),
                # so a non-finite factor or gradient leaves a non-finite output; _check_out then names the
                # layer. Every shape is checked before any parameter or state changes.
                self._check_out(bucket, gA, gB)
                done.append((bucket, gA, gB))
        return done

    def _stacking_buffers(
        self, layers: int, r: int, n: int, m: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """CPU buffers for ``[A; g_A]`` (layers, 2r, n) and ``[B | g_B]`` (layers, m, 2r), kept between steps.

        A fresh multi-MB CPU tensor is fresh memory from the operating system, and the first write to
        each of its pages faults: allocating these every step made the stacking copy about twice as slow.
        One pair per layer shape is kept (grown when a step has more layers of that shape);
        :attr:`workspace_bytes` reports their size. CUDA's caching allocator already reuses memory,
        so nothing is kept there.
        """
        key = (r, n, m, dtype)
        bufs = self._workspace.get(key)
        if bufs is None or bufs[0].shape[0] < layers:
            bufs = (
                torch.empty((layers, 2 * r, n), dtype=dtype),
                torch.empty((layers, m, 2 * r), dtype=dtype),
            )
            self._workspace[key] = bufs
        return bufs[0][:layers], bufs[1][:layers]

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the stacking buffers efficient mode keeps between steps on CPU (2× the LoRA
        parameters of the layers it adjusts; 0 on CUDA and before the first step)."""
        return sum(t.numel() * t.element_size() for bufs in self._workspace.values() for t in bufs)

    def _efficient_update(
        self, group: dict[str, Any], bucket: list[LoraPair], gA: Tensor, gB: Tensor
    ) -> None:
        # FSDP2: this rank's rows of the (whole) adjusted gradients, for its rows of A and B
        rows_A, rows_B = rows_of(bucket[0].A), rows_of(bucket[0].B)
        if rows_A != slice(0, gA.shape[1]):
            gA = gA[:, rows_A].contiguous()
        if rows_B != slice(0, gB.shape[1]):
            gB = gB[:, rows_B].contiguous()
        moments, step_buf, views = self._stacked_state(bucket, gA.dtype)
        step_buf.add_(1)
        params = [local_tensor(t) for pair in bucket for t in (pair.A, pair.B)]
        if (
            fused_adamw_available(gA.device)
            and gA.dtype == bucket[0].A.dtype
            and all(p.is_contiguous() for p in params)
        ):
            # torch's fused AdamW kernel (CPU), one pass over each factor (the element-wise ops on the
            # stacked buffers below make eight); per-parameter step counters, so layers that sat out a
            # step need no special case. Its other preconditions hold by construction: the adjusted
            # gradients and the moments are slices of contiguous stacks in the factors' dtype.
            grads = [g for pair_grads in zip(gA.unbind(0), gB.unbind(0)) for g in pair_grads]
            fused_adamw_(params, grads, *views, **self._adam_kwargs(group))
            return
        steps = [int(v) for v in step_buf.tolist()]
        if all(st == steps[0] for st in steps):
            self._stacked_adamw(group, bucket, gA, gB, moments, steps[0])
        else:  # layers that skipped steps: per parameter (the state tensors are views, still theirs)
            grads = [g for i in range(len(bucket)) for g in (gA[i], gB[i])]
            keys = [t for pair in bucket for t in (pair.A, pair.B)]
            self._adamw(group, keys, grads, views[2])

    def _stacked_state(
        self, bucket: list[LoraPair], dtype: torch.dtype
    ) -> tuple[list[Tensor], Tensor, tuple[list[Tensor], list[Tensor], list[Tensor]]]:
        """The bucket's Adam state as stacked buffers: ``[m_A, v_A, m_B, v_B]``, the step counters, and
        the per-parameter views ``(exp_avgs, exp_avg_sqs, steps)`` (ordered A, B of layer 0, ...).

        ``state[p]["exp_avg"]``, ``["exp_avg_sq"]`` and ``["step"]`` of every factor stay per-parameter
        tensors (so ``state_dict`` and resume are unchanged) but are views into these buffers, so that
        AdamW runs as a few element-wise operations over the whole bucket instead of one kernel per
        parameter and operation. Rebuilt (copying the current state in) whenever a state tensor is no
        longer the view handed out, e.g. after ``load_state_dict``. Step counters are ordered A, B of
        layer 0, A, B of layer 1, ...
        """
        key = tuple(id(p.A) for p in bucket)
        cached = self._stacked.get(key)
        if cached is not None:
            bufs, step_buf, views = cached
            if all(
                state.get("exp_avg") is vm
                and state.get("exp_avg_sq") is vv
                and state.get("step") is vs
                for state, vm, vv, vs in zip(
                    (self.state[t] for pair in bucket for t in (pair.A, pair.B)), *views
                )
            ):
                return bufs, step_buf, views
        device = bucket[0].A.device
        L = len(bucket)
        bufs = [  # of this rank's rows when FSDP2 shards the factors
            torch.zeros((L, *local_tensor(p).shape), dtype=dtype, device=device)
            for p in (bucket[0].A, bucket[0].A, bucket[0].B, bucket[0].B)
        ]
        # float32 on the CPU, as torch.optim keeps (and _next_step creates) the step counters
        step_buf = torch.zeros(2 * L, dtype=torch.float32)
        views = ([], [], [])  # typed by the cached unpacking above
        for i, pair in enumerate(bucket):
            for j, (p, vm, vv) in enumerate(
                ((pair.A, bufs[0][i], bufs[1][i]), (pair.B, bufs[2][i], bufs[3][i]))
            ):
                vs = step_buf[2 * i + j]
                state = self.state[p]
                if "exp_avg" in state:
                    vm.copy_(state["exp_avg"])
                    vv.copy_(state["exp_avg_sq"])
                if "step" in state:
                    vs.copy_(state["step"])
                state["exp_avg"], state["exp_avg_sq"], state["step"] = vm, vv, vs
                for lst, v in zip(views, (vm, vv, vs)):
                    lst.append(v)
        # a layer that moved to another bucket (its shape group changed between steps) leaves its old
        # buffers behind: drop every cached bucket that shares a layer with this one
        for other in [k for k in self._stacked if not set(k).isdisjoint(key)]:
            del self._stacked[other]
        self._stacked[key] = (bufs, step_buf, views)
        return bufs, step_buf, views

    def _stacked_adamw(
        self,
        group: dict[str, Any],
        bucket: list[LoraPair],
        gA: Tensor,
        gB: Tensor,
        moments: list[Tensor],
        step: int,
    ) -> None:
        """AdamW on the stacked adjusted gradients of a bucket (all its factors at the same ``step``).

        The path for CUDA (a few large element-wise kernels instead of one launch per parameter) and
        for CPU without torch's fused kernel or with half-precision factors. ``torch.optim.AdamW``'s rule; for half-precision factors with float32 moments, the arithmetic of
        :func:`loralab.core.adamw.adamw_update_` (the direction rounded once to the factor's dtype).
        """
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        bc1 = 1 - beta1**step
        bc2 = 1 - beta2**step
        mA, vA, mB, vB = moments
        for params, g, m, v in (
            ([local_tensor(p.A) for p in bucket], gA, mA, vA),
            ([local_tensor(p.B) for p in bucket], gB, mB, vB),
        ):
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = torch.sqrt(v, out=g)  # the adjusted gradient is spent: reuse its memory
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)
            if all(p.dtype == m.dtype for p in params):
                # (lr/bc₁)·m/(√v/√bc₂ + ε) = (lr·√bc₂/bc₁)·m/(√v + ε·√bc₂): one pass over v fewer
                denom.add_(eps * math.sqrt(bc2))
                step_size = lr * math.sqrt(bc2) / bc1
                torch._foreach_addcdiv_(
                    params, list(m.unbind(0)), list(denom.unbind(0)), -step_size
                )
            else:  # half-precision factors: the direction in float32, rounded once, as core does
                denom.div_(math.sqrt(bc2)).add_(eps)
                direction = torch.div(m, denom, out=denom).div_(bc1)
                for p, d in zip(params, direction):
                    p.add_(d.to(p.dtype), alpha=-lr)

    def _full_bucket(
        self,
        group: dict[str, Any],
        bucket: list[LoraPair],
        stacked: tuple[Tensor, Tensor, Tensor, Tensor, Tensor],
    ) -> None:
        A, B, g_A, g_B, s = stacked
        dt = accumulation_dtype(A.dtype)
        A, B, sd = A.to(dt), B.to(dt), s.to(dt)
        # Under FSDP2 the m×n moments hold the rows of B's shard only: g̃ is built for those rows only
        # (never whole), Adam runs on them (element-wise), and the direction N goes back to the
        # factors by the projection algebra on row shards, s·BᵀN = Σₖ s·Bₖᵀ·Nₖ (an r×n all-reduce)
        # and s·N·Aᵀ by rows (an m×r gather).
        rows = rows_of(bucket[0].B)
        gt = optimal_equivalent_gradient(
            A, B, g_A, g_B, sd, ridge=group["ridge"], jitter=group.get("jitter", 0.0), rows=rows
        )
        self._check_out(bucket, gt, sharded=True)
        B_rows = B[:, rows]
        m, n = gt.shape[-2], A.shape[-1]
        steps = []
        for pair in bucket:
            steps.append(self._next_step(pair.B))
            self._next_step(pair.A)
        by_step: dict[int, list[int]] = defaultdict(list)
        for i, st in enumerate(steps):
            by_step[st].append(i)
        directions: list[Tensor | None] = [None] * len(bucket)
        for step, idx in by_step.items():
            ms, vs = zip(
                *(self._moments(bucket[i].B, torch.Size((m, n)), prefix="full_") for i in idx)
            )
            out = adamw_direction(
                [gt[i] for i in idx],
                list(ms),
                list(vs),
                step=step,
                betas=tuple(group["betas"]),
                eps=group["eps"],
            )
            for i, d in zip(idx, out):
                directions[i] = d
        # every slot was filled: by_step's index lists partition range(len(bucket))
        N = torch.stack(cast(list[Tensor], directions)).to(gt.dtype)
        # Bring the Adam direction back to the factors: the (gᴬ, gᴮ) whose equivalent gradient is closest
        # to N (Theorem 2.1 applied to N instead of G; official step_full).
        nA, nB = lora_gradients(A, B_rows, N, sd)
        nA = sum_over_shards_(nA.contiguous(), bucket[0].B)
        nB = gather_rows(bucket[0].B, nB.transpose(0, 1)).transpose(0, 1)
        # LoRA-sized: in float64 (see _factor_dtype)
        fd = _factor_dtype(A)
        dA, dB = lora_pro_gradients(
            A.to(fd),
            B.to(fd),
            nA.to(fd),
            nB.to(fd),
            sd.to(fd),
            x_mode=group["x_mode"],
            ridge=group["ridge"],
            jitter=group.get("jitter", 0.0),
        )
        self._check_out(bucket, dA, dB)
        lr, wd = group["lr"], group["weight_decay"]
        rows_A = rows_of(bucket[0].A)
        for i, pair in enumerate(bucket):
            a, b = (
                local_tensor(pair.A),
                local_tensor(pair.B),
            )  # this rank's rows (all of them unsharded)
            if wd:
                if group["weight_decay_mode"] == "effective":
                    # decays W0 + s·B·A as a whole (official full mode): √ on each factor, full on W0
                    f = math.sqrt(1 - lr * wd)
                    a.mul_(f)
                    b.mul_(f)
                    w = self._base_weight(pair)
                    assert w is not None  # checked at construction
                    local_tensor(w).mul_(1 - lr * wd)
                else:
                    a.mul_(1 - lr * wd)
                    b.mul_(1 - lr * wd)
            a.add_(dA[i][rows_A].to(a.dtype), alpha=-lr)
            b.add_(dB[i][rows].to(b.dtype), alpha=-lr)
