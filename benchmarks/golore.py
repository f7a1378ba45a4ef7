"""GaLore / GoLore optimizer step time and optimizer-state memory: loralab-golore vs galore-torch vs AdamW.

Each optimizer runs in its own subprocess on the same random Llama (~106M parameters; ``--quick``: a
~6M one) and the same real gradients (one backward on random tokens, set again before every step,
so only the optimizer is timed). Every run does step 0 (first projector + state allocation), then
alternates regular steps and projector refreshes (``update_proj_gap=2``, refreshes with state
present, including our moment re-projection), ``repeats`` times each; the minimum of each is
reported, in CPU seconds of a single-threaded process (the machine is shared: wall-clock time
measured other people's jobs). The amortised cost per step
is ``((T−1)·regular + refresh) / T`` for the paper's ``T = 200``.

Subspace quality of the SVD projectors: the fraction of the best rank-r energy that the projector
captures, Σ‖Pᵀg‖² / Σᵢ<r σᵢ² over all projected matrices (1.0 = exact SVD; galore-torch is exact).

Run: ``python benchmarks/golore.py [--quick]``; writes ``benchmarks/results/golore.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path

import _common

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "golore.md"

FULL = dict(hidden=768, inter=2048, layers=8, vocab=32000, rank=128, seq=64, repeats=3)
QUICK = dict(hidden=256, inter=688, layers=4, vocab=8000, rank=32, seq=32, repeats=4)

CONFIGS = {
    "adamw": "torch.optim.AdamW (foreach), all parameters full-rank",
    "galore-torch": "galore-torch 1.0 GaLoreAdamW (full torch.linalg.svd refresh)",
    "ours-svd-auto": "loralab GaLoreAdamW, svd_method='auto' (randomized SVD, default)",
    "ours-svd-full": "loralab GaLoreAdamW, svd_method='full' (exact SVD, as galore-torch)",
    "ours-golore": "loralab GoLoreAdamW (random Stiefel projector)",
}


def worker(name: str, cfg: dict) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    # tiny gradients of a random model square to denormals; without this, timings measure x86 denormal
    # slow paths (which hit some optimizers and not others) rather than the optimizers
    torch.set_flush_denormal(True)
    model = _common.random_llama(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(
        0, cfg["vocab"], (2, cfg["seq"]), generator=torch.Generator().manual_seed(0)
    )
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    proj = [p for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("proj.weight")]
    pid = {id(p) for p in proj}
    rest = [p for p in model.parameters() if id(p) not in pid]
    gap = 2  # steps alternate refresh / regular, so both are timed several times (min: robust to load)
    sub = dict(rank=cfg["rank"], update_proj_gap=gap, scale=0.25, proj_type="std")
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    elif name == "galore-torch":
        from galore_torch import GaLoreAdamW as Ref

        opt = Ref(
            [dict(params=rest), dict(params=proj, **sub)], lr=1e-3, no_deprecation_warning=True
        )
    else:
        from loralab.golore import GaLoreAdamW, GoLoreAdamW

        if name == "ours-golore":
            opt = GoLoreAdamW(
                [dict(params=rest), dict(params=proj, **sub)], lr=1e-3, rand_ratio=0.0
            )
        else:
            opt = GaLoreAdamW(
                [dict(params=rest), dict(params=proj, **sub, svd_method=name.rsplit("-", 1)[1])],
                lr=1e-3,
            )

    def step():
        for p, g in grads.items():
            p.grad = g.clone()
        # CPU time of this (single-threaded) process: robust to the other jobs on a shared machine,
        # which wall-clock time is not
        t0 = time.process_time()
        opt.step()
        return time.process_time() - t0

    first = step()
    regular, refresh = [step()], []
    for _ in range(cfg["repeats"]):
        refresh.append(step())
        regular.append(step())
    res = dict(
        name=name,
        params=n_params,
        projected_matrices=len(proj),
        first_step_s=first,
        regular_step_s=min(regular),
        refresh_step_s=min(refresh),
        state_bytes=_common.optimizer_state_bytes(opt),
    )
    if name.startswith("ours-svd") or name == "galore-torch":
        # subspace quality of the projector computed at the last refresh, against the exact SVD
        from loralab.golore.projector import project, projector_side

        cap = best = 0.0
        for p in proj:
            st = opt.state[p]
            g = grads[p].float()
            side = projector_side(p.shape, "std")
            if name == "galore-torch":
                mats = (st["projector"].ortho_matrix,)
            else:
                mats = (st["proj_left"],) if side == "left" else (st["proj_right"],)
            cap += float(project(g, mats, side).pow(2).sum())
            best += float(torch.linalg.svdvals(g)[: cfg["rank"]].pow(2).sum())
        res["subspace_quality"] = cap / best
    print(json.dumps(res))


def main() -> None:
    description = __doc__.split("\n\n")[0]
    args = _common.workers_parser(description, results=RESULTS).parse_args()
    cfg = QUICK if args.quick else FULL
    if args.worker:
        worker(args.worker, cfg)
        return
    rows = _common.run_workers(__file__, args.only or list(CONFIGS), quick=args.quick)
    _common.write_results(args.results, _table(rows, cfg, args.quick))


def _table(rows: dict, cfg: dict, quick: bool) -> str:
    T = 200
    base = rows.get("galore-torch")
    adamw = rows.get("adamw")
    lines = [
        "# loralab-golore: GaLore/GoLore optimizer step vs galore-torch and AdamW",
        "",
        f"Random Llama, {next(iter(rows.values()))['params'] / 1e6:.0f}M parameters (hidden {cfg['hidden']}, {cfg['layers']} layers, vocab {cfg['vocab']}), "
        f"rank {cfg['rank']}, proj_type std, {next(iter(rows.values()))['projected_matrices']} projected matrices; real gradients of one backward, "
        "optimizer step timed alone (CPU seconds of a single-threaded process), each optimizer in its own subprocess.",
        "",
        "| optimizer | regular step (CPU s) | refresh step (CPU s) | refresh vs galore-torch | amortised step, T=200 (CPU s) | optimizer state (MiB) | state vs AdamW | subspace quality |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        amort = ((T - 1) * r["regular_step_s"] + r["refresh_step_s"]) / T
        ratio = (
            f"{base['refresh_step_s'] / r['refresh_step_s']:.1f}× faster"
            if base and name not in ("adamw", "galore-torch")
            else "—"
        )
        mem = f"{r['state_bytes'] / adamw['state_bytes']:.2f}" if adamw else "—"
        q = (
            f"{r['subspace_quality']:.4f}"
            if "subspace_quality" in r
            else ("random (by design)" if name == "ours-golore" else "—")
        )
        lines.append(
            f"| {CONFIGS[name]} | {r['regular_step_s']:.3f} | {r['refresh_step_s']:.3f} | {ratio} | {amort:.3f} | {r['state_bytes'] / 2**20:.1f} | {mem} | {q} |"
        )
    cmd = "python benchmarks/golore.py" + (" --quick" if quick else "")
    lines += [
        "",
        f"Command: `{cmd}`. Machine: {_common.machine_description()} ({platform.python_version()}); "
        f"{datetime.date.today().isoformat()}. The machine was shared with other engineers' test runs while this was "
        "measured, so steps are timed in CPU seconds of one thread (time.process_time), minimum over repeats.",
        "",
        "Notes: 'refresh step' is a step that recomputes every projector (every T steps); ours includes re-projecting the first "
        "moment into the new subspace. 'subspace quality' = captured fraction of the best rank-r gradient energy (1 = exact SVD). "
        "galore-torch also keeps its projectors as Python objects in `state` (not loadable with `weights_only=True`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
