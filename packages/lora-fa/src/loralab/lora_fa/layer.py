"""The memory-saving LoRA-FA adapter path: backward keeps ``X·Aᵀ`` (r-dimensional), never ``X``.

A PEFT LoRA layer computes ``y = base(X) + s·B(A(dropout(X)))``. LoRA-FA (arXiv 2308.03303, §3) freezes
``A``, so B's gradient ``∂L/∂B = s·(∂L/∂y)ᵀ·H`` needs only ``H = dropout(X)·Aᵀ`` (r columns, saved by
``lora_B``) and X's gradient through the adapter is ``mask ⊙ (s·∂L/∂y·B·A)``; ``X`` itself is never
needed. Autograd already skips saving ``X`` for a frozen ``A``, but ``nn.Dropout`` keeps its mask — a
tensor of X's shape (float on CPU, bool on CUDA), one per adapted layer since q, k, v … each own a
dropout — and with the usual ``lora_dropout > 0`` most of the saving is gone again.

:func:`apply_lorafa_layers` therefore turns each adapter's down projection into a
:class:`FrozenDownProjection`, which fuses dropout into the frozen ``A`` matmul with a custom autograd
function that saves only an integer seed and regenerates the mask in backward. The frozen base
weight's input-gradient path is PEFT's own, untouched (``base_layer`` is not wrapped).

The swap keeps the module tree and state-dict keys (``lora_A.<adapter>.weight``), so PEFT's saving,
merging and QLoRA (bitsandbytes base layers) work unchanged. It works with gradient checkpointing:
the seed lives on the autograd node of the original forward (non-reentrant checkpointing reuses it),
and it is drawn from the global CPU generator, whose state checkpointing restores before
recomputation, so a recomputed forward draws the same seed (reentrant checkpointing).

Example:
    >>> import peft, torch
    >>> from loralab.core.testing import tiny_llama
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    >>> names = apply_lorafa_layers(model)
    >>> len(names), model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].p
    (2, 0.1)
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import Tensor, nn

from loralab.core.lora_layers import find_lora_pairs

__all__ = [
    "FrozenDownProjection",
    "apply_lorafa_layers",
    "frozen_down_projection",
    "lorafa_dropout_mask",
    "remove_lorafa_layers",
]

logger = logging.getLogger(__name__)

_SEED_HIGH = 2**62


def _draw_seed() -> int:
    """A fresh dropout seed from the global CPU generator (restored by checkpointing on recompute)."""
    return int(torch.randint(0, _SEED_HIGH, (1,)).item())


def lorafa_dropout_mask(
    shape: torch.Size, dtype: torch.dtype, device: torch.device, p: float, seed: int
) -> Tensor:
    """The inverted-dropout multiplier ``bernoulli(1−p)/(1−p)`` drawn from a generator seeded with ``seed``.

    Deterministic in ``(shape, dtype, device, p, seed)``: backward calls it again instead of storing it.

    Example:
        >>> m = lorafa_dropout_mask(torch.Size([2, 3]), torch.float32, torch.device("cpu"), 0.5, seed=1)
        >>> bool(((m == 0) | (m == 2)).all()), torch.equal(m, lorafa_dropout_mask(m.shape, m.dtype, m.device, 0.5, 1))
        (True, True)
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    mask = torch.empty(shape, dtype=dtype, device=device).bernoulli_(1.0 - p, generator=gen)
    return mask.div_(1.0 - p)


class _FrozenDown(torch.autograd.Function):
    """``H = (X ⊙ mask)·Aᵀ`` with A frozen; saves A (a parameter: no extra memory) and the seed, not X."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, p: float, seed: int) -> Tensor:
        if p > 0.0:
            x = x * lorafa_dropout_mask(x.shape, x.dtype, x.device, p, seed)
        ctx.save_for_backward(weight)
        ctx.p, ctx.seed = p, seed
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad_h: Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            shape, dtype, device = ctx.x_meta
            # under autocast H (and so grad_h) may be half precision: multiply in grad_h's dtype, return X's
            grad_x = (grad_h @ weight.to(grad_h.dtype)).to(dtype)
            if ctx.p > 0.0:
                grad_x = grad_x * lorafa_dropout_mask(shape, dtype, device, ctx.p, ctx.seed)
        return grad_x, None, None, None


def frozen_down_projection(
    x: Tensor, weight: Tensor, p: float = 0.0, seed: int | None = None
) -> Tensor:
    """Functional form: ``dropout_p(x) @ weightᵀ`` whose backward stores neither ``x`` nor the mask.

    Args:
        x: adapter input (..., in).
        weight: the frozen A, (r, in); must not require grad.
        p: dropout probability (0 = no dropout).
        seed: seed of the dropout mask; drawn from the global CPU generator when ``None``.

    Raises:
        RuntimeError: ``weight`` requires grad (this backward cannot produce A's gradient).
        ValueError: ``p`` outside [0, 1).

    Example:
        >>> x = torch.randn(5, 8, requires_grad=True)
        >>> h = frozen_down_projection(x, torch.randn(2, 8), p=0.1, seed=0)
        >>> h.shape
        torch.Size([5, 2])
    """
    if weight.requires_grad:
        raise RuntimeError(
            "frozen_down_projection: lora_A requires grad, but LoRA-FA keeps A frozen (its backward does not keep "
            "the input needed for A's gradient). Freeze it with lora_A.weight.requires_grad_(False)."
        )
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    if p > 0.0 and seed is None:
        seed = _draw_seed()
    return _FrozenDown.apply(x, weight, float(p), 0 if seed is None else int(seed))


class FrozenDownProjection(nn.Linear):
    """A PEFT ``lora_A`` ``nn.Linear`` whose weight is frozen and whose dropout is fused (see module doc).

    Instances are made by :func:`apply_lorafa_layers` by changing the class of PEFT's own ``lora_A``
    module (same parameter object, same state-dict keys), with ``p`` taken from the layer's
    ``lora_dropout``. ``layer_name`` is kept for error messages.
    """

    p: float
    layer_name: str

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.requires_grad:
            raise RuntimeError(
                f"LoRA-FA layer {self.layer_name!r}: lora_A requires grad. LoRA-FA keeps A frozen and its memory-saving "
                "backward cannot produce A's gradient; freeze it (lora_A.weight.requires_grad_(False)) or undo "
                "the swap with remove_lorafa_layers(model)."
            )
        return frozen_down_projection(x, self.weight, self.p if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, frozen=True"


def _register_frozen(
    module: nn.Module, adapter: str, weight_name: str, frozen: bool = True
) -> None:
    """Declare ``weight_name`` non-trainable to PEFT (>= 0.21) so ``set_adapter`` / ``disable_adapter()`` keep it frozen.

    PEFT re-enables ``requires_grad`` on every adapter weight when an adapter is (re)activated, which would
    break the frozen-A contract mid-training (e.g. after TRL's ``with model.disable_adapter():``); layers
    list weights that must stay frozen in ``frozen_peft_weight_names``, which those code paths honour.
    Older PEFT has no such list: the forward's requires-grad check then names the layer instead.
    """
    names = getattr(module, "frozen_peft_weight_names", None)
    if not isinstance(names, dict):
        return
    names = {
        k: tuple(v) for k, v in names.items()
    }  # the class-level default is shared: never mutate it
    current = names.get(adapter, ())
    if frozen and weight_name not in current:
        names[adapter] = (*current, weight_name)
    elif not frozen:
        names[adapter] = tuple(n for n in current if n != weight_name)
        if not names[adapter]:
            del names[adapter]
    # a plain dict attribute (nn.Module's attribute typing only knows Tensor | Module)
    setattr(module, "frozen_peft_weight_names", names)  # noqa: B010


def apply_lorafa_layers(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Make every LoRA layer of ``model`` a memory-saving LoRA-FA layer (in place); returns their names.

    For each layer: ``lora_A[adapter]`` is frozen and becomes a :class:`FrozenDownProjection` carrying
    the dropout probability, and ``lora_dropout[adapter]`` becomes ``nn.Identity`` (dropout now happens
    inside the down projection, with the mask regenerated in backward). Idempotent. Works for LoRA on
    ``nn.Linear``, GPT-2 ``Conv1D`` and bitsandbytes 4/8-bit base layers (the down projection is an
    ``nn.Linear`` in all of them).

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers).
        adapter_name: which adapter; ``None`` = the active one.

    Raises:
        loralab.core.lora_layers.LoraPairError: the model has no LoRA layers.
        ValueError: a layer's ``lora_A`` is not a bias-free ``nn.Linear`` (LoRA on convolutions), the
            adapter is a LoRA variant (DoRA, …) whose forward does not go through ``lora_A(dropout(x))``,
            or its dropout is not ``nn.Dropout``/``nn.Identity`` — the message names the layer.

    Example:
        >>> # see the module docstring
    """
    names = []
    for pair in find_lora_pairs(model, adapter_name):
        module, adapter = pair.module, pair.adapter
        down = cast(nn.ModuleDict, module.lora_A)[adapter]  # a PEFT LoraLayer's ModuleDict
        if isinstance(down, FrozenDownProjection):
            names.append(pair.name)
            continue
        if adapter in getattr(module, "lora_variant", {}):
            variant = type(cast(dict[str, Any], module.lora_variant)[adapter]).__name__
            raise ValueError(
                f"layer {pair.name!r}: adapter {adapter!r} is a LoRA variant ({variant}, e.g. use_dora=True); the LoRA-FA "
                "memory-saving layer supports plain LoRA only — build the model without the variant"
            )
        if type(down) is not nn.Linear or down.bias is not None:
            raise ValueError(
                f"layer {pair.name!r}: lora_A[{adapter!r}] is {type(down).__name__}; the LoRA-FA memory-saving layer supports "
                "bias-free nn.Linear down projections (LoRA on Linear, Conv1D and bitsandbytes base layers)"
            )
        dropouts = cast(nn.ModuleDict, module.lora_dropout)  # a PEFT LoraLayer's ModuleDict
        dropout = dropouts[adapter] if adapter in dropouts else nn.Identity()
        if type(dropout) is nn.Dropout:
            p = float(dropout.p)
        elif isinstance(dropout, nn.Identity):
            p = 0.0
        else:
            raise ValueError(
                f"layer {pair.name!r}: lora_dropout[{adapter!r}] is {type(dropout).__name__}; the LoRA-FA memory-saving "
                "layer supports nn.Dropout or nn.Identity"
            )
        down.weight.requires_grad_(False)
        _register_frozen(module, adapter, "lora_A")
        down.__class__ = FrozenDownProjection
        down.p = p
        down.layer_name = pair.name
        module.lora_dropout[adapter] = nn.Identity()
        names.append(pair.name)
    logger.info("LoRA-FA memory-saving down projection on %d layers", len(names))
    return names


def remove_lorafa_layers(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Undo :func:`apply_lorafa_layers`: plain ``nn.Linear`` ``lora_A`` (still frozen) and ``nn.Dropout(p)`` again.

    Returns the names of the layers restored (layers never converted are left alone).

    Example:
        >>> import peft
        >>> from loralab.core.testing import tiny_llama
        >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
        >>> _ = apply_lorafa_layers(model)
        >>> len(remove_lorafa_layers(model))
        2
    """
    names = []
    for pair in find_lora_pairs(model, adapter_name):
        module, adapter = pair.module, pair.adapter
        down = cast(nn.ModuleDict, module.lora_A)[adapter]  # a PEFT LoraLayer's ModuleDict
        if not isinstance(down, FrozenDownProjection):
            continue
        p = down.p
        _register_frozen(module, adapter, "lora_A", frozen=False)
        # the in-place class swap back; the checker types __class__ as the narrowed class
        down.__class__ = nn.Linear  # type: ignore[assignment]
        del down.p, down.layer_name
        cast(nn.ModuleDict, module.lora_dropout)[adapter] = (
            nn.Dropout(p) if p > 0.0 else nn.Identity()
        )
        names.append(pair.name)
    return names
