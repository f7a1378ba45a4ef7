"""The float32 gradient sums every estimator in core keeps per target layer: one post-accumulate-grad
hook per target weight adds each backward pass's gradient into a float32 sum and frees ``weight.grad``
at once. Shared by the hook path of :mod:`.gradients` and the block-wise order of :mod:`.offload`
(under FSDP2 the hooks receive this rank's rows after the reduce-scatter).

Example:
    >>> import torch
    >>> from loralab.core.targets import find_targets
    >>> lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> acc = GradientSums()
    >>> with summing_gradients(find_targets(lin, ["0"]), acc):
    ...     lin(torch.ones(1, 3)).sum().backward()
    >>> acc.sums["0"].shape, acc.counts["0"]
    (torch.Size([2, 3]), 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from loralab.core.sharding import is_dtensor, local_tensor
from loralab.core.targets import TargetLayer, to_storage_layout

__all__ = ["GradientSums", "summing_gradients"]


@dataclass
class GradientSums:
    """What :func:`summing_gradients` collects: per target the float32 gradient sum and the number
    of backward passes that reached it. ``fsdp``: the targets whose gradient arrived as FSDP2's
    ``DTensor`` (already averaged over the ranks): their sums are this rank's rows in the weight's
    storage layout, made whole by :func:`loralab.core.gradients._finish`."""

    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    fsdp: set[str] = field(default_factory=set)


@contextmanager
def summing_gradients(targets: Mapping[str, TargetLayer], acc: GradientSums) -> Iterator[None]:
    """While open, every backward pass adds each target's float32 gradient into ``acc.sums[name]``
    (``acc.counts[name]``: the passes that reached it) and frees ``weight.grad`` at once, so no second
    copy lives in the parameter dtype. A post-accumulate-grad hook runs once per pass, after autograd
    has accumulated within it; under FSDP2 it runs on the sharded parameter after the reduce-scatter."""

    def make_hook(name: str, module: nn.Module) -> Callable[[Tensor], None]:
        def hook(p: Tensor) -> None:
            grad = cast(Tensor, p.grad)
            if is_dtensor(grad):
                # FSDP2: this rank's rows of the ranks' mean gradient, a view of the reduce-scatter
                # output: copied before it is kept
                acc.fsdp.add(name)
                g, owned = local_tensor(grad), False
            else:
                # we own p.grad from here on: no copy unless transposed or cast
                g, owned = to_storage_layout(module, grad).float(), True
            if name in acc.sums:
                acc.sums[name].add_(g)
            else:
                acc.sums[name] = (g if owned else g.to(torch.float32, copy=True)).contiguous()
            acc.counts[name] = acc.counts.get(name, 0) + 1
            p.grad = None

        return hook

    handles = [
        t.weight.register_post_accumulate_grad_hook(make_hook(name, t.module))
        for name, t in targets.items()
    ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
