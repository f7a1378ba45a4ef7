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

``--eight-bit`` instead measures the 8-bit optimizers (writes ``benchmarks/results/golore_8bit.md``):
(1) optimizer-state bytes of ``GaLoreAdamW8bit`` (bitsandbytes block-wise 8-bit moments) against
the float32 moments of ``GaLoreAdamW`` and of ``GaLoreAdamW8bit(optim_bits=32)`` after one step on the
same random Llama and gradients (bytes, not time); (2) the quality cost on the C4 smoke setup of
``loralab.runners.c4.testing`` (the 2-layer hidden-64 LLaMA, the offline byte tokenizer, synthetic
C4-format shards): training loss after N steps and held-out loss, 8-bit vs 32-bit states, GaLore and
GoLore, same seed, batches and projectors. The smoke model's low-rank states are below
bitsandbytes' default ``min_8bit_size`` (4096 entries), so that run sets ``min_8bit_size=0`` to
quantize every state (otherwise 8-bit and 32-bit would be the same run).
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


RESULTS_8BIT = ROOT / "results" / "golore_8bit.md"
SMOKE = dict(steps=300, batch=8, seq=64, rank=16, gap=50, lr=3e-3, eval_batches=8)
SMOKE_QUICK = dict(steps=60, batch=4, seq=64, rank=16, gap=20, lr=3e-3, eval_batches=4)


def _moment_bytes(opt) -> int:
    """Bytes of the optimizer's moment tensors (projectors and step counters excluded)."""
    from loralab.golore import optimizer_state_bytes

    return optimizer_state_bytes(opt, exclude=("step", "proj_left", "proj_right"))


def eight_bit_state(cfg: dict) -> dict:
    import warnings

    import torch

    from loralab.golore import GaLoreAdamW, GaLoreAdamW8bit

    warnings.filterwarnings("ignore")
    model = _common.random_llama(cfg)
    ids = torch.randint(
        0, cfg["vocab"], (2, cfg["seq"]), generator=torch.Generator().manual_seed(0)
    )
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {p: p.grad.detach().clone() for p in model.parameters()}
    proj = [p for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("proj.weight")]
    pid = {id(p) for p in proj}
    rest = [p for p in model.parameters() if id(p) not in pid]
    sub = dict(rank=cfg["rank"], update_proj_gap=200, scale=0.25, proj_type="std")
    out = {}
    for name, make in (
        ("GaLoreAdamW (float32 moments)", lambda g: GaLoreAdamW(g, lr=1e-3)),
        ("GaLoreAdamW8bit(optim_bits=32)", lambda g: GaLoreAdamW8bit(g, lr=1e-3, optim_bits=32)),
        ("GaLoreAdamW8bit (8-bit, default)", lambda g: GaLoreAdamW8bit(g, lr=1e-3)),
    ):
        groups = [dict(params=rest), dict(params=proj, **sub)]
        opt = make(groups)
        for p, g in grads.items():
            p.grad = g.clone()
        opt.step()
        proj_bytes = _common.optimizer_state_bytes(opt) - _moment_bytes(opt)
        out[name] = dict(moments=_moment_bytes(opt), total=_common.optimizer_state_bytes(opt),
                         other=proj_bytes,
                         projected_moments=sum(_moment_bytes_of(opt, p) for p in proj))  # fmt: skip
        del opt
    out["params"] = sum(p.numel() for p in model.parameters())
    return out


def _moment_bytes_of(opt, p) -> int:
    import torch

    return sum(
        v.untyped_storage().nbytes()
        for k, v in opt.state[p].items()
        if isinstance(v, torch.Tensor)
        and k not in ("step", "proj_left", "proj_right", "qmap1", "qmap2")
    )


def eight_bit_quality(smoke: dict) -> list[dict]:
    import tempfile
    import warnings

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loralab.core.testing import offline_tokenizer
    from loralab.golore import GaLoreAdamW8bit, GoLoreAdamW8bit
    from loralab.runners.c4.data import LocalSource, SequenceStream, collate, find_shards
    from loralab.runners.c4.testing import TINY_LLAMA_CONFIG, write_c4_shards

    warnings.filterwarnings("ignore")
    tok = offline_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        data = write_c4_shards(Path(d) / "c4" / "en", train_docs=4000, validation_docs=200)

        def batches(split: str, n: int) -> list[dict]:
            stream = SequenceStream(LocalSource(find_shards(data, split)), tok, smoke["seq"])
            return [collate(stream.next_sequences(smoke["batch"]), smoke["seq"], tok.pad_token_id)
                    for _ in range(n)]  # fmt: skip

        train = batches("train", smoke["steps"])
        held = batches("validation", smoke["eval_batches"])
    cfg = {k: v for k, v in TINY_LLAMA_CONFIG.items() if k != "model_type"}
    rows = []
    for label, cls, extra in (
        ("GaLore", GaLoreAdamW8bit, {}),
        (
            "GoLore (rand_ratio 0.5)",
            GoLoreAdamW8bit,
            dict(rand_ratio=0.5, total_steps=smoke["steps"]),
        ),
    ):
        for bits in (32, 8):
            torch.manual_seed(0)
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            proj = [
                p for n, p in model.named_parameters() if p.dim() == 2 and n.endswith("proj.weight")
            ]
            pid = {id(p) for p in proj}
            rest = [p for p in model.parameters() if id(p) not in pid]
            sub = dict(
                rank=smoke["rank"], update_proj_gap=smoke["gap"], scale=0.25, proj_type="std"
            )
            opt = cls([dict(params=rest), dict(params=proj, **sub)], lr=smoke["lr"], weight_decay=0.0,
                      optim_bits=bits, min_8bit_size=0, **extra)  # fmt: skip
            losses = []
            model.train()
            for b in train:
                opt.zero_grad()
                loss = model(**b).loss
                loss.backward()
                opt.step()
                losses.append(loss.item())
            model.eval()
            with torch.no_grad():
                ev = sum(model(**b).loss.item() for b in held) / len(held)
            rows.append(dict(method=label, bits=bits, first=losses[0],
                             final=sum(losses[-10:]) / 10, eval=ev,
                             moments=_moment_bytes(opt)))  # fmt: skip
    return rows


def eight_bit_report(quick: bool, results: Path) -> None:
    cfg = QUICK if quick else FULL
    smoke = SMOKE_QUICK if quick else SMOKE
    st = eight_bit_state(cfg)
    q = eight_bit_quality(smoke)
    base = st["GaLoreAdamW (float32 moments)"]
    lines = [
        "# loralab-golore: 8-bit optimizer states (GaLoreAdamW8bit) — state bytes and quality cost",
        "",
        f"State after one step on the random Llama of `benchmarks/golore.py` ({st['params'] / 1e6:.0f}M parameters, hidden "
        f"{cfg['hidden']}, rank {cfg['rank']}, proj_type std); moments = every state tensor except step counters and "
        "projectors (bitsandbytes' two 256-entry quantization maps are one shared tensor, counted once); bitsandbytes' "
        "default min_8bit_size=4096 (the embeddings and head are 8-bit too, the norms stay float32).",
        "",
        "| optimizer | moments (MiB) | moments vs float32 | moments of the projected weights (MiB) | vs float32 | projectors (MiB) | total state (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in st.items():
        if name == "params":
            continue
        lines.append(
            f"| {name} | {r['moments'] / 2**20:.1f} | {r['moments'] / base['moments']:.3f} | "
            f"{r['projected_moments'] / 2**20:.2f} | {r['projected_moments'] / base['projected_moments']:.3f} | "
            f"{r['other'] / 2**20:.1f} | {r['total'] / 2**20:.1f} |"
        )
    lines += [
        "",
        f"Quality cost on the C4 smoke setup (loralab.runners.c4.testing: 2-layer hidden-64 LLaMA, vocab 260, "
        f"synthetic C4-format shards, offline byte tokenizer): {smoke['steps']} steps of {smoke['batch']}×{smoke['seq']} "
        f"packed tokens, lr {smoke['lr']}, rank {smoke['rank']}, update_proj_gap {smoke['gap']}, scale 0.25, seed 0, "
        "same batches and initial weights for every run; min_8bit_size=0 so every state is 8-bit in the 8-bit runs. "
        "Train loss = mean of the last 10 steps; held-out = mean loss on "
        f"{smoke['eval_batches']} validation batches.",
        "",
        "| method | state bits | loss at step 1 | train loss (last 10) | held-out loss | moments (KiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in q:
        lines.append(
            f"| {r['method']} | {r['bits']} | {r['first']:.4f} | {r['final']:.4f} | {r['eval']:.4f} | {r['moments'] / 1024:.1f} |"
        )
    cmd = "python benchmarks/golore.py --eight-bit" + (" --quick" if quick else "")
    lines += [
        "",
        f"Command: `{cmd}`. Machine: {_common.machine_description()} ({platform.python_version()}); "
        f"{datetime.date.today().isoformat()}. Byte counts and losses are deterministic (no timings).",
        "",
    ]
    _common.write_results(results, "\n".join(lines))


def main() -> None:
    description = __doc__.split("\n\n")[0]
    parser = _common.workers_parser(description, results=RESULTS)
    parser.add_argument(
        "--eight-bit",
        action="store_true",
        help="8-bit optimizer state bytes and quality cost (writes results/golore_8bit.md)",
    )
    args = parser.parse_args()
    cfg = QUICK if args.quick else FULL
    if args.eight_bit:
        out = Path(args.results) if args.results != str(RESULTS) else RESULTS_8BIT
        eight_bit_report(args.quick, out)
        return
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
