"""Every method side by side: ``loralab compare`` on its embedded default, recorded for the README.

Runs the comparison (each method in its own process: same model, seed, batches and schedule), then
writes ``benchmarks/results/compare.md`` (the table, the command, the machine, the date) and copies the
two plots to ``docs/compare/`` so the root README and BENCHMARKS.md can show them.

Run: ``python benchmarks/compare.py [--quick] [--output_dir DIR]``. ``--quick`` runs 40 steps of four
methods (a smoke run, a few minutes); without it, the full default (150 steps, every registered
method). Timings are wall-clock, so run it on an otherwise idle machine.
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="40 steps, four methods")
    parser.add_argument(
        "--output_dir", default=str(ROOT / ".bench" / "compare"), help="where the run's files go"
    )
    args = parser.parse_args(argv)

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
    from loralab.runners.compare import build_parser

    config = CompareConfig(**vars(build_parser().parse_args(cli)))
    summaries = run_compare(config, command=" ".join(["loralab", "compare", *cli[2:]]))

    out = Path(args.output_dir)
    DOCS.mkdir(parents=True, exist_ok=True)
    for png in ("loss_vs_step.png", "loss_vs_time.png"):
        shutil.copyfile(out / png, DOCS / png)
    (DOCS / "summaries.json").write_text(json.dumps(summaries, indent=1, default=str) + "\n")

    body = (out / "results.md").read_text()
    # the run links its plots beside it; BENCHMARKS.md (repo root) finds them in docs/compare/
    body = body.replace("](loss_vs_step.png)", "](docs/compare/loss_vs_step.png)")
    body = body.replace("](loss_vs_time.png)", "](docs/compare/loss_vs_time.png)")
    body = body.replace(
        "# loralab compare", "# loralab compare: every method on the embedded default", 1
    )
    body += f"\nProduced by `python benchmarks/compare.py{' --quick' if args.quick else ''}` (which runs the command above).\n"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(body)
    print(f"wrote {RESULTS} and {DOCS}/", file=sys.stderr)
    failed = [m for m, s in summaries.items() if s.get("status", "ok") != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
