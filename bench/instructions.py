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

``http``: the same request served by ``gunicorn -k gthread -w 1 --threads 8``
(the HTTP tables' 1 x 8 shape) under callgrind, counted in its worker
process: gunicorn's HTTP parsing, the sockets' system calls on the Python
side, the threads' hand-offs, Flask, the pool and psycopg, everything the
timed "app CPU per request" covers but the kernel and the waiting. Loaded by a
client of 16 keep-alive connections (as wrk is). Start-up cannot be told
apart from the work in a count taken at exit, so each server runs twice,
with `HTTP_REQUESTS` (n1, n2) requests after the same warm-up; the
difference over n2 - n1 is per request (start-up varies by about 20 million
instructions, so 0.5% of a request at 2,000 requests apart). Under callgrind
the server runs about 50 times slower, so the pool's `liveness_after` (10 ms:
no test for a connection given back that recently, which under load is most
of them) would never hold: it is set to 1 s there, so the count has the
tests a loaded server has, not the ones a slowed one would.

``layouts``: the request again, run in a thread other than the main one (as gunicorn's are), on each
free-threaded interpreter, in several layouts of CPython's type cache (``BENCH_LAYOUT``, bench/layout.py),
counting its misses: the calls the cache's lookup makes to
``find_name_in_mro``, one per miss. On 3.13t each miss takes a process-wide lock, on which a served
worker's threads spin (a third of its CPU in ``perf``); which lookups collide depends on the layout, so one
count is one draw, and the mean over layouts is what a change to the code path costs there.

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
import dataclasses
import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import typing as t
from pathlib import Path

from . import httpbench
from .common import ROOT, Database, log

#: the approaches counted: the per-thread connection and the extension (what it adds is their difference)
APPROACHES = ("baseline", "flask_proxypool", "psycopg_pool", "floor")
WORKLOADS = ("request", "context")
#: operations counted per run (full, smoke)
REQUESTS = {False: 400, True: 5}
#: the ``http`` workload: approaches, and requests after warm-up in its two runs (full, smoke)
HTTP_APPROACHES = ("baseline", "flask_proxypool")
HTTP_REQUESTS = {False: (208, 2208), True: (0, 32)}  # multiples of HTTP_CONNECTIONS
#: keep-alive client connections, as wrk's in the HTTP tables (the server: their 1 x 8 phase, `_HTTP_PHASE`)
HTTP_CONNECTIONS = 16
#: the ``layouts`` count: its approaches, and the seeds of bench/layout.py (full, smoke)
LAYOUT_APPROACHES = ("baseline", "flask_proxypool")
LAYOUTS = {False: tuple(range(1, 7)), True: (1,)}
#: the type cache's lookup: each call it makes to find_name_in_mro is a miss
_LOOKUPS = ("_PyType_LookupRef", "_PyType_Lookup")

_COLLECTED = re.compile(r"Collected : (\d+)")


def _valgrind() -> str:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise RuntimeError("valgrind not found: install it (sudo apt-get install -y valgrind); bench/run does")
    return valgrind


def _count(python: str, workload: str, approach: str, n: int, dsn: str) -> float:
    return _callgrind(python, workload, approach, n, dsn, misses=False)[0] / n


def _count_misses(python: str, approach: str, n: int, dsn: str, layout: int) -> float:
    """Type-cache misses per request in one layout, in the request's thread (not the pool's own, whose timers
    fire about 50 times as often per request under callgrind's pace): callgrind counts calls outside the
    counted function too, so two runs, of `n` and 2 `n` requests, and the difference over `n`."""
    return (_callgrind(python, "threaded", approach, 2 * n, dsn, layout)[1]
            - _callgrind(python, "threaded", approach, n, dsn, layout)[1]) / n  # fmt: skip


def _callgrind(
    python: str, workload: str, approach: str, n: int, dsn: str, layout: int = 0, *, misses: bool = True
) -> tuple[int, int]:
    """Instructions in `n` operations of one worker process, and type-cache misses in the thread that ran them
    (0 without `misses`: no profile is written, nor read)."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(ROOT), "BENCH_LAYOUT": str(layout or "")}
    with tempfile.TemporaryDirectory(prefix="ppbench-ic-") as tmp:
        out = ["--separate-threads=yes", f"--callgrind-out-file={tmp}/cg.out"] if misses else [
            "--callgrind-out-file=/dev/null"]  # fmt: skip
        cmd = [_valgrind(), "--tool=callgrind", "--collect-atstart=no", "--toggle-collect=functools_reduce", *out,
               python, "-m", "bench.instructions", "worker", workload, approach, str(n), dsn]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False)
        m = _COLLECTED.search(proc.stderr)
        if proc.returncode != 0 or m is None or proc.stdout.strip() != "ok":
            raise RuntimeError(
                f"callgrind run failed ({' '.join(cmd[-6:-1])}): {proc.stdout[-500:]}{proc.stderr[-1500:]}"
            )
        if not misses:
            return int(m.group(1)), 0
        # the thread that ran the counted operations: the one whose file has instructions collected
        counted = max(Path(tmp).glob("cg.out-*"), key=lambda p: _summary(p) or 0)
        return int(m.group(1)), _misses(counted)


def _summary(path: Path) -> int | None:
    """The instructions a callgrind output file counted, or None if it has no total."""
    m = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.MULTILINE)
    return int(m.group(1)) if m else None


def _misses(path: Path) -> int:
    """Calls the type cache's lookup made to find_name_in_mro in a callgrind output: one per miss."""
    names: dict[str, str] = {}  # callgrind's name compression: "(id) name" once, then "(id)"
    fn = cfn = ""
    total = 0
    with open(path, errors="replace") as f:
        for line in f:
            if line.startswith(("fn=", "cfn=")):
                key, _, rest = line.rstrip("\n").partition("=")
                m = re.match(r"\((\d+)\)(?: (.*))?$", rest)
                name = rest if m is None else (names.setdefault(m[1], m[2]) if m[2] else names.get(m[1], ""))
                if key == "fn":
                    fn = name
                else:
                    cfn = name
            elif line.startswith("calls=") and cfn == "find_name_in_mro" and fn in _LOOKUPS:
                total += int(line[6:].split()[0])
    return total


#: bench/httpbench.py's 1 x 8 phase, with room for callgrind's pace: a worker booting under it takes about 30 s
#: (gunicorn's default timeout would kill it), and its exit (which writes the counts) must not be cut short
_HTTP_PHASE = dataclasses.replace(
    httpbench.phases()[0], gunicorn_args=("--timeout", "900", "--graceful-timeout", "120")
)


def _served(db: Database, label: str, python: str, approach: str, requests: int) -> int:
    """Instructions of gunicorn's worker process, start to exit, having served a warm-up and `requests`."""
    with tempfile.TemporaryDirectory(prefix="ppbench-ic-http-") as tmp:
        server = httpbench.Server(
            _HTTP_PHASE, approach, db, Path(tmp), python=python, tag=f"_ic_{label}",
            wrapper=(_valgrind(), "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.%p"),
            env={"PYTHONHASHSEED": "0", "BENCH_FPP_OPTIONS": '{"liveness_after": 1.0}'},
        )  # fmt: skip
        server.start()
        try:
            server.wait_ready(timeout=600)  # start-up under callgrind: about 30 s
            errors: list[str] = []

            def client(k: int) -> None:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
                    for i in range(k):
                        c.request("GET", f"/item/{1 + (i * 7919) % 100}")
                        r = c.getresponse()
                        r.read()
                        if r.status != 200:
                            errors.append(f"HTTP {r.status}")
                    c.close()
                except Exception as e:
                    errors.append(repr(e))

            def load(total: int) -> None:
                threads = [threading.Thread(target=client, args=(total // HTTP_CONNECTIONS,))
                           for _ in range(HTTP_CONNECTIONS)]  # fmt: skip
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()

            load(HTTP_CONNECTIONS * 10)  # warm-up: every thread has its connection, every cache is warm
            load(requests - requests % HTTP_CONNECTIONS)
            if errors:
                raise RuntimeError(f"{approach}: {len(errors)} failed requests under callgrind, e.g. {errors[0]}")
            workers = server.pids()[1:]
        finally:
            server.stop(timeout=300)
        if not workers:
            raise RuntimeError(f"gunicorn had no worker to count: see {server.logfile}")
        total = 0
        for pid in workers:
            count = _summary(Path(f"{tmp}/cg.{pid}"))
            if count is None:
                raise RuntimeError(f"no count in callgrind's output for worker {pid}")
            total += count
        return total


def _count_http(db: Database, label: str, python: str, approach: str, smoke: bool) -> float:
    """Instructions per HTTP request in the worker: the difference of two served runs (see ``http``)."""
    n1, n2 = HTTP_REQUESTS[smoke]
    if smoke:  # one run, start-up included: it exercises the path; the figure means nothing
        return _served(db, label, python, approach, n2) / n2
    return (_served(db, label, python, approach, n2) - _served(db, label, python, approach, n1)) / (n2 - n1)


def run(db: Database, pythons: dict[str, str], smoke: bool, free_threaded: t.Sequence[str] = ()) -> dict[str, t.Any]:
    """Instructions per operation, per workload, approach and interpreter ({label: python}), two runs at a time;
    type-cache misses per request in several layouts on the `free_threaded` ones (labels)."""
    n = REQUESTS[smoke]
    jobs = [(w, label, py, a) for w in WORKLOADS for label, py in pythons.items() for a in APPROACHES]
    http_jobs = [("http", label, py, a) for label, py in pythons.items() for a in HTTP_APPROACHES]
    layout_jobs = [(seed, label, pythons[label], a) for label in free_threaded for a in LAYOUT_APPROACHES
                   for seed in LAYOUTS[smoke]]  # fmt: skip
    log(f"instructions: {len(jobs) + len(layout_jobs)} callgrind runs of {n} operations, "
        f"{2 * len(http_jobs)} of gunicorn")  # fmt: skip
    with concurrent.futures.ThreadPoolExecutor(2) as ex:  # one per CPU: counts do not depend on load
        futures = {job: ex.submit(_count, job[2], job[0], job[3], n, db.dsn(f"bench_ic_{job[3]}")) for job in jobs}
        futures.update({job: ex.submit(_count_http, db, job[1], job[2], job[3], smoke) for job in http_jobs})
        by_layout = {
            job: ex.submit(_count_misses, job[2], job[3], n, db.dsn(f"bench_ic_{job[3]}"), job[0])
            for job in layout_jobs
        }
        counts = {job: f.result() for job, f in futures.items()}
        misses = {job: f.result() for job, f in by_layout.items()}
    out: dict[str, t.Any] = {"requests": n, "http_requests": HTTP_REQUESTS[smoke], "layouts": {}}
    for label in free_threaded:
        out["layouts"][label] = {
            a: [misses[(seed, label, pythons[label], a)] for seed in LAYOUTS[smoke]] for a in LAYOUT_APPROACHES
        }
    for w in (*WORKLOADS, "http"):
        out[w] = {}
        for label, py in pythons.items():
            per = {a: counts[(w, label, py, a)] for a in (HTTP_APPROACHES if w == "http" else APPROACHES)}
            base = per["baseline"]
            out[w][label] = {a: {"per_op": v, "added": v - base, "ratio": v / base} for a, v in per.items()}
    return out


def worker(workload: str, approach: str, n: int, dsn: str) -> None:
    """``threaded``: the request, made and run in a thread that is not the main one, as a served request is
    (the objects the main thread made at import are another thread's there)."""
    import functools
    import gc

    op = _context(approach, dsn) if workload == "context" else _request(approach, dsn)

    def run() -> None:
        for i in range(50):  # the connection made, psycopg's statement cache and Flask's lazy parts warmed
            op(None, i)
        gc.collect()
        gc.disable()
        functools.reduce(op, range(n), None)  # counted (--toggle-collect=functools_reduce)

    if workload == "threaded":
        th = threading.Thread(target=run)
        th.start()
        th.join()
    else:
        run()
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
    if sys.argv[1:2] != ["worker"] or len(sys.argv) != 6 or sys.argv[2] not in (*WORKLOADS, "threaded"):
        raise SystemExit(
            "usage: python -m bench.instructions worker request|context|threaded APPROACH N DSN"
            "  (started by bench/ft.py)"
        )
    worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
