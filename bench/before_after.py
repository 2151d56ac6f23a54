"""Two commits of flask_proxypool side by side, in one run: the micro figures of each, taking turns.

    .venv/bin/python -m bench.before_after REF [--python PATH] [--runs 5]

Checks out REF into a temporary git worktree, starts the benchmark's PostgreSQL
(bench/common.py), then runs the same measurement (bench/before_after_worker.py)
in fresh processes that import flask_proxypool from REF or from this checkout,
alternating which goes first. Prints each figure's median and after ÷ before.
A refactoring should leave the ratios at about 1.00 (the machine's noise: run
it twice). Pools use `reset: "rollback"`: the figures are the library's own
code, with no query.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from .common import ROOT, Database, log

WORKER = Path(__file__).with_name("before_after_worker.py")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.before_after", description=__doc__)
    ap.add_argument("ref", help="the commit to compare with (the 'before'), e.g. HEAD~10")
    ap.add_argument("--python", default=sys.executable, help="the interpreter to measure with (3.11 or 3.13t)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pp-before-") as tmp:
        before = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.ref], check=True,
                       capture_output=True)  # fmt: skip
        try:
            with Database() as db:
                trees = {f"before ({args.ref})": before, "after (this checkout)": ROOT}
                res: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
                for run in range(args.runs):
                    order = list(trees.items())
                    if run % 2:
                        order.reverse()
                    for label, root in order:
                        env = dict(os.environ, PYTHONPATH=str(root))
                        out = subprocess.run([args.python, str(WORKER), db.dsn("pp_before_after")], env=env,
                                             capture_output=True, text=True, check=True)  # fmt: skip
                        res[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    log(f"before_after: run {run + 1}/{args.runs} done")
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    (b_label, b), (a_label, a) = res.items()
    print(f"{args.python}: µs per operation, median of {args.runs} runs (best of 5 repeats in each)")
    print(f"| figure | {b_label} | {a_label} | after ÷ before |\n|:--|--:|--:|--:|")
    for key in a[0]:
        before_us = statistics.median(r[key] for r in b)
        after_us = statistics.median(r[key] for r in a)
        print(f"| {key} | {before_us:.3f} | {after_us:.3f} | {after_us / before_us:.2f}× |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
