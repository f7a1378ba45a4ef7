"""Demo: estimate a tiny model's gradients with and without block-wise offload and compare them.

Runs offline in seconds on a CPU::

    python -m loralab.core.demo                 # tiny Llama, 4 batches
    loralab-core-demo --arch t5 --batches 2 --top 3

It prints, per target layer, the gradient's Frobenius norm and its top singular values (what
LoRA-GA turns into adapter factors), then the largest difference between the plain and the
offloaded estimate, and exits non-zero if they disagree beyond the stated tolerance.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from loralab.core.gradients import estimate_gradients
from loralab.core.linalg import truncated_svd
from loralab.core.testing import (
    TINY_ARCHS,
    make_classification_batches,
    make_lm_batches,
    make_seq2seq_batches,
    tiny_model,
)

__all__ = ["main", "run_demo"]

TOLERANCE = 1e-5
"""Max relative difference (Frobenius, per layer) accepted between plain and offloaded gradients."""


def _batches(arch: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    if arch == "roberta":
        return make_classification_batches(n, seed=seed)
    if arch == "t5":
        return make_seq2seq_batches(n, seed=seed)
    return make_lm_batches(n, seed=seed)


def run_demo(
    arch: str = "llama", *, batches: int = 4, top: int = 4, seed: int = 0, out=None
) -> float:
    """Run the demo and return the max relative difference between plain and offloaded gradients.

    Example:
        >>> import io
        >>> run_demo("gpt2", batches=1, top=2, out=io.StringIO()) <= TOLERANCE
        True
    """
    out = out or sys.stdout
    if arch not in TINY_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(TINY_ARCHS)}, got {arch!r}")
    if batches < 1 or top < 1:
        raise ValueError(f"batches and top must be >= 1, got batches={batches}, top={top}")
    model = tiny_model(arch, seed=seed)
    data = _batches(arch, batches, seed)
    t0 = time.perf_counter()
    plain = estimate_gradients(model, data, progress=False)
    t1 = time.perf_counter()
    offloaded = estimate_gradients(model, data, offload=True, device="cpu", progress=False)
    t2 = time.perf_counter()

    print(
        f"loralab.core demo: tiny {arch} ({sum(p.numel() for p in model.parameters()):,} parameters), "
        f"{batches} batches, {len(plain)} target layers",
        file=out,
    )
    width = max(len(n) for n in plain)
    print(f"{'layer':<{width}}  {'shape':>9}  {'‖G‖_F':>10}  top singular values", file=out)
    worst = 0.0
    for name, g in plain.items():
        k = min(top, *g.shape)
        _, s, _ = truncated_svd(g, k, method="full")
        rel = ((g - offloaded[name]).norm() / g.norm().clamp_min(torch.finfo(g.dtype).tiny)).item()
        worst = max(worst, rel)
        shape = "x".join(map(str, g.shape))
        sv = " ".join(f"{v:.3e}" for v in s.tolist())
        print(f"{name:<{width}}  {shape:>9}  {g.norm().item():>10.4e}  {sv}", file=out)
    max_abs = max((plain[n] - offloaded[n]).abs().max().item() for n in plain)
    print(f"plain: {t1 - t0:.2f} s, offload (device=cpu): {t2 - t1:.2f} s", file=out)
    print(
        f"max |plain - offload| = {max_abs:.3e}; max relative (per layer, Frobenius) = {worst:.3e} "
        f"({'OK' if worst <= TOLERANCE else 'MISMATCH'}, tolerance {TOLERANCE:g})",
        file=out,
    )
    return worst


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``loralab-core-demo``; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="loralab-core-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch", choices=TINY_ARCHS, default="llama", help="tiny model to use (default: llama)"
    )
    parser.add_argument(
        "--batches", type=int, default=4, help="number of batches to average over (default: 4)"
    )
    parser.add_argument(
        "--top", type=int, default=4, help="singular values to print per layer (default: 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="model and data seed (default: 0)")
    args = parser.parse_args(argv)
    if args.batches < 1 or args.top < 1:
        parser.error("--batches and --top must be >= 1")
    worst = run_demo(args.arch, batches=args.batches, top=args.top, seed=args.seed)
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
