"""Every method side by side: ``loralab compare`` on its embedded default, recorded for the README.

Runs the comparison (each method in its own process: same model, seed, batches and schedule), then
writes ``benchmarks/results/compare.md`` (the table, the command, the machine, the date) and copies the
two plots to ``docs/compare/`` so the root README and BENCHMARKS.md can show them.

Run: ``python benchmarks/compare.py [--quick | --sweep] [--output_dir DIR]``. ``--quick`` runs 40 steps
of four methods (a smoke run, a few minutes); without it, the full default (150 steps, every registered
method); ``--sweep`` runs ``loralab compare --sweep --seeds 2`` (the default learning-rate grid, then a
second seed at each method's chosen rate) and writes ``benchmarks/results/compare_sweep.md`` and
``docs/compare/sweep/`` instead. Timings are wall-clock, so run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "compare.md"
DOCS = ROOT / "docs" / "compare"
SWEEP_RESULTS = ROOT / "benchmarks" / "results" / "compare_sweep.md"
SWEEP_DOCS = DOCS / "sweep"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="40 steps, four methods")
    mode.add_argument(
        "--sweep", action="store_true", help="--sweep --seeds 2 with the default learning-rate grid"
    )
    parser.add_argument("--output_dir", default=None, help="where the run's files go")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        args.output_dir = str(ROOT / ".bench" / ("compare_sweep" if args.sweep else "compare"))
    results, docs = (SWEEP_RESULTS, SWEEP_DOCS) if args.sweep else (RESULTS, DOCS)

    from loralab.runners.compare import CompareConfig, run_compare

    cli: list[str] = ["--output_dir", args.output_dir]
    if args.quick:
        cli += [
            "--steps",
            "40",
            "--eval_every",
            "10",
            "--methods",
            "full",
            "lora",
            "lora-ga",
            "lora-pro",
        ]
    if args.sweep:
        cli += ["--sweep", "--seeds", "2"]
    from loralab.runners.compare import build_parser

    config = CompareConfig(**vars(build_parser().parse_args(cli)))
    summaries = run_compare(config, command=" ".join(["loralab", "compare", *cli[2:]]))

    out = Path(args.output_dir)
    docs.mkdir(parents=True, exist_ok=True)
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        shutil.copyfile(out / png, docs / png)
    (docs / "summaries.json").write_text(json.dumps(summaries, indent=1, default=str) + "\n")

    body = (out / "results.md").read_text()
    # the run links its plots beside it; BENCHMARKS.md (repo root) finds them in docs/compare/
    where = docs.relative_to(ROOT).as_posix()
    body = body.replace("](loss_vs_step.png)", f"]({where}/loss_vs_step.png)")
    body = body.replace("](loss_vs_time.png)", f"]({where}/loss_vs_time.png)")
    title = "with a learning-rate sweep and two seeds" if args.sweep else "on the embedded default"
    body = body.replace("# loralab compare", f"# loralab compare: every method {title}", 1)
    flag = " --quick" if args.quick else " --sweep" if args.sweep else ""
    body += f"\nProduced by `python benchmarks/compare.py{flag}` (which runs the command above).\n"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(body)
    print(f"wrote {results} and {docs}/", file=sys.stderr)
    failed = [m for m, s in summaries.items() if s.get("status", "ok") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
