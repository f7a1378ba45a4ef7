"""The memory-saving LoRA-FA adapter path: backward keeps ``X·Aᵀ`` (r-dimensional), never ``X``.

A PEFT LoRA layer computes ``y = base(X) + s·B(A(dropout(X)))``. LoRA-FA (arXiv 2308.03303, §3) freezes
``A``, so B's gradient ``∂L/∂B = s·(∂L/∂y)ᵀ·H`` needs only ``H = dropout(X)·Aᵀ`` (r columns, saved by
``lora_B``) and X's gradient through the adapter is ``mask ⊙ (s·∂L/∂y·B·A)``; ``X`` itself is never
needed. Autograd already skips saving ``X`` for a frozen ``A``, but ``nn.Dropout`` keeps its mask — a
tensor of X's shape (float on CPU, bool on CUDA), one per adapted layer since q, k, v … each own a
dropout — and with the usual ``lora_dropout > 0`` most of the saving is gone again.

:func:`apply_lorafa_layers` therefore gives each adapter a :class:`LoraFAVariant`, a PEFT
``LoraVariant`` (PEFT's public hook for LoRA layers that compute differently; nothing of PEFT is
changed): its forward fuses dropout into the frozen ``A`` matmul with a custom autograd function that
saves only an integer seed and regenerates the mask in backward. The frozen base weight's
input-gradient path is PEFT's own, untouched (``base_layer`` is not wrapped).

The layers, their modules and state-dict keys (``lora_A.<adapter>.weight``) are PEFT's own, so
saving, merging (the variant's merge is plain LoRA's) and QLoRA (bitsandbytes base layers) work
unchanged. It works with gradient checkpointing: the seed lives on the autograd node of the original
forward (non-reentrant checkpointing reuses it), and it is drawn from the global CPU generator, whose
state checkpointing restores before recomputation, so a recomputed forward draws the same seed
(reentrant checkpointing).

Example:
    >>> import peft, torch
    >>> from loralab.core.testing import tiny_llama
    >>> model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.1))
    >>> names = apply_lorafa_layers(model)
    >>> q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    >>> len(names), type(q_proj.lora_variant["default"]).__name__, q_proj.lora_A["default"].weight.requires_grad
    (2, 'LoraFAVariant', False)
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from torch import Tensor, nn

from loralab.core.lora_layers import find_lora_pairs
from loralab.core.targets import layer_kind

__all__ = [
    "LoraFAVariant",
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


class LoraFAVariant(LoraVariant):
    """PEFT ``LoraVariant`` of a LoRA-FA adapter: ``y = base(x) + s·B·(dropout(x)·Aᵀ)`` with ``A`` frozen,
    computed by :func:`frozen_down_projection` (backward keeps ``dropout(x)·Aᵀ``, not ``x`` nor the mask).

    Set on a PEFT LoRA layer's ``lora_variant[adapter]`` by :func:`apply_lorafa_layers`. The dropout
    probability is the layer's own ``lora_dropout[adapter]`` (``nn.Dropout`` or ``nn.Identity``),
    active in train mode only. Merging and conversion are plain LoRA's (the function is LoRA's).
    ``layer_name`` is kept for error messages.
    """

    def __init__(self, layer_name: str) -> None:
        self.layer_name = layer_name

    def supports_lora_conversion(self) -> bool:
        return True  # the function is plain LoRA's: only the backward's saved tensors differ

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to create: A and B are PEFT's own (the variant is set on existing layers)."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        delta = cast(Tensor, cast(Any, module).get_delta_weight(active_adapter))
        return orig_weight + delta.to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> None:
        delta = cast(Tensor, cast(Any, module).get_delta_weight(active_adapter))
        orig_weight.data += delta.to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: Tensor) -> Tensor:
        delta = cast(Tensor, cast(Any, module).get_delta_weight(active_adapter))
        return orig_weight - delta.to(orig_weight.dtype)

    def forward(  # type: ignore[override]  # an instance method: it names its layer in errors
        self, module: LoraLayer, active_adapter: str, x: Tensor, result: Tensor, **kwargs: Any
    ) -> Tensor:
        down = cast(nn.Linear, module.lora_A[active_adapter])
        up = module.lora_B[active_adapter]
        if down.weight.requires_grad:
            raise RuntimeError(
                f"LoRA-FA layer {self.layer_name!r}: lora_A requires grad. LoRA-FA keeps A frozen and its memory-saving "
                "backward cannot produce A's gradient; freeze it (lora_A.weight.requires_grad_(False)) or undo "
                "the conversion with remove_lorafa_layers(model)."
            )
        p = _dropout_p(module, active_adapter, self.layer_name)
        dropout = module.lora_dropout[active_adapter]
        h = frozen_down_projection(x, down.weight, p if dropout.training else 0.0)
        out = up(h) * module.scaling[active_adapter]
        if layer_kind(module.get_base_layer()) in ("linear4bit", "linear8bit"):
            # PEFT's bitsandbytes layers add the adapter output in the result's dtype (outside autocast)
            if not torch.is_autocast_enabled():
                out = out.to(result.dtype)
        return result + out


def _dropout_p(module: LoraLayer, adapter: str, layer_name: str) -> float:
    dropouts = module.lora_dropout  # a PEFT LoraLayer's ModuleDict
    dropout = dropouts[adapter] if adapter in dropouts else nn.Identity()
    if type(dropout) is nn.Dropout:
        return float(dropout.p)
    if isinstance(dropout, nn.Identity):
        return 0.0
    raise ValueError(
        f"layer {layer_name!r}: lora_dropout[{adapter!r}] is {type(dropout).__name__}; the LoRA-FA memory-saving "
        "layer supports nn.Dropout or nn.Identity"
    )


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

    For each layer: ``lora_A[adapter]`` is frozen and the adapter gets a :class:`LoraFAVariant`
    (``layer.lora_variant[adapter]``, PEFT's hook for LoRA variants), which computes the adapter with
    the layer's own dropout fused into the frozen down projection (the mask is regenerated in
    backward). Modules, parameters and state-dict keys stay PEFT's own. Idempotent. Works for LoRA on
    ``nn.Linear``, GPT-2 ``Conv1D`` and bitsandbytes 4/8-bit base layers (the down projection is an
    ``nn.Linear`` in all of them).

    Args:
        model: a ``PeftModel`` (or any module holding PEFT LoRA layers).
        adapter_name: which adapter; ``None`` = the active one.

    Raises:
        loralab.core.lora_layers.LoraPairError: the model has no LoRA layers.
        ValueError: a layer's ``lora_A`` is not a bias-free ``nn.Linear`` (LoRA on convolutions), the
            adapter is already another LoRA variant (DoRA, …), or its dropout is not
            ``nn.Dropout``/``nn.Identity`` — the message names the layer.

    Example:
        >>> # see the module docstring
    """
    names = []
    for pair in find_lora_pairs(model, adapter_name):
        module, adapter = pair.module, pair.adapter
        variants = cast(dict[str, Any], module.lora_variant)  # a PEFT LoraLayer's dict
        if isinstance(variants.get(adapter), LoraFAVariant):
            names.append(pair.name)
            continue
        if adapter in variants:
            variant = type(variants[adapter]).__name__
            raise ValueError(
                f"layer {pair.name!r}: adapter {adapter!r} is a LoRA variant ({variant}, e.g. use_dora=True); the LoRA-FA "
                "memory-saving layer supports plain LoRA only — build the model without the variant"
            )
        down = cast(nn.ModuleDict, module.lora_A)[adapter]  # a PEFT LoraLayer's ModuleDict
        if type(down) is not nn.Linear or down.bias is not None:
            raise ValueError(
                f"layer {pair.name!r}: lora_A[{adapter!r}] is {type(down).__name__}; the LoRA-FA memory-saving layer supports "
                "bias-free nn.Linear down projections (LoRA on Linear, Conv1D and bitsandbytes base layers)"
            )
        _dropout_p(
            module, adapter, pair.name
        )  # nn.Dropout or nn.Identity, else the error names the layer
        down.weight.requires_grad_(False)
        _register_frozen(module, adapter, "lora_A")
        variants[adapter] = LoraFAVariant(pair.name)
        names.append(pair.name)
    logger.info("LoRA-FA memory-saving down projection on %d layers", len(names))
    return names


def remove_lorafa_layers(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """Undo :func:`apply_lorafa_layers`: plain PEFT LoRA again (``A`` still frozen).

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
        variants = cast(dict[str, Any], module.lora_variant)  # a PEFT LoraLayer's dict
        if not isinstance(variants.get(adapter), LoraFAVariant):
            continue
        del variants[adapter]
        _register_frozen(module, adapter, "lora_A", frozen=False)
        names.append(pair.name)
    return names
