"""Per-module table of a finished `mutmut run` (`make mutate` prints it): mutants, killed,
survived, no test reaching them, excluded as equivalent, and the killed share.

Killed counts timeouts as mutmut does. Mutants listed in `tests/equivalent_mutants.txt` (one
`key  # reason` per line) are equivalent to the original code — no test could tell them apart —
and leave the denominator; each needs its one-line reason there.

    .venv/bin/python tests/mutation_table.py [--min 80]   # exit 1 if a module is under --min %
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EQUIVALENT = ROOT / "tests" / "equivalent_mutants.txt"
KILLED = {1, 3, 24, -24, 36, 152, 255}


def equivalent() -> dict[str, str]:
    """Mutant key → reason it is equivalent."""
    out = {}
    if EQUIVALENT.exists():
        for line in EQUIVALENT.read_text().splitlines():
            key, _, reason = line.partition("#")
            if key.strip():
                out[key.strip()] = reason.strip()
    return out


def table(mutants: Path) -> list[dict]:
    """One row per mutated module, from mutmut's `*.meta` result files."""
    excluded = equivalent()
    rows = []
    for meta in sorted(mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        module = str(meta.relative_to(mutants)).removesuffix(".meta")
        eq = [k for k in codes if k in excluded]
        live = {k: v for k, v in codes.items() if k not in excluded}
        killed = sum(v in KILLED for v in live.values())
        no_tests = sum(v in (5, 33) for v in live.values())
        survived = sum(v == 0 for v in live.values())
        rows.append(
            {
                "module": module,
                "mutants": len(codes),
                "killed": killed,
                "survived": survived,
                "no_tests": no_tests,
                "equivalent": len(eq),
                "share": 100.0 * killed / max(len(live), 1),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mutants", default=str(ROOT / "mutants"))
    parser.add_argument("--min", type=float, default=None, help="fail under this killed share")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    rows = table(Path(args.mutants))
    header = (
        f"{'module':34} {'mutants':>7} {'killed':>7} {'survived':>8} {'no test':>7} "
        f"{'equiv':>5} {'killed %':>8}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['module']:34} {r['mutants']:7} {r['killed']:7} {r['survived']:8} "
            f"{r['no_tests']:7} {r['equivalent']:5} {r['share']:7.1f}%"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    low = [r["module"] for r in rows if args.min is not None and r["share"] < args.min]
    if low:
        print(f"under {args.min:g} % killed: {', '.join(low)}")
    return 1 if low else 0


if __name__ == "__main__":
    sys.exit(main())
