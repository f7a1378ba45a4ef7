"""Count the activation bytes autograd keeps for backward (deterministic; no allocator, no timing).

:func:`saved_tensor_bytes` installs ``torch.autograd.graph.saved_tensors_hooks`` and records, for every
tensor saved for backward, the storage it keeps alive. Storages are counted once (q, k and v saving
the same input share one), and parameters / buffers (``exclude``) are left out: they are in memory
anyway. The result is what a training step holds between forward and backward, per storage, so it
is the number that LoRA vs LoRA-FA changes.

Inside a non-reentrant checkpointed region the checkpoint's own hooks take precedence, so what it
recomputes instead of saving is (correctly) not counted.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.randn(3, 4))
    >>> x = torch.randn(5, 4, requires_grad=True)
    >>> with saved_tensor_bytes(exclude=[w]) as stats:
    ...     y = (x @ w.t()).relu()
    >>> stats.nbytes, stats.count  # x (5·4) for w's grad and relu's output (5·3), float32; w excluded
    (140, 2)
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["SavedTensorStats", "saved_tensor_bytes"]


@dataclass
class SavedTensorStats:
    """What :func:`saved_tensor_bytes` recorded."""

    nbytes: int = 0
    """Bytes of the distinct storages saved for backward (parameters / excluded tensors left out)."""
    count: int = 0
    """Number of distinct storages."""
    by_kind: Counter = field(default_factory=Counter)
    """``(shape, dtype) → bytes`` of the first tensor seen on each storage (for reports)."""
    _seen: set = field(default_factory=set, repr=False)


@contextlib.contextmanager
def saved_tensor_bytes(
    exclude: Iterable[Tensor] | torch.nn.Module = (),
) -> Iterator[SavedTensorStats]:
    """Context manager: bytes of the storages autograd saves for backward inside the block.

    Args:
        exclude: tensors (or a module, meaning its parameters and buffers) whose storages are not
            activations and are not counted.
    """
    if isinstance(exclude, torch.nn.Module):
        exclude = [*exclude.parameters(), *exclude.buffers()]
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    stats = SavedTensorStats()

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = (storage.device.type, storage.data_ptr())
        if storage.data_ptr() not in skip and key not in stats._seen:
            stats._seen.add(key)
            stats.nbytes += storage.nbytes()
            stats.count += 1
            stats.by_kind[(tuple(t.shape), str(t.dtype))] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield stats
