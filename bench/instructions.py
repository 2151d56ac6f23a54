"""Machine instructions per request, counted by callgrind: the extension's cost without the host's noise.

Why: on a shared 2-core machine, CPU time per request moves by ±15% from one
minute to the next, more than the few percent the extension adds, so timed
ratios take many rounds to settle. An instruction count barely moves: an
app context (no I/O) counts the same run to run, whatever else runs; a
request moves by up to about 1%, as the query's wait for the server loops a
number of times that depends on timing. It is not time (a cache miss, an atomic on a
shared line, a context switch cost no instruction), so it stands next to the
timed tables, it does not replace them: it tells whether a change made the
code path shorter, and by how much.

What, two workloads, each in one thread:

- ``request``: the app of bench/apps.py (``GET /item/<id>``, one SELECT through
  psycopg, autocommit), called straight through WSGI (no server, no socket).
- ``context``: issue 12's one-thread figure, ``with app.app_context():
  db.pgconn`` (a connection taken and returned, no query); the baseline is a
  Flask app without the extension, ``with app.app_context(): pass``, and
  psycopg_pool the usual recipe (getconn into ``g``, putconn at teardown).

And next to them, ``floor``: the least any pool can cost a request through
Flask's public hooks, the same recipe over a bare ``list`` (``pop`` into ``g``,
``append`` at teardown): no reset, no waiting, no bookkeeping, not a pool one
could deploy. What flask_proxypool adds beyond it is what its guarantees cost.

``python -m bench.instructions worker WORKLOAD APPROACH N DSN`` builds it,
warms it up, stops the cyclic GC (a collection lands in one run and not
another), then runs N operations inside ``functools.reduce``, the one C
function callgrind is told to count in (``--toggle-collect``): start-up and
imports are not counted. Instructions of the Python process only (PostgreSQL's
are another process). PYTHONHASHSEED=0: string hashing changes dict probes.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import typing as t

from .common import ROOT, Database, log

#: the approaches counted: the per-thread connection and the extension (what it adds is their difference)
APPROACHES = ("baseline", "flask_proxypool", "psycopg_pool", "floor")
WORKLOADS = ("request", "context")
#: operations counted per run (full, smoke)
REQUESTS = {False: 400, True: 5}

_COLLECTED = re.compile(r"Collected : (\d+)")


def _count(python: str, workload: str, approach: str, n: int, dsn: str) -> float:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind not found: install it (sudo apt-get install -y valgrind); bench/run does")
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT)}
    cmd = [valgrind, "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=functools_reduce",
           "--callgrind-out-file=/dev/null", python, "-m", "bench.instructions", "worker", workload, approach, str(n),
           dsn]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False)
    m = _COLLECTED.search(proc.stderr)
    if proc.returncode != 0 or m is None or proc.stdout.strip() != "ok":
        raise RuntimeError(f"callgrind run failed ({' '.join(cmd[-6:-1])}): {proc.stdout[-500:]}{proc.stderr[-1500:]}")
    return int(m.group(1)) / n


def run(db: Database, pythons: dict[str, str], smoke: bool) -> dict[str, t.Any]:
    """Instructions per operation, per workload, approach and interpreter ({label: python}), two runs at a time."""
    n = REQUESTS[smoke]
    jobs = [(w, label, py, a) for w in WORKLOADS for label, py in pythons.items() for a in APPROACHES]
    log(f"instructions: {len(jobs)} callgrind runs of {n} operations")
    with concurrent.futures.ThreadPoolExecutor(2) as ex:  # one per CPU: counts do not depend on load
        futures = {job: ex.submit(_count, job[2], job[0], job[3], n, db.dsn(f"bench_ic_{job[3]}")) for job in jobs}
        counts = {job: f.result() for job, f in futures.items()}
    out: dict[str, t.Any] = {"requests": n}
    for w in WORKLOADS:
        out[w] = {}
        for label, py in pythons.items():
            per = {a: counts[(w, label, py, a)] for a in APPROACHES}
            base = per["baseline"]
            out[w][label] = {a: {"per_op": v, "added": v - base, "ratio": v / base} for a, v in per.items()}
    return out


def worker(workload: str, approach: str, n: int, dsn: str) -> None:
    import functools
    import gc

    op = _request(approach, dsn) if workload == "request" else _context(approach, dsn)
    for i in range(50):  # the connection made, psycopg's statement cache and Flask's lazy parts warmed
        op(None, i)
    gc.collect()
    gc.disable()
    functools.reduce(op, range(n), None)  # counted (--toggle-collect=functools_reduce)
    print("ok")


Op = t.Callable[[object, int], None]


def _request(approach: str, dsn: str) -> Op:
    from werkzeug.test import EnvironBuilder

    os.environ.update(BENCH_APPROACH=approach, BENCH_DSN=dsn, BENCH_SIZE="1", BENCH_MODE="item")
    from .apps import create_app

    app = create_app()
    environs = [EnvironBuilder(path=f"/item/{i}").get_environ() for i in range(1, 101)]

    def one(_: object, i: int) -> None:
        body = app(dict(environs[i % len(environs)]), lambda status, headers, exc_info=None: None)
        b"".join(body)
        body.close()  # type: ignore[attr-defined]  # a werkzeug response: closing it ends the request

    return one


def _context(approach: str, dsn: str) -> Op:
    from flask import Flask

    app = Flask(f"bench_ic_{approach}")
    if approach == "baseline":  # what the others are net of: a plain app's context

        def bare(_: object, i: int) -> None:
            with app.app_context():
                pass

        return bare
    if approach == "flask_proxypool":
        from flask_proxypool import ProxyPool, db

        app.config["PROXYPOOL_POOLS"] = {
            "db": {"conninfo": dsn, "autocommit": True, "max_size": 1, "reset": "rollback"}
        }
        ProxyPool(app)

        def proxied(_: object, i: int) -> None:
            with app.app_context():
                db.pgconn  # noqa: B018  # the first use takes a connection; the context's end gives it back

        return proxied
    from .apps import _floor, in_g

    if approach == "floor":
        conn = _floor(app, dsn, 1, True)
    else:
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(dsn, min_size=1, max_size=1, kwargs={"autocommit": True}, open=True)
        conn = in_g(app, pool.getconn, pool.putconn)

    def recipe(_: object, i: int) -> None:
        with app.app_context():
            conn().pgconn  # noqa: B018

    return recipe


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 6 or sys.argv[2] not in WORKLOADS:
        raise SystemExit(
            "usage: python -m bench.instructions worker request|context APPROACH N DSN  (started by bench/ft.py)"
        )
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
