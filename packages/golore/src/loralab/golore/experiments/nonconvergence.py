"""GoLore's Figure 1: GaLore does not converge with small-batch gradients; GoLore does.

The problem (He et al., arXiv 2410.11289, Sec. 4 / official ``exp/main.py``), with n = 10, r = 4,
σ = 1 and a fixed seed::

    f(X) = ½‖A X‖²_F + ⟨B, X⟩,   A = [I₆ 0] (6×10),   B = [[σ·randn(6,6), 0]; [0, 0]] (10×10),
    X₀ = [[σ/2·[I₆ 0]]; σ·randn(4,10)],
    stochastic gradient ∇f(X) + ξ,  ξ = ±σ·I₄ on the bottom-right 4×4 block (one fair coin per sample).

∇f(X) = AᵀA X + B vanishes on the bottom four rows, so those rows do not change f; the optimum is
X[:6,:6] = −B₁, f* = −½‖B₁‖²_F. Once the top block's residual has singular values below σ, the SVD
of a stochastic gradient (GaLore, left projection, rank 4) returns the noise rows, the top block is
never updated again and the loss plateaus above f*. Random Stiefel projectors (GoLore) are
independent of the noise and converge; so do full-parameter training and *large-batch* GaLore (the
projector computed from a gradient averaged over ``large_batch`` samples, noise σ/√N).

Every method is run with AdamW and with momentum SGD, using this package's optimizers. The gradient
is computed in closed form (it equals autograd's, tested). Outputs: ``nonconvergence.png`` (loss − f*
curves, log scale, one panel per optimizer) and ``nonconvergence.csv`` (step, optimizer, method, loss).

Run::

    python -m loralab.golore.experiments.nonconvergence --out results/ [--steps 20000] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypedDict

import torch
from tqdm.auto import tqdm

from loralab.golore.optimizer import GaLoreAdamW, GaLoreSGD, GoLoreAdamW, GoLoreSGD

__all__ = [
    "METHODS",
    "NonconvergenceConfig",
    "Problem",
    "make_problem",
    "run_method",
    "run_nonconvergence",
]

logger = logging.getLogger(__name__)

METHODS = ("full", "galore", "galore-large-batch", "golore")
OPTIMIZERS = ("adamw", "msgd")


@dataclass
class NonconvergenceConfig:
    """Settings of the Figure-1 experiment (defaults: the paper's problem, a shorter schedule)."""

    n: int = field(default=10, metadata={"help": "matrix size (X is n×n)"})
    r: int = field(default=4, metadata={"help": "projection rank and size of the noise block"})
    sigma: float = field(default=1.0, metadata={"help": "noise level σ (and scale of B, X₀)"})
    seed: int = field(default=42, metadata={"help": "seed of B, X₀ and the noise"})
    steps: int = field(
        default=20_000, metadata={"help": "optimizer steps per run (paper: 200k at lr 3e-5)"}
    )
    update_proj_gap: int = field(
        default=100, metadata={"help": "T, steps between projector refreshes"}
    )
    lr_adamw: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    lr_msgd: float = field(default=1e-2, metadata={"help": "momentum-SGD learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "momentum of MSGD"})
    rand_ratio: float = field(
        default=0.25,
        metadata={"help": "GoLore: fraction of steps with SVD projectors (official exp: 0.25)"},
    )
    large_batch: int = field(
        default=10_000,
        metadata={"help": "samples averaged for large-batch GaLore's projector gradient"},
    )
    log_every: int = field(default=50, metadata={"help": "record the loss every this many steps"})
    schedule: str = field(
        default="cosine",
        metadata={
            "help": "learning-rate schedule of every run: 'constant' (paper) or 'cosine' (to 0)"
        },
    )

    def __post_init__(self) -> None:
        if self.r < 1 or self.n <= self.r:
            raise ValueError(f"need 1 <= r < n, got n={self.n}, r={self.r}")
        for name in ("steps", "update_proj_gap", "large_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.rand_ratio <= 1.0:
            raise ValueError(f"rand_ratio must be in [0, 1], got {self.rand_ratio}")
        if self.sigma <= 0 or self.lr_adamw <= 0 or self.lr_msgd <= 0:
            raise ValueError("sigma and learning rates must be positive")


class NonconvergenceResult(TypedDict):
    """What :func:`run_nonconvergence` returns."""

    f_star: float
    curves: dict[tuple[str, str], list[tuple[int, float]]]
    final: dict[tuple[str, str], float]
    config: dict[str, Any]


@dataclass
class Problem:
    """The quadratic problem and its optimum."""

    A: torch.Tensor
    B: torch.Tensor
    X0: torch.Tensor
    sigma: float
    r: int

    @property
    def f_star(self) -> float:
        k = self.A.shape[0]
        return -0.5 * float((self.B[:k, :k] ** 2).sum())

    def loss(self, X: torch.Tensor) -> float:
        ax = self.A @ X
        return float(0.5 * (ax * ax).sum() + (self.B * X).sum())

    def grad(self, X: torch.Tensor) -> torch.Tensor:
        return self.A.T @ (self.A @ X) + self.B

    def noise(self, gen: torch.Generator, samples: int = 1) -> torch.Tensor:
        """ξ averaged over ``samples`` draws: (mean of ±1 coins)·σ·I_r on the bottom-right block."""
        n = self.X0.shape[0]
        if samples == 1:
            sign = 1.0 if torch.rand((), generator=gen).item() <= 0.5 else -1.0
        else:
            # exact mean of `samples` fair ±1 coins, drawn from the generator through a uniform
            u = torch.rand(samples, generator=gen)
            sign = float((u <= 0.5).double().mean() * 2 - 1)
        xi = torch.zeros(n, n, dtype=self.X0.dtype)
        idx = torch.arange(n - self.r, n)
        xi[idx, idx] = sign * self.sigma
        return xi


def make_problem(n: int = 10, r: int = 4, sigma: float = 1.0, seed: int = 42) -> Problem:
    """A, B, X₀ of the paper's counter-example, float64, seeded."""
    gen = torch.Generator().manual_seed(seed)
    k = n - r
    A = torch.cat([torch.eye(k), torch.zeros(k, r)], dim=1).double()
    B = torch.zeros(n, n, dtype=torch.float64)
    # float32 draws in the reference's order (B, then X₀'s bottom rows), so seed 42 gives its matrices
    B[:k, :k] = torch.randn(k, k, generator=gen).double() * sigma
    X0 = torch.cat(
        [
            sigma / 2 * torch.cat([torch.eye(k), torch.zeros(k, r)], dim=1).double(),
            torch.randn(r, n, generator=gen).double() * sigma,
        ]
    )
    return Problem(A, B, X0, sigma, r)


def _optimizer(
    method: str, opt_name: str, X: torch.nn.Parameter, cfg: NonconvergenceConfig
) -> torch.optim.Optimizer:
    sub = dict(
        rank=cfg.r,
        update_proj_gap=cfg.update_proj_gap,
        scale=1.0,
        proj_type="left",
        svd_method="full",
        seed=cfg.seed,
    )
    if method == "full":
        if opt_name == "adamw":
            return torch.optim.AdamW([X], lr=cfg.lr_adamw, weight_decay=0.0)
        return torch.optim.SGD([X], lr=cfg.lr_msgd, momentum=cfg.momentum)
    # GoLore's extra keys, none for GaLore (typed loosely: the optimizers take them as keywords)
    kw: dict[str, Any] = (
        dict(rand_ratio=cfg.rand_ratio, total_steps=cfg.steps) if method == "golore" else {}
    )
    cls: Callable[..., torch.optim.Optimizer]
    if opt_name == "adamw":
        cls = GoLoreAdamW if method == "golore" else GaLoreAdamW
        return cls([{"params": [X], **sub}], lr=cfg.lr_adamw, eps=1e-8, adamw_style="torch", **kw)
    cls = GoLoreSGD if method == "golore" else GaLoreSGD
    return cls([{"params": [X], **sub}], lr=cfg.lr_msgd, momentum=cfg.momentum, **kw)


def run_method(
    problem: Problem,
    method: str,
    opt_name: str,
    cfg: NonconvergenceConfig,
    *,
    progress: bool = False,
) -> list[tuple[int, float]]:
    """Train X from X₀ with one method and optimizer; returns ``[(step, f(X)), ...]``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if opt_name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {opt_name!r}")
    X = torch.nn.Parameter(problem.X0.clone())
    opt = _optimizer(method, opt_name, X, cfg)
    # A constant step size leaves any stochastic method at an O(lr) noise floor (GoLore's random
    # subspaces mix the noise rows into the top block); a cosine decay removes the floor for the
    # methods that converge and changes nothing for GaLore, whose subspace is stuck on the noise.
    sched = None
    if cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1 + math.cos(math.pi * min(t, cfg.steps) / cfg.steps))
        )
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # the same noise sequence for every method
    curve = [(0, problem.loss(X.detach()))]
    for t in tqdm(range(cfg.steps), desc=f"{opt_name}/{method}", disable=not progress, leave=False):
        samples = (
            cfg.large_batch
            if (method == "galore-large-batch" and t % cfg.update_proj_gap == 0)
            else 1
        )
        with torch.no_grad():
            X.grad = problem.grad(X) + problem.noise(gen, samples)
        opt.step()
        if sched is not None:
            sched.step()
        if (t + 1) % cfg.log_every == 0 or t + 1 == cfg.steps:
            curve.append((t + 1, problem.loss(X.detach())))
    return curve


def run_nonconvergence(
    cfg: NonconvergenceConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    plot: bool = True,
) -> NonconvergenceResult:
    """Run every (optimizer, method) pair; write ``nonconvergence.csv`` (+ ``.png``) under ``out_dir``.

    Returns a dict with ``f_star``, ``curves`` {(optimizer, method): [(step, loss)]} and ``final``
    {(optimizer, method): last loss}.

    Example:
        >>> res = run_nonconvergence(NonconvergenceConfig(steps=200), None, progress=False, plot=False)
        >>> sorted(res["final"])[0]
        ('adamw', 'full')
    """
    problem = make_problem(cfg.n, cfg.r, cfg.sigma, cfg.seed)
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for opt_name in OPTIMIZERS:
        for method in METHODS:
            curves[(opt_name, method)] = run_method(
                problem, method, opt_name, cfg, progress=progress
            )
            logger.info(
                "%s/%s: final loss %.4f (f* = %.4f)",
                opt_name,
                method,
                curves[(opt_name, method)][-1][1],
                problem.f_star,
            )
    result: NonconvergenceResult = {
        "f_star": problem.f_star,
        "curves": curves,
        "final": {k: v[-1][1] for k, v in curves.items()},
        "config": asdict(cfg),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "nonconvergence.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "optimizer", "method", "loss", "loss_minus_f_star"])
            for (opt_name, method), curve in curves.items():
                for step, loss in curve:
                    w.writerow(
                        [step, opt_name, method, f"{loss:.10g}", f"{loss - problem.f_star:.6g}"]
                    )
        if plot:
            _plot(curves, problem.f_star, out / "nonconvergence.png", cfg)
    return result


def _plot(
    curves: dict[tuple[str, str], list[tuple[int, float]]],
    f_star: float,
    path: Path,
    cfg: NonconvergenceConfig,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    labels = {
        "full": "full-parameter",
        "galore": "GaLore",
        "galore-large-batch": f"GaLore, large batch ({cfg.large_batch})",
        "golore": f"GoLore (rand_ratio={cfg.rand_ratio})",
    }
    for ax, opt_name in zip(axes, OPTIMIZERS):
        for method in METHODS:
            steps, losses = zip(*curves[(opt_name, method)])
            gap = [max(loss - f_star, 1e-12) for loss in losses]
            ax.semilogy(steps, gap, label=labels[method])
        ax.set_title({"adamw": "AdamW", "msgd": f"momentum SGD (μ={cfg.momentum})"}[opt_name])
        ax.set_xlabel("step")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("f(X) − f*")
    axes[0].legend()
    fig.suptitle(
        f"GaLore's non-convergence (n={cfg.n}, r={cfg.r}, σ={cfg.sigma}, T={cfg.update_proj_gap}, {cfg.schedule} lr, f*={f_star:.3f})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> NonconvergenceResult:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default="nonconvergence_results", help="output directory for the PNG and CSV"
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run (3000 steps, larger learning rates)"
    )
    defaults = NonconvergenceConfig()
    for name in ("steps", "update_proj_gap", "seed", "large_batch", "log_every"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=int,
            default=None,
            help=NonconvergenceConfig.__dataclass_fields__[name].metadata["help"],
        )
    parser.add_argument(
        "--schedule",
        choices=("constant", "cosine"),
        default=None,
        help=NonconvergenceConfig.__dataclass_fields__["schedule"].metadata["help"],
    )
    for name in ("lr_adamw", "lr_msgd", "momentum", "rand_ratio", "sigma"):
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=float,
            default=None,
            help=NonconvergenceConfig.__dataclass_fields__[name].metadata["help"],
        )
    args = parser.parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k not in ("out", "quick") and v is not None}
    base = asdict(defaults)
    if args.quick:
        base.update(QUICK)
    base.update(kw)
    cfg = NonconvergenceConfig(**base)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = run_nonconvergence(cfg, args.out)
    f_star = res["f_star"]
    print(f"f* = {f_star:.4f}")
    for (opt_name, method), loss in res["final"].items():
        print(f"{opt_name:6s} {method:20s} final f = {loss:.4f}  (f - f* = {loss - f_star:.3g})")
    print(
        f"wrote {Path(args.out) / 'nonconvergence.png'} and {Path(args.out) / 'nonconvergence.csv'}"
    )
    return res


QUICK = dict(steps=3000, lr_adamw=1e-2, lr_msgd=3e-2, update_proj_gap=50, log_every=25)

if __name__ == "__main__":
    main()
