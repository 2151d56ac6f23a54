"""What the checkout liveness test costs: getconn + putconn on a pool of one real psycopg connection.

Run from the repository root (it starts its own throwaway PostgreSQL, as the tests do)::

    .venv/bin/python bench/liveness.py [--repeats 7] [--seconds 0.2]

Contenders, each a ``Pool(max_size=1)`` of ``PsycopgKind(dsn)`` with default connect options, the
connection made before timing, one thread, ``putconn(getconn())`` per operation:

* ``none``: ``liveness="none"``, no test at all (the floor);
* ``poll, liveness_after=1``: the poll skipped for a connection given back less than 1 s ago (the
  old default: in this loop, never polled);
* ``poll, liveness_after=0``: the default, one non-blocking ``poll()`` per checkout;
* ``query``: the kind's full check (an empty query, a round trip, run in a helper thread bounded by
  ``check_timeout``) per checkout.

Also the parts alone: the pool's per-connection probe, and a bare ``poll(0)`` on the socket.
µs per operation, best and median of the repeats, contenders alternating within each repeat, gc off
while timing. Compare ratios within one run, never numbers across runs.
"""

from __future__ import annotations

import argparse
import gc
import platform
import shutil
import statistics
import sys
import timeit
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT / "tests", ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0 if _p.name == "tests" else len(sys.path), str(_p))


def _calibrate(timer: timeit.Timer, seconds: float) -> int:
    number = 1
    while True:
        if timer.timeit(number) >= seconds / 5:
            return max(1, int(number * 5 * (seconds / 5) / max(timer.timeit(number), 1e-9)))
        number *= 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.2, help="per contender and repeat")
    args = ap.parse_args(argv)

    import psycopg

    from flask_proxypool.kinds.psycopg import PsycopgKind
    from flask_proxypool.pool import Pool
    from pgserver import PgServer, make_basedir

    basedir = make_basedir("ppbench-live-")
    server = PgServer(basedir)
    pools: list[Pool[t.Any]] = []
    try:
        server.start()
        dsn = server.conninfo("postgres", application_name="bench_liveness")

        def pool(**kw: t.Any) -> Pool[t.Any]:
            # reset="rollback": the checkout test is what is timed, not the session reset (a round trip)
            p: Pool[t.Any] = Pool(PsycopgKind(dsn, reset="rollback"), max_size=1, health_check_interval=0, **kw)
            p.putconn(p.getconn())  # made before timing
            pools.append(p)
            return p

        contenders: dict[str, timeit.Timer] = {}
        for label, kw in [
            ("none", {"liveness": "none"}),
            ("poll, liveness_after=1", {"liveness": "poll", "liveness_after": 1.0}),
            ("poll, liveness_after=0 (default)", {"liveness": "poll", "liveness_after": 0.0}),
            ("query", {"liveness": "query"}),
        ]:
            p = pool(**kw)
            contenders[label] = timeit.Timer("put(get())", globals={"get": p.getconn, "put": p.putconn})
        # the parts alone, on a connection of their own
        conn = psycopg.connect(dsn)
        probe = PsycopgKind(dsn).prober(conn)
        import select

        poller = select.poll()
        poller.register(conn.pgconn.socket, select.POLLIN | select.POLLPRI | select.POLLERR | select.POLLHUP)
        contenders["probe alone (transaction_status + poll(0))"] = timeit.Timer("probe()", globals={"probe": probe})
        contenders["bare poll(0)"] = timeit.Timer("poll(0)", globals={"poll": poller.poll})

        numbers = {k: _calibrate(tm, args.seconds) for k, tm in contenders.items()}
        samples: dict[str, list[float]] = {k: [] for k in contenders}
        gc.disable()
        try:
            for _ in range(args.repeats):
                for k, tm in contenders.items():
                    samples[k].append(tm.timeit(numbers[k]) / numbers[k] * 1e6)
        finally:
            gc.enable()
        conn.close()

        floor = statistics.median(samples["none"])
        print(f"# bench/liveness.py: Python {platform.python_version()}, psycopg {psycopg.__version__}, "
              f"PostgreSQL {server.psql('SHOW server_version')[0][0]}, {args.repeats} repeats")  # fmt: skip
        print("| contender | best µs/op | median µs/op | median − none µs | ÷ none |")
        print("|---|---|---|---|---|")
        for k, xs in samples.items():
            med = statistics.median(xs)
            pooled = not k.startswith(("probe", "bare"))
            extra = f"{med - floor:+.2f} | {med / floor:.2f}×" if pooled else "— | —"
            print(f"| {k} | {min(xs):.2f} | {med:.2f} | {extra} |")
    finally:
        for p in pools:
            p.close(timeout=1.0)
        server.stop("fast")
        shutil.rmtree(basedir, ignore_errors=True)


if __name__ == "__main__":
    main()
