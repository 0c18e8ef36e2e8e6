"""Compare two results folders run by the same commands: every seed*.json's "metrics" and "curves" must be equal.

``python -m tools.compare_smoke /tmp/smoke_before /tmp/smoke_after`` (e.g. each filled by ``replicate run tableN
--profile smoke --seeds 1 --results DIR --no-render --quiet`` for N = 1..15, before and after a change meant to
preserve values). Prints each record that differs or exists on one side only; exit status 1 if any.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

KEYS = ("status", "metrics", "curves", "instability", "iterations", "diverged_at", "config")


def records(root: Path) -> dict[str, dict]:
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("seed*.json"))}


def compare(before: Path, after: Path, keys: tuple[str, ...] = KEYS) -> list[str]:
    a, b = records(before), records(after)
    problems = [f"{name}: only in {before if name in a else after}" for name in sorted(set(a) ^ set(b))]
    for name in sorted(set(a) & set(b)):
        problems += [f"{name}: {key} differs" for key in keys if a[name].get(key) != b[name].get(key)]
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.compare_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    args = p.parse_args(argv)
    problems = compare(args.before, args.after)
    n = len(records(args.before))
    print("\n".join(problems) or f"{n} records: metrics, curves and status identical")
    return 1 if problems or not n else 0


if __name__ == "__main__":
    sys.exit(main())
