"""``python -m bench [--smoke] [--only micro|http|ft] ...``: run the benchmarks, write the reports."""

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
    ap.add_argument("--only", choices=("micro", "http", "ft", "clean"),
                    help="run one part only (micro, http: no docs written); ft: free-threaded 3.13t next to "
                         "3.11, writes bench/results/ft.* and its section of docs/performance.md; clean: what "
                         "the session reset costs over HTTP (default against reset: rollback), bench/results/clean.*")
    ap.add_argument("--ft-python", default=str(ROOT / ".venv-ft" / "bin" / "python"),
                    help="the free-threaded interpreter for --only ft (default: .venv-ft/bin/python)")
    ap.add_argument("--http-approaches", default=None,
                    help="comma-separated approaches for the 1x8 and 2x4 phases "
                         "(default: baseline,baseline_twin,flask_proxypool,psycopg_pool,proxypatternpool,"
                         "sqlalchemy,dbutils; "
                         "with --only ft: baseline,baseline_twin,flask_proxypool,psycopg_pool)")
    ap.add_argument("--no-docs", action="store_true", help="do not rewrite docs/performance.{md,png}")
    ap.add_argument("--docs-only", action="store_true",
                    help="measure nothing: rewrite docs/performance.md from bench/results/latest.json and ft.json "
                         "(after editing bench/notes.md, bench/notes-ft.md or bench/report.py)")
    args = ap.parse_args(argv)  # fmt: skip
    outdir = ROOT / "bench" / "results"
    if args.docs_only:
        latest = _load(outdir / "latest.json")
        if latest is None:
            ap.error("--docs-only: no bench/results/latest.json (run bench/run first)")
        doc = report.performance_doc(latest, "performance.png", _load(outdir / "ft.json"), _load(outdir / "clean.json"))
        (ROOT / "docs" / "performance.md").write_text(doc, encoding="utf-8")
        log("wrote docs/performance.md")
        return 0

    from . import ft, httpbench, micro

    full = not args.smoke and args.only is None
    if args.only == "ft":
        name = "ft-smoke" if args.smoke else "ft"
    elif args.only == "clean":
        name = "clean-smoke" if args.smoke else "clean"
    else:
        name = "latest" if full else ("smoke" if args.smoke else "partial")
    outdir.mkdir(parents=True, exist_ok=True)
    default = ft.HTTP_APPROACHES if args.only == "ft" else httpbench.HTTP_APPROACHES
    approaches = tuple(args.http_approaches.split(",")) if args.http_approaches else default
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
        if args.only == "ft":
            res["ft"] = ft.run(db, args.smoke, quiet, args.ft_python, approaches)
        if args.only == "clean":
            res["http"] = httpbench.run(db, args.smoke, quiet, approaches, lambda _: httpbench.clean_phases())
        res["noise"] = quiet.totals()
    res["elapsed_s"] = time.monotonic() - t0
    if "ft" not in res and args.only != "clean":
        res["targets"] = report.targets(res)

    if args.only == "clean":
        md = report.clean_markdown(res)
    else:
        md = report.ft_markdown(res) if "ft" in res else report.markdown(res)
    print(md)
    (outdir / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n", encoding="utf-8")
    (outdir / f"{name}.md").write_text(f"# Benchmark results ({name})\n\n" + md + "\n", encoding="utf-8")
    written = [outdir / f"{name}.md", outdir / f"{name}.json"]
    docs = ROOT / "docs"
    if full and not args.no_docs:
        # the free-threaded section comes from the last `--only ft` run, kept in bench/results/ft.json
        report.chart(res, docs / "performance.png")
        (docs / "performance.md").write_text(
            report.performance_doc(res, "performance.png", _load(outdir / "ft.json"), _load(outdir / "clean.json")),
            encoding="utf-8",
        )
        written += [docs / "performance.md", docs / "performance.png"]
    elif name == "ft" and not args.no_docs:
        latest = _load(outdir / "latest.json")  # the rest of the page: the last full run, as it was
        if latest is None:
            log("no bench/results/latest.json (no full run yet): docs/performance.md not written")
        else:
            (docs / "performance.md").write_text(report.performance_doc(latest, "performance.png", res,
                                                 _load(outdir / "clean.json")), encoding="utf-8")  # fmt: skip
            written.append(docs / "performance.md")
    elif name == "clean" and not args.no_docs:
        latest = _load(outdir / "latest.json")
        if latest is not None:
            doc = report.performance_doc(latest, "performance.png", _load(outdir / "ft.json"), res)
            (docs / "performance.md").write_text(doc, encoding="utf-8")
            written.append(docs / "performance.md")
    elif "micro" in res and "http" in res:
        report.chart(res, outdir / f"{name}.png")  # proves the chart code works; not committed
        written.append(outdir / f"{name}.png")
    fails = [x["target"] for x in res.get("targets", []) if x["verdict"] == "FAIL"]
    log(f"done in {res['elapsed_s']:.0f} s; wrote {', '.join(str(Path(p).relative_to(ROOT)) for p in written)}")
    if fails and not args.smoke:
        log(f"{len(fails)} target(s) not met (reported, not an error): " + "; ".join(fails))
    return 0


def _load(path: Path) -> dict[str, t.Any] | None:
    """A results file written by an earlier run, or None."""
    try:
        return t.cast(dict[str, t.Any], json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
