"""Build a GaLore / GoLore optimizer for a model: target layers get a projector, the rest plain AdamW.

Example:
    >>> from loralab.core.testing import tiny_llama
    >>> from loralab.golore import create_golore_optimizer
    >>> opt = create_golore_optimizer(tiny_llama(), 1e-3, rank=8, rand_ratio=0.8, total_steps=100)
    >>> [g["rank"] for g in opt.param_groups]
    [8, None]
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from torch.optim import Optimizer

from loralab.core.targets import TargetSpec, find_targets
from loralab.core.zero_views import full_shape
from loralab.golore.adafactor import GaLoreAdafactor, GoLoreAdafactor
from loralab.golore.adamw8bit import GaLoreAdamW8bit, GoLoreAdamW8bit
from loralab.golore.optimizer import GaLoreAdamW, GaLoreSGD, GoLoreAdamW, GoLoreSGD

__all__ = ["create_galore_optimizer", "create_golore_optimizer", "subspace_param_groups"]

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "sgd")
_GALORE = {
    "adamw": GaLoreAdamW,
    "adamw8bit": GaLoreAdamW8bit,
    "adafactor": GaLoreAdafactor,
    "sgd": GaLoreSGD,
}
_GOLORE = {
    "adamw": GoLoreAdamW,
    "adamw8bit": GoLoreAdamW8bit,
    "adafactor": GoLoreAdafactor,
    "sgd": GoLoreSGD,
}


def subspace_param_groups(
    model: nn.Module, targets: TargetSpec = "all-linear", **subspace: Any
) -> list[dict[str, Any]]:
    """Two param groups: the trainable 2-D weights of ``targets`` (with ``subspace`` keys) and the rest.

    Quantized (bitsandbytes) and frozen target weights are skipped because they have no gradient to
    project; everything else trainable (embeddings, norms, biases, heads) goes to the plain group.
    """
    found = find_targets(model, targets)
    projected_ids = {
        id(t.weight)
        for t in found.values()
        # full_shape: a ZeRO-3 partitioned weight (a model loaded under deepspeed.zero.Init) is 1-D
        # and empty on this rank; its shape is the whole matrix's
        if t.weight.requires_grad and len(full_shape(t.weight)) == 2 and not t.is_quantized
    }
    projected: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (projected if id(p) in projected_ids else plain).append(p)
    if not projected:
        raise ValueError(
            f"targets={targets!r} selected no trainable 2-D weight of {type(model).__name__} to project (are the weights frozen or quantized?)"
        )
    groups = [dict(params=projected, **subspace)]
    if plain:
        groups.append(dict(params=plain, rank=None))
    logger.info(
        "GaLore/GoLore: %d projected weights, %d plain parameters", len(projected), len(plain)
    )
    return groups


def _build(
    classes: dict[str, type],
    model: nn.Module,
    lr: float | None,
    optimizer: str,
    targets: TargetSpec,
    weight_decay: float,
    subspace: dict[str, Any],
    extra: dict[str, Any],
) -> Optimizer:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    groups = subspace_param_groups(model, targets, **subspace)
    if optimizer == "sgd":
        extra = {"momentum": 0.9, **extra}
    # unknown keyword arguments raise the optimizer's own TypeError naming them
    return classes[optimizer](groups, lr=lr, weight_decay=weight_decay, **extra)


def create_galore_optimizer(
    model: nn.Module,
    lr: float | None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    weight_decay: float = 0.0,
    targets: TargetSpec = "all-linear",
    optimizer: str = "adamw",
    **optimizer_kwargs: Any,
) -> Optimizer:
    """GaLore (SVD projectors) on the ``targets`` layers of ``model``, plain AdamW/SGD elsewhere.

    Args:
        model: the model; its trainable parameters are all optimized.
        lr: learning rate (``None`` only for ``optimizer="adafactor"`` with its default
            ``relative_step=True``; a float there needs ``relative_step=False``).
        rank, update_proj_gap, scale, proj_type: GaLore's projector settings (paper defaults for
            pre-training: 128 / 200 / 0.25 / std).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        targets: which layers get a projector (``"all-linear"``, a regex, or names; see
            :func:`loralab.core.find_targets`).
        optimizer: ``"adamw"`` (:class:`GaLoreAdamW`), ``"adamw8bit"`` (:class:`GaLoreAdamW8bit`),
            ``"adafactor"`` (:class:`GaLoreAdafactor`) or ``"sgd"`` (:class:`GaLoreSGD`, momentum
            0.9 unless given).
        **optimizer_kwargs: passed to the optimizer (``betas``, ``eps``, ``momentum``,
            ``optim_bits``, ``min_8bit_size``, ``relative_step``, ``reproject_moments``,
            ``second_moment``, ``svd_method``, ``seed``, ...); one it does not take raises its
            ``TypeError`` naming it.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> opt = create_galore_optimizer(tiny_llama(), 1e-3, rank=8)
    """
    subspace = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type)
    return _build(
        _GALORE,
        model,
        lr,
        optimizer,
        targets,
        weight_decay,
        subspace,
        optimizer_kwargs,
    )


def create_golore_optimizer(
    model: nn.Module,
    lr: float | None,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    rand_ratio: float = 0.0,
    total_steps: int,
    weight_decay: float = 0.0,
    targets: TargetSpec = "all-linear",
    optimizer: str = "adamw",
    **optimizer_kwargs: Any,
) -> Optimizer:
    """GoLore: SVD projectors for the first ``rand_ratio`` fraction of ``total_steps``, random after.

    ``rand_ratio`` follows the GoLore paper's code (``use_rand = step / total_steps >= rand_ratio``):
    ``0.8`` (their C4 setting) is SVD for the first 80 % of the steps and random Stiefel projectors
    for the last 20 %; ``0.0`` (default) is random from the start; ``1.0`` is GaLore.
    Other arguments as :func:`create_galore_optimizer`.

    Example:
        >>> from loralab.core.testing import tiny_llama
        >>> opt = create_golore_optimizer(tiny_llama(), 1e-3, rank=8, rand_ratio=0.8, total_steps=1000)
    """
    subspace = dict(
        rank=rank,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        rand_ratio=rand_ratio,
        total_steps=total_steps,
    )
    return _build(
        _GOLORE,
        model,
        lr,
        optimizer,
        targets,
        weight_decay,
        subspace,
        optimizer_kwargs,
    )
