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
the row shards and ``s·N·Aᵀ`` gathered, so no m×n matrix is ever gathered or built whole). The result
equals one process on the whole batch.

Where the code is: this module holds the optimizer (construction, pairing, state I/O, the choice of
path per param group); efficient mode in :mod:`loralab.lora_pro.efficient_mode`, full mode in
:mod:`loralab.lora_pro.full_mode`, DeepSpeed ZeRO partitions in :mod:`loralab.lora_pro.zero_steps`,
what they share in :mod:`loralab.lora_pro.optimizer_base`.

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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from loralab.core.adamw import check_adamw_hparams
from loralab.core.lora_layers import LoraPair, LoraPairError, find_lora_pairs
from loralab.core.sharding import all_ranks_agree, local_tensor
from loralab.core.zero_views import GroupOriginals, full_shape, is_zero3_param, is_zero_partition
from loralab.lora_pro.adjust import X_MODES, XMode
from loralab.lora_pro.efficient_mode import EfficientModeSteps
from loralab.lora_pro.full_mode import FullModeSteps
from loralab.lora_pro.optimizer_base import _all_finite, _grad
from loralab.lora_pro.zero_steps import ZeroSteps

__all__ = ["LoraProAdamW", "Mode", "WeightDecayMode"]

logger = logging.getLogger(__name__)

Mode = Literal["efficient", "full"]
WeightDecayMode = Literal["factors", "effective"]
MODES = ("efficient", "full")
WEIGHT_DECAY_MODES = ("factors", "effective")


class LoraProAdamW(ZeroSteps, FullModeSteps, EfficientModeSteps):
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
        self._workspace = {}  # see EfficientModeSteps._stacking_buffers
        self._own_ids: set[int] = set()
        self._stacked = {}  # see EfficientModeSteps._stacked_state
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
