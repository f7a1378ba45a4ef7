"""What every gradient estimator in core shares (the plain path of :mod:`.gradients`, the
block-wise path of :mod:`.offload`): the consumer and loss types, the error, the default loss, the
finiteness check and the estimation mode (only the target weights require grad; all restored).

Example:
    >>> from loralab.core.estimation import default_loss
    >>> from loralab.core.testing import tiny_llama, make_lm_batches
    >>> float(default_loss(tiny_llama(), make_lm_batches(1)[0])) > 0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from loralab.core.quant import cpu_repacking_off
from loralab.core.sharding import refresh_fsdp_trainable

__all__ = [
    "GradientConsumer",
    "GradientEstimationError",
    "LossFn",
    "check_finite",
    "default_loss",
    "estimation_mode",
]


GradientConsumer = Callable[[str, Tensor], None]
"""Called as ``consumer(layer_name, grad)`` once per target with its final (out, in) fp32 gradient."""

LossFn = Callable[[nn.Module, Any], Tensor]


class GradientEstimationError(RuntimeError):
    """Gradient estimation could not produce a valid gradient (no data, unused or quantized layer, NaN)."""


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss``, with the batch moved to the model's device."""
    if not isinstance(batch, Mapping):
        raise GradientEstimationError(
            f"batches must be mappings of model inputs (dicts with input_ids, labels, ...), got {type(batch).__name__}; "
            "pass loss_fn=lambda model, batch: ... for other batch types"
        )
    device = _model_device(model)
    inputs = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    out = model(**inputs)
    # ModelOutput is a Mapping that drops None entries: .get, not [], so a missing loss is our error
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise GradientEstimationError(
            f"{type(model).__name__}(**batch) returned no loss: include 'labels' in each batch or pass loss_fn"
        )
    return loss


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def check_finite(name: str, grad: Tensor) -> None:
    """Raise :class:`GradientEstimationError` naming ``name`` if ``grad`` has NaN or Inf entries."""
    if not torch.isfinite(grad).all():
        bad = int((~torch.isfinite(grad)).sum())
        raise GradientEstimationError(
            f"non-finite gradient for layer {name!r} ({bad} of {grad.numel()} entries are NaN/Inf); "
            "check the loss on these batches, lower the sequence length, or estimate in float32"
        )


@contextmanager
def estimation_mode(model: nn.Module, weights: Iterable[nn.Parameter], train: bool) -> Any:
    """Only ``weights`` require grad, ``.grad`` cleared, mode set, bitsandbytes' CPU repacking off
    (:func:`~loralab.core.quant.cpu_repacking_off`: an estimate's own no-grad forwards would repack
    4-bit layers and cut the backward through them); everything restored on exit (under FSDP2, its
    groups re-read the trainable parameters after each change)."""
    weights = list(weights)
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        refresh_fsdp_trainable(model)  # FSDP2 reads the trainable set once, at its first forward
        model.train(train)
        with cpu_repacking_off(model):
            yield
    finally:
        for p, flag, g in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = g
        refresh_fsdp_trainable(model)
        model.train(was_training)
