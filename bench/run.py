"""``python -m bench [--smoke] [--only micro|http] ...``: run the benchmarks, write the reports."""

from __future__ import annotations

import argparse
import datetime
import json
import time
import typing as t
from pathlib import Path

from . import report
from .common import ROOT, Database, Quiet, log, machine


def main(argv: t.Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    ap.add_argument("--smoke", action="store_true",
                    help="about 10 s: every code path once, tiny durations; for CI, never read the numbers")
    ap.add_argument("--only", choices=("micro", "http"), help="run one part only (no docs written)")
    ap.add_argument("--http-approaches", default=None,
                    help="comma-separated approaches for the 1x8 and 2x4 phases "
                         "(default: baseline,flask_proxypool,psycopg_pool,proxypatternpool,sqlalchemy,dbutils)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.{md,png}")
    args = ap.parse_args(argv)  # fmt: skip

    from . import httpbench, micro

    full = not args.smoke and args.only is None
    name = "latest" if full else ("smoke" if args.smoke else "partial")
    outdir = ROOT / "bench" / "results"
    outdir.mkdir(parents=True, exist_ok=True)
    approaches = tuple(args.http_approaches.split(",")) if args.http_approaches else httpbench.HTTP_APPROACHES
    unknown = set(approaches) - set(httpbench.LABELS)
    if unknown or "baseline" not in approaches:
        ap.error(f"--http-approaches: unknown {sorted(unknown)} or no baseline; known: {sorted(httpbench.LABELS)}")

    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    res: dict[str, t.Any] = {"started": started, "mode": "smoke" if args.smoke else "full"}
    log(f"starting PostgreSQL; {'smoke' if args.smoke else 'full'} run")
    with Database() as db:
        res["machine"] = machine(db)
        # A measurement during which other processes used more than a quarter of a core is
        # taken again (up to 3 attempts) after waiting for a quiet second; at most 1 minute of
        # waiting for the micro part and for each HTTP phase (4 minutes in all).
        quiet = Quiet(db, threshold=0.25, budget=0.0 if args.smoke else 60.0, attempts=1 if args.smoke else 3)
        if args.only in (None, "micro"):
            res["micro"] = micro.run(db, args.smoke, quiet.part(60.0))
        if args.only in (None, "http"):
            res["http"] = httpbench.run(db, args.smoke, quiet, approaches)
        res["noise"] = quiet.totals()
    res["elapsed_s"] = time.monotonic() - t0
    res["targets"] = report.targets(res)

    md = report.markdown(res)
    print(md)
    (outdir / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    (outdir / f"{name}.md").write_text(f"# Benchmark results ({name})\n\n" + md + "\n", encoding="utf-8")
    written = [outdir / f"{name}.md", outdir / f"{name}.json"]
    if full and not args.no_docs:
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        report.chart(res, docs / "performance.png")
        (docs / "performance.md").write_text(report.performance_doc(res, "performance.png"), encoding="utf-8")
        written += [docs / "performance.md", docs / "performance.png"]
    elif "micro" in res and "http" in res:
        report.chart(res, outdir / f"{name}.png")  # proves the chart code works; not committed
        written.append(outdir / f"{name}.png")
    fails = [x["target"] for x in res["targets"] if x["verdict"] == "FAIL"]
    log(f"done in {res['elapsed_s']:.0f} s; wrote {', '.join(str(Path(p).relative_to(ROOT)) for p in written)}")
    if fails and not args.smoke:
        log(f"{len(fails)} target(s) not met (reported, not an error): " + "; ".join(fails))
    return 0
