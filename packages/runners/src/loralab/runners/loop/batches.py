"""Where the loop's micro-batches come from: a :class:`BatchSource` hands out this rank's micro-batches
for one optimizer step and can save and restore its position (exact resume).

- :class:`EpochBatches`: a map-style dataset (a list of examples) in a seeded permutation per epoch;
  global micro-batch ``m`` of an epoch is examples ``order[m·B : (m+1)·B]`` and rank ``r`` of ``W``
  takes ``m = k·W + r``, so one step on W ranks sees the same examples as one process with W·B.
- :class:`ListBatches`: a fixed list of ready batches (compare's runs: every method the same batches).
- Streaming sources (C4's token streams) implement the same three methods.

Example:
    >>> src = EpochBatches(list(range(10)), collate=lambda xs: xs, batch_size=2, seed=0)
    >>> len(src.next_batches(2)), src.state_dict()
    (2, {'epoch': 0, 'batch_in_epoch': 2})
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.data import Sampler

__all__ = [
    "BatchSource",
    "DataExhausted",
    "EpochBatches",
    "EpochSampler",
    "ListBatches",
    "to_device",
]


class DataExhausted(RuntimeError):
    """A finite source has no more micro-batches (the loop stops with a checkpoint and says so)."""


@runtime_checkable
class BatchSource(Protocol):
    def next_batches(self, n: int) -> list[Any]:
        """This rank's next ``n`` micro-batches (raise :class:`DataExhausted` when there are none)."""

    def state_dict(self) -> dict[str, Any]:
        """The position, JSON-serializable (stored in the checkpoint's ``trainer_state.json``)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""


class EpochSampler(Sampler[int]):
    """A seeded permutation of ``range(n)`` per epoch (``set_epoch``), independent of the global RNG."""

    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, dict):
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return batch


class EpochBatches:
    """Micro-batches of ``batch_size`` examples of ``dataset`` for rank ``rank`` of ``world_size``
    (see the module docstring); incomplete global batches at an epoch's end are dropped.

    Raises:
        ValueError: the dataset has fewer examples than one global micro-batch.
    """

    def __init__(
        self,
        dataset: Sequence[Any],
        collate: Callable[[list[Any]], Any],
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if len(dataset) < batch_size * world_size:
            raise ValueError(
                f"the training set has {len(dataset)} examples, fewer than one global batch "
                f"({batch_size} x {world_size} processes)"
            )
        self.dataset, self.collate, self.batch_size = dataset, collate, batch_size
        self.seed, self.rank, self.world_size, self.device = seed, rank, world_size, device
        self.sampler = EpochSampler(len(dataset), seed)
        self.epoch, self.batch_in_epoch = 0, 0
        self._order: list[int] | None = None

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank."""
        return len(self.dataset) // (self.batch_size * self.world_size)

    def _epoch_order(self) -> list[int]:
        if self._order is None:
            self.sampler.set_epoch(self.epoch)
            self._order = list(self.sampler)
        return self._order

    def next_batches(self, n: int) -> list[Any]:
        out = []
        for _ in range(n):
            if self.batch_in_epoch >= self.batches_per_epoch:
                self.epoch, self.batch_in_epoch, self._order = self.epoch + 1, 0, None
            m = self.batch_in_epoch * self.world_size + self.rank
            idx = self._epoch_order()[m * self.batch_size : (m + 1) * self.batch_size]
            out.append(to_device(self.collate([self.dataset[i] for i in idx]), self.device))
            self.batch_in_epoch += 1
        return out

    def first_batches(self, n: int) -> list[Any]:
        """This rank's first ``n`` micro-batches of epoch 0 (for gradient-based inits), position unchanged."""
        saved = self.state_dict()
        self.load_state_dict({"epoch": 0, "batch_in_epoch": 0})
        try:
            return self.next_batches(min(n, self.batches_per_epoch))
        finally:
            self.load_state_dict(saved)

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.batch_in_epoch / max(self.batches_per_epoch, 1)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.batch_in_epoch, self._order = state["epoch"], state["batch_in_epoch"], None


class ListBatches:
    """Ready batches in a fixed order; :class:`DataExhausted` after the last one."""

    def __init__(self, batches: Sequence[Any], device: torch.device | str = "cpu") -> None:
        self.batches, self.device, self.position = list(batches), device, 0

    def next_batches(self, n: int) -> list[Any]:
        if self.position + n > len(self.batches):
            raise DataExhausted(
                f"{len(self.batches)} batches given, step needs #{self.position + n}"
            )
        out = self.batches[self.position : self.position + n]
        self.position += n
        return [to_device(b, self.device) for b in out]

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]
