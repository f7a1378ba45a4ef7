"""GaLore / GoLore AdamW with 8-bit block-wise optimizer states (bitsandbytes), galore-torch's ``GaLoreAdamW8bit``.

The projected (low-rank) moments are stored as bitsandbytes' block-wise 8-bit states (Dettmers et
al., arXiv 2110.02861: dynamic-tree quantization, one float32 absmax per block of 256 entries),
~2 bytes per moment pair instead of 8; the update is bitsandbytes' own
``optimizer_update_8bit_blockwise`` kernel (fused CUDA kernel on GPU; on CPU bitsandbytes 0.50
registers a reference implementation that dequantizes, updates in float32 and re-quantizes). That is
the combination behind GaLore's "7B on a 24 GB GPU" figure (GaLore, arXiv 2403.03507, Sec. 5.4).

As galore-torch's ``GaLoreAdamW8bit``: states smaller than ``min_8bit_size`` entries stay float32;
for projected weights the kernel runs on a zero low-rank buffer with weight decay 0, the buffer
(``−lr·N``) is projected back, scaled by ``scale`` and added to the weight, then decoupled weight
decay ``p ← p − lr·λ·p`` is applied; other parameters are updated by the kernel in place (weight
decay inside, before the step). Differences, on purpose:

- ``optim_bits`` is honoured (galore-torch always passes 8; its signature's default of 32 is
  ignored), so the default here is 8, galore-torch's behaviour;
- galore-torch 1.0 passes ``percentile_clipping`` and ``block_wise`` positionally into bitsandbytes,
  where since bitsandbytes 0.44 those slots are ``max_unorm`` and ``skip_zeros``: with the defaults
  every float32-state parameter gets ``max_unorm=100`` (an update larger than 100× the parameter
  norm is shrunk, so a zero-initialised small parameter never moves). Here ``percentile_clipping``
  must be 100 (no clipping; bitsandbytes 0.50 has no percentile clipping any more) and
  ``block_wise`` True; neither is applied as something else;
- moments are re-projected on a subspace change (``reproject_moments``, dequantize → change of basis
  → re-quantize), as :class:`~loralab.golore.GaLoreAdamW`; ``False`` is galore-torch's behaviour;
- state is tensors only (no projector object), as every loralab optimizer.

Example:
    >>> import torch
    >>> from loralab.golore import GaLoreAdamW8bit
    >>> w = torch.nn.Parameter(torch.randn(512, 256)); b = torch.nn.Parameter(torch.zeros(512))
    >>> opt = GaLoreAdamW8bit([{"params": [w], "rank": 32}, {"params": [b]}], lr=1e-3)
    >>> (w.sum() + b.sum()).backward(); opt.step()
    >>> opt.state[w]["state1"].dtype, tuple(opt.state[w]["state1"].shape)  # 8-bit (512, 32) moments
    (torch.uint8, (512, 32))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from loralab.core.adamw import check_adamw_hparams
from loralab.golore.optimizer import SubspaceOptimizer
from loralab.golore.projector import Side, reproject_first_moment, reproject_second_moment
from loralab.golore.subspace import Item, _is_int

__all__ = ["GaLoreAdamW8bit", "GoLoreAdamW8bit", "optimizer_state_bytes"]

BLOCKSIZE = 256
"""Entries per absmax block of bitsandbytes' block-wise 8-bit optimizer states."""

_QMAPS: dict[tuple[str, bool], Tensor] = {}


def _qmap(device: torch.device, signed: bool) -> Tensor:
    """bitsandbytes' dynamic (signed, first moment) / unsigned (second moment) 8-bit code, one per device."""
    key = (str(device), signed)
    if key not in _QMAPS:
        import bitsandbytes.functional as bnbf

        _QMAPS[key] = bnbf.create_dynamic_map(signed=signed).to(device)
    return _QMAPS[key]


def _dequant(q: Tensor, absmax: Tensor, code: Tensor) -> Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_blockwise(q, absmax=absmax, code=code, blocksize=BLOCKSIZE)


def _requant_(x: Tensor, q: Tensor, absmax: Tensor, code: Tensor) -> None:
    import bitsandbytes.functional as bnbf

    out, qs = bnbf.quantize_blockwise(x.float().contiguous(), code=code, blocksize=BLOCKSIZE)
    q.copy_(out)
    absmax.copy_(qs.absmax)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, *, exclude: Iterable[str] = ()) -> int:
    """Bytes of the tensors in ``optimizer.state`` (each storage counted once; ``exclude``: keys to skip).

    bitsandbytes' quantization maps are one shared tensor per device and are counted once.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.zeros(4, 4)); w.grad = torch.ones(4, 4)
        >>> opt = torch.optim.AdamW([w]); opt.step()
        >>> optimizer_state_bytes(opt, exclude=("step",))
        128
    """
    skip, seen, total = set(exclude), set(), 0
    for state in optimizer.state.values():
        for key, value in state.items():
            if key in skip or not isinstance(value, Tensor):
                continue
            ptr = (value.untyped_storage().data_ptr(), value.device)
            if ptr in seen:
                continue
            seen.add(ptr)
            total += value.untyped_storage().nbytes()
    return total


class GaLoreAdamW8bit(SubspaceOptimizer):
    """AdamW with 8-bit block-wise states in a low-rank gradient subspace (galore-torch's ``GaLoreAdamW8bit``).

    Same param-group keys as :class:`~loralab.golore.GaLoreAdamW` (``rank``, ``update_proj_gap``,
    ``scale``, ``proj_type``, ``projection``, ``rand_step`` / ``rand_ratio`` + ``total_steps``,
    ``reproject_moments``, ``second_moment``, ``svd_method``, ``seed``) plus ``optim_bits`` and
    ``min_8bit_size``. The positional arguments and defaults are galore-torch's (``eps=1e-8``,
    ``weight_decay=1e-2``, bitsandbytes' AdamW8bit defaults).

    Args:
        params: parameters or param-group dicts.
        lr, betas, eps, weight_decay: AdamW hyper-parameters (the kernel's torch-style AdamW).
        amsgrad: must be False (bitsandbytes' 8-bit Adam has no AMSGrad; galore-torch ignores it).
        optim_bits: 8 (default: 8-bit states, galore-torch's behaviour) or 32 (float32 states,
            same kernel family).
        args: must be None (bitsandbytes' ``GlobalOptimManager`` argument object is not supported).
        min_8bit_size: states with fewer entries stay float32 (bitsandbytes' rule, default 4096).
        percentile_clipping: must be 100 (no clipping; see the module docstring).
        block_wise: must be True (block-wise quantization, bitsandbytes' only 8-bit mode on CPU).
        is_paged: must be False (paged states are CUDA unified memory, not supported here).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(256, 512)
        >>> opt = GaLoreAdamW8bit([{"params": [lin.weight], "rank": 32, "update_proj_gap": 200,
        ...                         "scale": 0.25, "proj_type": "std"}, {"params": [lin.bias]}], lr=1e-3)
    """

    _moment_keys = ("state1", "state2")
    # bitsandbytes quantizes each state tensor block-wise over the whole tensor, and its kernels take
    # plain tensors: under FSDP2 each sharded parameter steps whole on an owner rank
    _steps_row_shards = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 8,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        rank: int | None = None,
        update_proj_gap: int = 200,
        scale: float = 0.25,
        proj_type: str = "std",
        projection: str = "svd",
        rand_step: int | None = None,
        rand_ratio: float | None = None,
        total_steps: int | None = None,
        reproject_moments: bool = True,
        second_moment: str = "keep",
        svd_method: str = "auto",
        seed: int = 0,
    ) -> None:
        name = type(self).__name__
        if amsgrad:
            raise ValueError(
                f"{name}: amsgrad=True is not supported (bitsandbytes' 8-bit Adam has no AMSGrad; "
                "galore-torch accepts and ignores it), got amsgrad={amsgrad!r}"
            )
        if args is not None:
            raise ValueError(
                f"{name}: args (a bitsandbytes GlobalOptimManager argument object) is not supported; pass "
                f"optim_bits / min_8bit_size directly or as param-group keys, got args={args!r}"
            )
        if percentile_clipping != 100:
            raise ValueError(
                f"{name}: percentile_clipping must be 100 (no clipping): bitsandbytes 0.50 has no percentile "
                f"clipping (galore-torch passes it on as bitsandbytes' max_unorm), got {percentile_clipping!r}"
            )
        if block_wise is not True:
            raise ValueError(
                f"{name}: block_wise must be True (block-wise 8-bit states are the only kind supported), "
                f"got {block_wise!r}"
            )
        if is_paged:
            raise ValueError(
                f"{name}: is_paged=True (bitsandbytes paged CUDA states) is not supported, got {is_paged!r}"
            )
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            optim_bits=optim_bits,
            min_8bit_size=min_8bit_size,
            rank=rank,
            update_proj_gap=update_proj_gap,
            scale=scale,
            proj_type=proj_type,
            projection=projection,
            rand_step=rand_step,
            rand_ratio=rand_ratio,
            total_steps=total_steps,
            reproject_moments=reproject_moments,
            second_moment=second_moment,
            svd_method=svd_method,
            seed=seed,
        )
        super().__init__(params, defaults)

    def _validate_base(self, group: dict[str, Any], where: str) -> None:
        try:
            check_adamw_hparams(
                group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if group["optim_bits"] not in (8, 32) or isinstance(group["optim_bits"], bool):
            raise ValueError(f"{where}: optim_bits must be 8 or 32, got {group['optim_bits']!r}")
        if not _is_int(group["min_8bit_size"]) or group["min_8bit_size"] < 0:
            raise ValueError(
                f"{where}: min_8bit_size must be an int >= 0, got {group['min_8bit_size']!r}"
            )

    # ---------------------------------------------------------------- state
    def _init_state(self, state: dict[str, Any], g: Tensor, group: dict[str, Any]) -> None:
        dev = g.device
        if group["optim_bits"] == 8 and g.numel() >= group["min_8bit_size"]:
            blocks = (g.numel() + BLOCKSIZE - 1) // BLOCKSIZE
            state["state1"] = torch.zeros(g.shape, dtype=torch.uint8, device=dev)
            state["state2"] = torch.zeros(g.shape, dtype=torch.uint8, device=dev)
            state["absmax1"] = torch.zeros(blocks, dtype=torch.float32, device=dev)
            state["absmax2"] = torch.zeros(blocks, dtype=torch.float32, device=dev)
            state["qmap1"] = _qmap(dev, signed=True)
            state["qmap2"] = _qmap(dev, signed=False)
        else:
            state["state1"] = torch.zeros(g.shape, dtype=torch.float32, device=dev)
            state["state2"] = torch.zeros(g.shape, dtype=torch.float32, device=dev)

    def _reproject_moments(
        self, state: dict[str, Any], trans: tuple[Tensor, ...], side: Side, group: dict[str, Any]
    ) -> None:
        if "state1" not in state:
            return
        eight = state["state1"].dtype == torch.uint8
        m = (
            _dequant(state["state1"], state["absmax1"], state["qmap1"])
            if eight
            else state["state1"]
        )
        m = reproject_first_moment(m, tuple(t.to(m.dtype) for t in trans), side)
        if eight:
            _requant_(m, state["state1"], state["absmax1"], state["qmap1"])
        else:
            state["state1"].copy_(m)
        if group["second_moment"] == "project":
            v = (
                _dequant(state["state2"], state["absmax2"], state["qmap2"])
                if eight
                else state["state2"]
            )
            v = reproject_second_moment(v, tuple(t.to(v.dtype) for t in trans), side)
            if eight:
                _requant_(v, state["state2"], state["absmax2"], state["qmap2"])
            else:
                state["state2"].copy_(v)

    # ---------------------------------------------------------------- update
    def _kernel_(
        self, g: Tensor, target: Tensor, state: dict[str, Any], group: dict[str, Any], wd: float
    ) -> None:
        """One bitsandbytes Adam step of ``target`` (in place) with ``state``'s moments."""
        import bitsandbytes.functional as bnbf

        beta1, beta2 = group["betas"]
        step = int(state["step"].item())
        if state["state1"].dtype == torch.uint8:
            bnbf.optimizer_update_8bit_blockwise(
                "adam", g, target, state["state1"], state["state2"], beta1, beta2, 0.0, 0.0,
                group["eps"], step, group["lr"], state["qmap1"], state["qmap2"],
                state["absmax1"], state["absmax2"], wd, gnorm_scale=1.0, skip_zeros=False,
            )  # fmt: skip
        else:
            bnbf.optimizer_update_32bit(
                "adam", g, target, state["state1"], beta1, group["eps"], step, group["lr"],
                state["state2"], beta2, 0.0, 0.0, wd, 1.0, None, max_unorm=0.0, skip_zeros=False,
            )  # fmt: skip

    def _update(self, group: dict[str, Any], items: list[Item]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        for p, g, state, side, _like in items:  # never FSDP2-sharded (refused)
            g = g.contiguous()
            if side is not None and g.dtype != torch.float32 and g.dtype != torch.float64:
                g = g.float()
            if "state1" not in state:
                self._init_state(state, g, group)
            state["step"] += 1
            if side is None:
                # not projected: bitsandbytes updates the parameter itself (weight decay inside)
                if p.is_contiguous():
                    self._kernel_(g.to(p.dtype), p, state, group, wd)
                else:
                    tmp = p.contiguous()
                    self._kernel_(g.to(p.dtype), tmp, state, group, wd)
                    p.copy_(tmp)
                continue
            # projected: the kernel's step on a zero low-rank buffer is −lr·N (no weight decay there)
            buf = torch.zeros_like(g)
            self._kernel_(g, buf, state, group, 0.0)
            p.add_(self._full_update(p, buf, state, side, group).to(p.dtype))
            if wd:
                p.add_(p, alpha=-lr * wd)  # after the step, as galore-torch


class GoLoreAdamW8bit(GaLoreAdamW8bit):
    """:class:`GaLoreAdamW8bit` whose projector refreshes draw random Stiefel matrices from ``rand_step`` on.

    GoLore (He et al., arXiv 2410.11289), as :class:`~loralab.golore.GoLoreAdamW`: ``rand_ratio``
    is the fraction of ``total_steps`` that uses SVD projectors (default 0.0: random from the start).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(256, 512)
        >>> opt = GoLoreAdamW8bit([{"params": [lin.weight], "rank": 32}], lr=1e-3, rand_ratio=0.8,
        ...                       total_steps=1000)
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        optim_bits: int = 8,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        *,
        rand_ratio: float = 0.0,
        total_steps: int | None = None,
        rand_step: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
            percentile_clipping, block_wise, is_paged, rand_ratio=rand_ratio,
            total_steps=total_steps, rand_step=rand_step, **kwargs,
        )  # fmt: skip
