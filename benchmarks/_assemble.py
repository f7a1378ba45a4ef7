"""Assemble BENCHMARKS.md at the repository root from benchmarks/results/*.md.

Run by ``nox -s bench`` after every benchmark script. The core results come first, then every other
package's in name order; each file is included as written (its own heading, table, command, machine).

    python benchmarks/_assemble.py [--results DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEADER = """# loralab benchmarks

Assembled from `benchmarks/results/*.md` by `benchmarks/_assemble.py` (run `nox -s bench` to
regenerate every table, or `python benchmarks/<name>.py --quick` for one). Each section states its
exact command, machine and date; timings taken on a shared machine are marked as such.
"""


def ordered(results: Path) -> list[Path]:
    """``core.md`` first, then the rest sorted by name."""
    files = sorted(p for p in results.glob("*.md") if p.is_file())
    return sorted(files, key=lambda p: (p.stem != "core", p.name))


def assemble(results: Path, out: Path) -> str:
    parts = [
        HEADER.rstrip(),
        f"_Assembled {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC._",
    ]
    files = ordered(results)
    if not files:
        parts.append("No benchmark results yet: run `nox -s bench`.")
    for path in files:
        text = path.read_text().strip()
        if text.startswith("# "):  # every section one level under the page title
            text = "#" + text
        parts.append(f"<!-- from benchmarks/results/{path.name} -->\n" + text)
    text = "\n\n".join(parts) + "\n"
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    assemble(args.results, args.out)
    print(f"wrote {args.out} from {len(ordered(args.results))} result file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
