"""``LoraFAAdamW``: AdamW on LoRA-FA's corrected B gradients, a real ``torch.optim.Optimizer``.

LoRA-FA (Zhang et al., 2023, arXiv 2308.03303) trains only B; before the AdamW update each B gradient
is replaced by ``(1/s²)·g_B·(A·Aᵀ)⁻¹`` (:mod:`loralab.lora_fa.correction`), the B-gradient whose update
``s·ΔB·A`` is closest to full fine-tuning's. What differs from PEFT's ``LoraFAOptimizer``:

- layers are paired by module (:func:`loralab.core.find_lora_pairs`, embedding adapters included),
  not by name substring and order;
- ``(A·Aᵀ)⁻¹`` is computed once per layer (A is frozen; recomputed only if A's tensor is modified in
  place) in float64, not a ``pinv`` per layer per step under bf16 autocast;
- layers with equal shapes are corrected in one batched ``bmm`` and every parameter is updated with
  ``torch._foreach_*`` (:func:`loralab.core.adamw_update_`);
- state is per parameter (``step``, ``exp_avg``, ``exp_avg_sq`` tensors), so ``state_dict()`` loads with
  ``torch.load(weights_only=True)`` and ``load_state_dict`` puts it on each parameter's device;
- a trainable A, an A that receives a gradient or a non-finite gradient raise errors naming the layer.

The default numerics are PEFT's (transformers' AdamW: ``eps=1e-6``, ``√bc₂/bc₁`` step size, weight decay
applied after the step); ``style="torch"`` gives ``torch.optim.AdamW``'s. Trainable parameters that are
not LoRA B factors (a head, ``modules_to_save``, biases) get plain AdamW in the same optimizer.

Under DeepSpeed ZeRO (stage 1, 2 or 3), which replaces the optimizer's parameters by one flat fp32
partition per param group, ``step`` finds every B in the partition (:mod:`loralab.core.zero_views`),
all-gathers B's (small) gradient whole, corrects it, writes this rank's elements back and runs AdamW
element-wise on the partition (the optimizer state is the partition's: nothing is replicated); under
ZeRO-3 the frozen A is gathered for its correction matrix at every step. The result equals the
one-process step on the whole batch.

``correct_in_backward=True`` applies the correction with a gradient hook on every B instead of in
``step`` (the correction is linear, so it commutes with gradient accumulation and with the data-
parallel average); ``step`` then runs plain AdamW (on DeepSpeed's partitions too).

Under FSDP2 (``fully_shard``: every parameter a ``DTensor`` sharded by rows) ``step`` gathers each
(small) A once to build its correction matrix (:mod:`loralab.core.sharding`), corrects the local rows
of B's gradient (``g_B·M`` is row-wise) and runs AdamW on this rank's shards: the optimizer state
holds this rank's rows only, and the result equals the one-process step on the whole batch.
``correct_in_backward=True`` is refused there (hooks on sharded parameters never see a gradient).

Example:
    >>> import peft, torch
    >>> from loralab.core.testing import tiny_llama
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    >>> for n, p in model.named_parameters():
    ...     if "lora_A" in n:
    ...         _ = p.requires_grad_(False)
    >>> opt = LoraFAAdamW(model, lr=1e-3)
    >>> ids = torch.randint(0, 100, (2, 8))
    >>> model(input_ids=ids, labels=ids).loss.backward()
    >>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor, nn

from loralab.core.adamw import AdamWStyle, adamw_update_, check_adamw_hparams, moment_dtype
from loralab.core.distributed import gathered_parameters
from loralab.core.lora_layers import LoraPair, LoraPairError, find_lora_pairs
from loralab.core.sharding import all_ranks_agree, is_sharded, local_tensor, whole, whole_packed
from loralab.core.zero_views import (
    GroupOriginals,
    flat_partition,
    full_shape,
    is_zero3_param,
    is_zero_partition,
    zero_partition,
)
from loralab.lora_fa.correction import DEFAULT_RIDGE, correct_grads, correction_matrix

__all__ = ["LoraFAAdamW", "LoraFAError"]

logger = logging.getLogger(__name__)

STYLES = ("hf", "torch")


class LoraFAError(ValueError):
    """A LoRA-FA precondition does not hold (A trainable, A and B in different groups, scaling 0, …)."""


def _a_name(pair: LoraPair) -> str:
    emb = getattr(pair.module, "lora_embedding_A", None)
    return "lora_embedding_A" if emb is not None and pair.adapter in emb else "lora_A"


def _warn_zero_a(pairs: list[LoraPair]) -> None:
    # PEFT initialises an embedding adapter's A to zeros (B random): with A frozen, B's gradient
    # s·G·Aᵀ is zero and only weight decay moves B. That is LoRA-FA's maths (PEFT's optimizer does the
    # same), but a layer that cannot learn must not go unnoticed.
    zero = [
        f"{p.name}.{_a_name(p)}[{p.adapter!r}]"
        for p in pairs
        if p.A.numel() > 0 and not is_zero3_param(p.A) and not bool(whole(p.A.detach()).any())
    ]
    if zero:
        logger.warning(
            "LoRA-FA keeps A frozen, and these A's are all zeros, so their layers cannot learn (B's gradient "
            "is zero; only weight decay moves B): %s. PEFT initialises embedding adapters that way; "
            "LoraConfig(init_lora_weights=False) gives them a random A.",
            zero,
        )


def _version(t: Tensor) -> int:
    # in-place changes of a DTensor parameter reach its local shard, whose version counter moves
    return local_tensor(t)._version


class LoraFAAdamW(torch.optim.Optimizer):
    """AdamW with LoRA-FA's closed-form correction of every LoRA B gradient (A frozen).

    Args:
        params_or_model: the ``PeftModel`` (or any module with PEFT LoRA layers): its trainable
            parameters are optimised and LoRA pairs found by module. Or an iterable of parameters /
            param-group dicts together with ``pairs=``.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (defaults: PEFT's LoRA-FA, ``eps=1e-6``).
        style: ``"hf"`` (transformers/PEFT AdamW, default) or ``"torch"`` (``torch.optim.AdamW``).
        ridge: absolute ridge in ``(A·Aᵀ + ridge·I)⁺`` (PEFT: 1e-8).
        pairs: the LoRA pairs, when ``params_or_model`` is not a module.
        adapter_name: which adapter (default: the active one).
        correct_in_backward: correct B's gradient in a backward hook instead of in ``step`` (DeepSpeed
            ZeRO-1/2/3 path; see the module docstring).
        check_finite: raise ``FloatingPointError`` naming the layer if a gradient is NaN/Inf.

    Raises:
        LoraFAError: a LoRA layer's A is trainable or in the optimizer, or its scaling is 0.

    Example:
        >>> # see the module docstring
    """

    def __init__(
        self,
        params_or_model: nn.Module | Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        style: AdamWStyle = "hf",
        ridge: float = DEFAULT_RIDGE,
        pairs: Iterable[LoraPair] | None = None,
        adapter_name: str | None = None,
        correct_in_backward: bool = False,
        check_finite: bool = True,
    ) -> None:
        check_adamw_hparams(lr, tuple(betas), eps, weight_decay)
        if not ridge >= 0:
            raise ValueError(f"ridge must be >= 0, got {ridge}")
        if isinstance(params_or_model, nn.Module):
            model = params_or_model
            found = (
                find_lora_pairs(model, adapter_name, embeddings=True)
                if pairs is None
                else list(pairs)
            )
            params: Any = [p for p in model.parameters() if p.requires_grad]
            if not params:
                raise ValueError(f"{type(model).__name__} has no trainable parameters")
        else:
            if pairs is None:
                raise TypeError(
                    "LoraFAAdamW pairs A and B by module: pass the PeftModel itself (LoraFAAdamW(model, ...)), "
                    "or the parameters together with pairs=loralab.core.find_lora_pairs(model)"
                )
            found = list(pairs)
            params = params_or_model
        for pair in found:
            if pair.A.requires_grad:
                raise LoraFAError(
                    f"layer {pair.name!r}: {_a_name(pair)}[{pair.adapter!r}] is trainable, but LoRA-FA keeps A frozen. "
                    "Freeze it (A.requires_grad_(False)) or build the optimizer with create_lorafa_optimizer, which does."
                )
            if len(full_shape(pair.A)) != 2:  # full_shape: an empty ZeRO-3 parameter's whole shape
                raise LoraFAError(
                    f"layer {pair.name!r}: LoRA-FA needs a 2-D lora_A (Linear, Conv1D, embedding and "
                    f"MultiheadAttention adapters; PEFT's LoRA-FA fails on convolutions too), got shape {tuple(full_shape(pair.A))}"
                )
            if pair.scaling == 0:
                raise LoraFAError(
                    f"layer {pair.name!r} has scaling 0 (lora_alpha = 0): LoRA-FA divides by s²"
                )
        if correct_in_backward and any(is_sharded(t) for pair in found for t in (pair.A, pair.B)):
            raise LoraFAError(
                "correct_in_backward=True registers gradient hooks on B, but these parameters are sharded "
                "DTensors (FSDP2's fully_shard), whose hooks never see a gradient; use "
                "correct_in_backward=False, which corrects the sharded gradients in step"
            )
        self._all_pairs = found
        _warn_zero_a(found)
        self.ridge = float(ridge)
        self.check_finite = check_finite
        self.correct_in_backward = bool(correct_in_backward)
        self._known: set[int] = set()
        self._originals = GroupOriginals()  # to find each group's parameters in a ZeRO partition
        self._cache: dict[int, tuple[int, Tensor]] = {}
        self._stacks: dict[tuple[int, ...], tuple[tuple[int, ...], Tensor]] = {}
        self._hooks: list[Any] = []
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, style=style)
        super().__init__(params, defaults)
        self._finalise_pairs()
        if self.correct_in_backward:
            self._install_hooks()

    # ----------------------------------------------------------------------------- construction

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        check_adamw_hparams(group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"])
        if group["style"] not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {group['style']!r}")
        self._known.update(id(p) for p in group["params"])
        self._originals.record(group, len(self.param_groups) - 1)
        if hasattr(self, "_b_pair"):
            self._finalise_pairs()

    def _finalise_pairs(self) -> None:
        in_groups = {id(p) for g in self.param_groups for p in g["params"]}
        self._b_pair: dict[int, LoraPair] = {}
        self._a_ids: dict[int, LoraPair] = {}
        for pair in self._all_pairs:
            if id(pair.A) in in_groups:
                raise LoraFAError(
                    f"layer {pair.name!r}: {_a_name(pair)}[{pair.adapter!r}] is in the optimizer, but LoRA-FA keeps A frozen"
                )
            if id(pair.B) in in_groups:
                self._b_pair[id(pair.B)] = pair
                self._a_ids[id(pair.A)] = pair
        self.pairs = [p for p in self._all_pairs if id(p.B) in self._b_pair]
        if not self.pairs:
            raise LoraPairError(
                "no LoRA B factor is among the optimizer's parameters: nothing for LoRA-FA to correct"
            )

    # ----------------------------------------------------------------------------- correction matrices

    def _matrix(self, pair: LoraPair) -> Tensor:
        """``(1/s²)(A·Aᵀ + ridge·I)⁺`` for one layer, cached while A's tensor is unchanged."""
        version = _version(pair.A)
        hit = self._cache.get(id(pair.B))
        if hit is not None and hit[0] == version:
            return hit[1]
        return self._fresh_matrices([pair])[0]

    def _stacked(self, pairs: list[LoraPair]) -> Tensor:
        key = tuple(id(p.B) for p in pairs)
        versions = tuple(_version(p.A) for p in pairs)
        hit = self._stacks.get(key)
        As = [p.A for p in pairs]
        # A ZeRO-3 A is gathered afresh at every step (its version counter does not follow the
        # partition, which a checkpoint load rewrites): a collective that every rank makes alike
        zero3 = any(is_zero3_param(a) for a in As)
        valid = hit is not None and hit[0] == versions and not zero3
        # gathering a sharded A is a collective: every rank must decide alike whether to rebuild
        if all_ranks_agree(valid, As):
            return cast(tuple, hit)[1]
        if zero3 or any(is_sharded(a) for a in As):
            M = torch.stack(self._fresh_matrices(pairs))
        else:
            M = torch.stack([self._matrix(p) for p in pairs])
        self._stacks[key] = (versions, M)
        return M

    def _fresh_matrices(self, pairs: list[LoraPair]) -> list[Tensor]:
        """:meth:`_matrix` of each pair from its A gathered afresh (a collective when A is sharded:
        r×in, small), cached; every A of ``pairs`` at once: one ``GatheredParameters`` block for
        ZeRO-3, one all-gather for FSDP2's row shards (:func:`~loralab.core.sharding.whole_packed`),
        not one collective per layer."""
        As = [p.A for p in pairs]
        with gathered_parameters(As):
            Ms = [
                correction_matrix(A, p.scaling, ridge=self.ridge, dtype=torch.float32)
                for p, A in zip(pairs, whole_packed(As))
            ]
        for p, M in zip(pairs, Ms):
            self._cache[id(p.B)] = (_version(p.A), M)
        return Ms

    def refresh(self) -> None:
        """Recompute the cached ``(A·Aᵀ)⁻¹`` (call after changing an A through ``.data``).

        In-place changes of A are detected without it (A's version counter). With
        ``correct_in_backward=True`` the matrices are recomputed right away (under ZeRO-3 every rank
        must call it, outside backward: A is gathered).
        """
        self._cache.clear()
        self._stacks.clear()
        if self.correct_in_backward:
            for pair in self.pairs:
                self._matrix(pair)

    def _hook_matrix(self, pair: LoraPair) -> Tensor:
        # A ZeRO-3-partitioned A cannot be read (nor its version trusted) inside backward: use the
        # matrix computed while it was whole. Otherwise follow A like ``step`` does, so that an A
        # loaded after construction (a checkpoint resume) is picked up.
        hit = self._cache.get(id(pair.B))
        if hit is not None and is_zero3_param(pair.A):
            return hit[1]
        return self._matrix(pair)

    def _install_hooks(self) -> None:
        for pair in self.pairs:
            self._matrix(pair)  # now, while A is whole (before DeepSpeed ZeRO-3 partitions it)

            def hook(grad: Tensor, pair: LoraPair = pair) -> Tensor:
                M = self._hook_matrix(pair)
                return (grad.to(M.dtype) @ M.to(grad.device)).to(grad.dtype)

            self._hooks.append(pair.B.register_hook(hook))

    def remove_hooks(self) -> None:
        """Remove the gradient hooks of ``correct_in_backward=True``."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # ----------------------------------------------------------------------------- step

    def _check_finite(self, grads: list[Tensor], names: list[str], params: list[Tensor]) -> None:
        ok = True
        if grads:
            norms = torch._foreach_norm(grads)
            # one stack (and one host sync) per device, not one per parameter
            by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
            for n in norms:
                by_device[n.device].append(n.to(torch.float32))
            ok = all(bool(torch.isfinite(torch.stack(ns)).all()) for ns in by_device.values())
        # sharded gradients: a NaN in another rank's rows must stop this rank's step too
        if all_ranks_agree(ok, params):
            return
        if not grads:
            raise FloatingPointError(
                "non-finite gradient on another rank's shard; step skipped, parameters unchanged"
            )
        all_norms = torch.stack([n.to(torch.float32).cpu() for n in norms])
        if not bool(torch.isfinite(all_norms).all()):
            bad = [
                n
                for n, v in zip(names, all_norms.tolist())
                if v != v or v in (float("inf"), float("-inf"))
            ]
            raise FloatingPointError(
                f"non-finite gradient in {bad[:5]}{' …' if len(bad) > 5 else ''}; step skipped, parameters unchanged"
            )
        raise FloatingPointError(
            "non-finite gradient on another rank's shard; step skipped, parameters unchanged"
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, but a state saved for another model or LoRA
        rank (moments of other shapes) is refused here, naming the parameter and both shapes
        (:func:`loralab.core.optim_state.check_state_dict`), instead of failing at the next step."""
        from loralab.core.optim_state import check_state_dict

        def expected(p: Tensor, group: Any) -> dict[str, tuple[int, ...]]:
            # B's moments hold its projected gradient, the shape of B itself (of this rank's shard)
            return dict.fromkeys(("exp_avg", "exp_avg_sq"), tuple(local_tensor(p).shape))

        check_state_dict(self, state_dict, expected)
        old_groups = list(self.param_groups)
        super().load_state_dict(state_dict)
        self._originals.carry_over(old_groups, self.param_groups)  # torch rebuilt the group dicts

    def _zero_plan(
        self, group: dict[str, Any]
    ) -> tuple[dict[str, Any], list[Tensor], list[Tensor], list[Tensor]] | None:
        """``(group, params, grads, keys)`` of a group DeepSpeed ZeRO replaced by this rank's flat
        partition: B's whole gradients all-gathered (LoRA-sized), corrected as in one process, and
        this rank's elements written into the partition's gradient; AdamW then runs element-wise on
        the partition (its state is the partition's)."""
        gi, originals = self._originals.of(group)
        where = f"LoraFAAdamW param group {gi}"
        flat = flat_partition(group, where)
        if flat.grad is None:
            return None
        if flat.grad.is_sparse:
            raise RuntimeError("LoraFAAdamW does not support sparse gradients")
        zp = zero_partition(originals, flat, where)
        grad = flat.grad
        pairs = [pair for pair in self.pairs if pair.B in zp]
        names = [f"{where}'s DeepSpeed partition"]
        if pairs and not self.correct_in_backward:  # (with it, the hooks corrected B already)
            G = zp.wholes(grad, [pair.B for pair in pairs])
            buckets: dict[tuple, list[LoraPair]] = defaultdict(list)
            for pair in pairs:
                buckets[(tuple(zp.piece(pair.B).shape), tuple(full_shape(pair.A)))].append(pair)
            corrected = []
            for bucket in buckets.values():
                M = self._stacked(bucket).to(grad.device)
                gs = correct_grads([G[id(p.B)] for p in bucket], M, out_dtype=grad.dtype)
                corrected += list(zip(bucket, gs))
            if self.check_finite:
                bad = [p.name for p, g in corrected if not bool(torch.isfinite(g).all())]
                if bad:  # whole gradients: every rank finds the same layers
                    raise FloatingPointError(
                        f"non-finite gradient in {bad[:5]}; step skipped, parameters unchanged"
                    )
            for pair, g in corrected:
                zp.write_(grad, pair.B, g)
        if self.check_finite:
            ok = bool(torch.isfinite(grad).all())
            if not zp.all_agree(ok):
                raise FloatingPointError(
                    f"non-finite gradient in {names[0]} on {'this' if not ok else 'another'} rank; "
                    "step skipped, parameters unchanged"
                )
        return group, [flat], [grad], [flat]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One LoRA-FA AdamW step (B corrected, every other trainable parameter plain AdamW)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pair: LoraPair | None
        for pair in self.pairs:
            if pair.A.grad is not None:
                raise RuntimeError(
                    f"layer {pair.name!r}: {_a_name(pair)}[{pair.adapter!r}] received a gradient, but LoRA-FA keeps A frozen "
                    "(was requires_grad turned back on?). Freeze it and set its .grad to None."
                )
        plans = []
        for group in self.param_groups:
            if is_zero_partition(group["params"], self._known):
                plan = self._zero_plan(group)
                if plan is not None:
                    plans.append(plan)
                continue
            lora: list[tuple[Tensor, LoraPair]] = []
            plain: list[Tensor] = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LoraFAAdamW does not support sparse gradients")
                pair = self._b_pair.get(id(p))
                if pair is not None and not self.correct_in_backward:
                    lora.append((p, pair))
                else:
                    plain.append(p)
            # Correct B's gradients, batched over layers with equal (shape, dtype, device).
            buckets: dict[tuple, list[tuple[Tensor, LoraPair]]] = defaultdict(list)
            for p, pair in lora:
                buckets[(tuple(p.shape), p.dtype, p.device)].append((p, pair))
            # Under FSDP2 the parameters and gradients are row shards (DTensors): B's correction is
            # row-wise (g_B·M) and AdamW element-wise, so both run on this rank's local rows; the
            # optimizer state is keyed by the parameter and holds those rows only.
            params, grads, names, keys = [], [], [], []
            for items in buckets.values():
                M = self._stacked([pair for _, pair in items])
                if M.device != items[0][0].device:
                    M = M.to(items[0][0].device)
                keys += [p for p, _ in items]
                params += [local_tensor(p) for p, _ in items]
                grads += correct_grads(
                    # parameters without a gradient were skipped above
                    [local_tensor(cast(Tensor, p.grad)) for p, _ in items],
                    M,
                    out_dtype=moment_dtype(items[0][0]),
                )
                names += [pair.name for _, pair in items]
            keys += plain
            params += [local_tensor(p) for p in plain]
            # all have one, as above
            grads += [local_tensor(cast(Tensor, p.grad)) for p in plain]
            names += [f"parameter {tuple(p.shape)}" for p in plain]
            if self.check_finite:
                self._check_finite(grads, names, keys)
            plans.append((group, params, grads, keys))
        for group, params, grads, keys in plans:
            # Parameters sharing a step count go through one foreach AdamW update.
            by_step: dict[tuple[int, torch.device], list[tuple[Tensor, Tensor, Tensor]]] = (
                defaultdict(list)
            )
            for p, g, key in zip(params, grads, keys):
                state = self.state[key]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(
                        p, dtype=moment_dtype(p), memory_format=torch.preserve_format
                    )
                    state["exp_avg_sq"] = torch.zeros_like(
                        p, dtype=moment_dtype(p), memory_format=torch.preserve_format
                    )
                state["step"] += 1
                by_step[(int(state["step"].item()), p.device)].append((p, g, key))
            for (step, _), step_items in by_step.items():
                states = [self.state[key] for _, _, key in step_items]
                adamw_update_(
                    [p for p, _, _ in step_items],
                    [g for _, g, _ in step_items],
                    [st["exp_avg"] for st in states],
                    [st["exp_avg_sq"] for st in states],
                    step=step,
                    lr=group["lr"],
                    betas=tuple(group["betas"]),
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    style=group["style"],
                )
        return loss
