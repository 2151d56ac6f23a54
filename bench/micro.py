"""Micro benchmarks: checkout + return of a real psycopg connection, no query.

Every contender is one ``timeit`` statement (with a setup binding locals), so
the loop around it costs the same for all. One thread: µs per operation,
best and median of several repeats, contenders alternating within each
repeat. Eight threads on a pool of four: operations per second over a fixed
duration and fairness (fewest / most operations done by one thread).
"""

from __future__ import annotations

import contextlib
import gc
import queue
import threading
import time
import timeit
import typing as t
from dataclasses import dataclass, field

from .common import Database, LoadMeter, Quiet, log, median

POOL_SIZE = 4
THREADS = 8
#: The contenders bench/ft.py scales over threads: the three pools' checkout + return, and the floor.
#: what bench/ft.py runs at 1 to 8 threads on both interpreters: the pools' own checkout + return, the floor,
#: and the Flask path (an idle app context with and without the extension, and a first access + return)
SCALING = ("fpp_pool", "psycopg_pool", "ppp", "lifoqueue", "fpp_proxy", "flask_ctx", "flask_ctx_bare")


@dataclass
class Contender:
    key: str
    label: str
    stmt: str
    setup: str = "pass"
    ns: dict[str, t.Any] = field(default_factory=dict)
    threaded: bool = True  #: also run 8 threads on it
    info: bool = False  #: a reference row, not a competitor
    skip: str | None = None  #: why it cannot run (package missing, API missing)
    enter: t.Callable[[], t.Any] | None = None  #: run around the timing (push a context)
    leave: t.Callable[[], t.Any] | None = None


class Setup:
    """Builds every contender's pool on the benchmark database; closes them all at exit."""

    def __init__(self, dsn: str, size: int = POOL_SIZE) -> None:
        self.dsn = dsn
        self.size = size  #: every pool's max_size (and min_size where it has one)
        self.closers: list[t.Callable[[], object]] = []
        self.conns: list[t.Any] = []

    def connect(self) -> t.Any:
        import psycopg

        conn = psycopg.connect(self.dsn, autocommit=True)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for fn in reversed(self.closers):
            with contextlib.suppress(Exception):
                fn()
        for c in self.conns:
            with contextlib.suppress(Exception):
                c.close()

    # -- contenders ---------------------------------------------------------

    def contenders(self) -> list[Contender]:
        out: list[Contender] = []
        out += self._flask_proxypool()
        out += self._psycopg_pool()
        out += self._proxypatternpool()
        out += self._dbutils()
        out += self._sqlalchemy()
        out += self._lifoqueue()
        out += self._references()
        return out

    def scaling_contenders(self) -> list[Contender]:
        """Only the pools' own checkout + return, and the floor (bench/ft.py runs them at 1, 2 and 4 threads)."""
        fpp = self._flask_proxypool(references=False)
        out = [*fpp, *self._psycopg_pool(), *self._proxypatternpool(), *self._lifoqueue()]
        return [c for c in out if c.key in SCALING]

    def _fpp_pool(self, **options: t.Any) -> t.Any:
        from flask_proxypool import Pool
        from flask_proxypool.kinds.psycopg import PsycopgKind

        # reset="rollback": the micro part times the pool with no query; the session reset is a round
        # trip of its own (DISCARD ALL), measured over HTTP by bench/run --only clean
        pool = Pool(PsycopgKind(self.dsn, {"autocommit": True}, reset="rollback"), max_size=self.size, **options)
        self.closers.append(pool.close)
        _fill(pool.getconn, pool.putconn, self.size)
        return pool

    def _fpp_getconn(self) -> Contender:
        return Contender("fpp_pool", "flask_proxypool `Pool` getconn/putconn", "p(g())",
                         "g = pool.getconn; p = pool.putconn", {"pool": self._fpp_pool()})  # fmt: skip

    def _flask_proxypool(self, *, references: bool = True) -> list[Contender]:
        """flask_proxypool's contenders; ``references=False``: not the two reference pools (fewer connections)."""
        from flask import Flask

        from flask_proxypool import ProxyPool, db

        app = Flask("bench_micro")
        app.config["PROXYPOOL_POOLS"] = {
            "db": {"conninfo": self.dsn, "autocommit": True, "max_size": self.size, "reset": "rollback"}
        }
        ext = ProxyPool(app)
        self.closers.append(lambda: ext.close(app))
        with app.app_context():
            _fill(lambda: ext.pool("db").getconn(), lambda c: ext.pool("db").putconn(c), self.size)
        bound = app.app_context()

        def enter() -> None:
            bound.push()
            db.pgconn  # noqa: B018 - takes and binds a connection

        def leave() -> None:
            bound.pop()

        pooled = self._fpp_getconn()
        nolive = self._fpp_pool(liveness="none") if references else None
        strict = self._fpp_pool(fifo_after=0) if references else None
        return [
            pooled,
            Contender("fpp_proxy", "flask_proxypool full proxy path (`with app.app_context(): db.pgconn`)",
                      "with ctx():\n    db.pgconn", "ctx = app.app_context", {"app": app, "db": db}),
            Contender("fpp_attr", "flask_proxypool proxied attribute access (`db.execute`, bound)",
                      "d.execute", "d = db", {"db": db}, threaded=False, enter=enter, leave=leave),
            Contender("fpp_pool_with", "flask_proxypool `with pool.connection()`", "with cm():\n    pass",
                      "cm = pool.connection", pooled.ns, threaded=False, info=True),
            Contender("fpp_pool_strict", "flask_proxypool `Pool` getconn/putconn, `fifo_after=0` (strict hand-off)",
                      "p(g())", "g = pool.getconn; p = pool.putconn", {"pool": strict}, info=True),
            Contender("fpp_pool_nolive", "flask_proxypool `Pool` getconn/putconn, `liveness=\"none\"`", "p(g())",
                      "g = pool.getconn; p = pool.putconn", {"pool": nolive}, threaded=False, info=True),
            Contender("flask_ctx", "Flask `with app.app_context(): pass` alone (no pool taken; our teardown hook runs)",
                      "with ctx():\n    pass", "ctx = app.app_context", {"app": app},
                      threaded=False, info=True),
            Contender("flask_ctx_bare", "Flask `with app.app_context(): pass`, an app without flask_proxypool",
                      "with ctx():\n    pass", "ctx = app.app_context", {"app": Flask("bench_bare")},
                      threaded=False, info=True),
        ]

    def _psycopg_pool(self) -> list[Contender]:
        try:
            import psycopg_pool
        except ImportError:
            return _missing(["psycopg_pool", "psycopg_pool_with", "psycopg_pool_flask"], "psycopg_pool", "psycopg-pool")
        pool = psycopg_pool.ConnectionPool(
            self.dsn, min_size=self.size, max_size=self.size, kwargs={"autocommit": True}, open=True
        )
        self.closers.append(pool.close)
        pool.wait(30)
        return [
            Contender("psycopg_pool", "psycopg_pool `ConnectionPool` getconn/putconn", "p(g())",
                      "g = pool.getconn; p = pool.putconn", {"pool": pool}),
            Contender("psycopg_pool_with", "psycopg_pool `with pool.connection()`", "with cm():\n    pass",
                      "cm = pool.connection", {"pool": pool}),
            Contender("psycopg_pool_flask", "psycopg_pool in Flask, the usual recipe (`with app.app_context(): "
                      "conn().pgconn`: getconn into `g`, putconn in a teardown hook)",
                      "with ctx():\n    conn().pgconn", "ctx = app.app_context", _psycopg_pool_flask(pool),
                      threaded=False, info=True),
        ]

    def _proxypatternpool(self) -> list[Contender]:
        try:
            import psycopg
            import ProxyPatternPool as ppp
        except ImportError:
            return _missing(["ppp"], "ProxyPatternPool", "ProxyPatternPool")
        dsn = self.dsn
        pool = ppp.Pool(lambda i: psycopg.connect(dsn, autocommit=True), max_size=self.size, min_size=self.size)
        self.closers.append(pool.shutdown)
        _fill(pool.get, pool.ret, self.size)
        return [Contender("ppp", "ProxyPatternPool `Pool` get/ret", "r(g())", "g = pool.get; r = pool.ret",
                          {"pool": pool})]

    def _dbutils(self) -> list[Contender]:
        try:
            import psycopg
            from dbutils.pooled_db import PooledDB
        except ImportError:
            return _missing(["dbutils"], "DBUtils `PooledDB`", "DBUtils")
        pool = PooledDB(psycopg, mincached=self.size, maxcached=self.size, maxconnections=self.size,
                        blocking=True, conninfo=self.dsn, autocommit=True)
        self.closers.append(pool.close)
        return [Contender("dbutils", "DBUtils `PooledDB` connection()/close()", "get().close()",
                          "get = pool.connection", {"pool": pool})]

    def _sqlalchemy(self) -> list[Contender]:
        try:
            import psycopg
            from sqlalchemy.pool import QueuePool
        except ImportError:
            return _missing(["sqlalchemy"], "SQLAlchemy `QueuePool`", "SQLAlchemy")
        dsn = self.dsn
        pool = QueuePool(lambda: psycopg.connect(dsn, autocommit=True), pool_size=self.size, max_overflow=0)
        self.closers.append(pool.dispose)
        _fill(pool.connect, lambda c: c.close(), self.size)
        return [Contender("sqlalchemy", "SQLAlchemy `QueuePool` connect()/close()", "get().close()",
                          "get = pool.connect", {"pool": pool})]

    def _lifoqueue(self) -> list[Contender]:
        q: queue.LifoQueue[t.Any] = queue.LifoQueue()
        for _ in range(self.size):
            q.put(self.connect())
        return [Contender("lifoqueue", "bare `queue.LifoQueue` get/put (the floor)", "p(g())",
                          "g = q.get; p = q.put", {"q": q})]

    def _references(self) -> list[Contender]:
        conn = self.connect()
        return [
            Contender("attr_plain", "plain attribute access on the connection (`conn.execute`)", "c.execute",
                      "c = conn", {"conn": conn}, threaded=False, info=True),
            Contender("select1", "`SELECT 1` round trip (scale reference)", "ex('SELECT 1').fetchone()",
                      "ex = conn.execute", {"conn": conn}, threaded=False, info=True),
        ]


def _psycopg_pool_flask(pool: t.Any) -> dict[str, t.Any]:
    """What a Flask app does with psycopg_pool (as in bench/apps.py): the like-for-like full path."""
    from flask import Flask

    from .apps import in_g

    app = Flask("bench_psycopg_pool_flask")
    return {"app": app, "conn": in_g(app, pool.getconn, pool.putconn)}


def _fill(get: t.Callable[[], t.Any], put: t.Callable[[t.Any], object], n: int) -> None:
    """Create every connection before timing: take ``n`` (the pool's size) at once, give them back."""
    got = [get() for _ in range(n)]
    for c in got:
        put(c)


def _missing(keys: list[str], label: str, dist: str) -> list[Contender]:
    why = f"not installed (`pip install {dist}`)"
    return [Contender(k, f"{label}", "pass", skip=why) for k in keys]


# -- one thread -------------------------------------------------------------


def _timer(c: Contender) -> timeit.Timer:
    return timeit.Timer(c.stmt, c.setup, globals=c.ns)


def _calibrate(timer: timeit.Timer, target: float) -> int:
    n = 1
    while True:
        took = timer.timeit(n)
        if took >= target / 10 or n >= 10_000_000:
            break
        n *= 10
    return max(int(n * (target / max(took, 1e-9))), 1)


def single(contenders: list[Contender], repeats: int, target: float) -> dict[str, dict[str, t.Any]]:
    """µs per op for each contender, repeats alternating between contenders."""
    runnable = [c for c in contenders if c.skip is None]
    timers: dict[str, timeit.Timer] = {}
    numbers: dict[str, int] = {}
    samples: dict[str, list[float]] = {c.key: [] for c in runnable}
    for c in runnable:
        if c.enter:
            c.enter()
        try:
            timers[c.key] = _timer(c)
            numbers[c.key] = _calibrate(timers[c.key], target)
        finally:
            if c.leave:
                c.leave()
    gc_was = gc.isenabled()
    for r in range(repeats):
        order = runnable[r % len(runnable):] + runnable[: r % len(runnable)]
        for c in order:
            if c.enter:
                c.enter()
            gc.disable()
            try:
                took = timers[c.key].timeit(numbers[c.key])
            finally:
                if gc_was:
                    gc.enable()
                if c.leave:
                    c.leave()
            samples[c.key].append(took / numbers[c.key] * 1e6)
    out: dict[str, dict[str, t.Any]] = {}
    for c in contenders:
        row: dict[str, t.Any] = {"label": c.label, "info": c.info}
        if c.skip is not None:
            row["skip"] = c.skip
        else:
            s = samples[c.key]
            row.update(best_us=min(s), median_us=median(s), number=numbers[c.key], samples_us=s)
        out[c.key] = row
    return out


# -- eight threads on four ----------------------------------------------------

_LOOP = """
def loop(stop, counts, i, barrier):
    {setup}
    n = 0
    barrier.wait()
    while not stop[0]:
        for _ in range(32):
            {stmt}
        n += 32
    counts[i] = n
"""


def threaded_once(c: Contender, duration: float, threads: int = THREADS) -> dict[str, t.Any]:
    """``threads`` threads take and return as fast as they can for ``duration`` s: ops/s and fairness."""
    ns = dict(c.ns)
    stmt = c.stmt.replace("\n", "\n" + " " * 12)
    exec(_LOOP.format(setup=c.setup, stmt=stmt), ns)  # noqa: S102 - our own statements
    loop = ns["loop"]
    stop = [False]
    counts = [0] * threads
    barrier = threading.Barrier(threads + 1)
    workers = [threading.Thread(target=loop, args=(stop, counts, i, barrier), daemon=True) for i in range(threads)]
    for th in workers:
        th.start()
    barrier.wait()
    start, cpu = time.perf_counter(), time.process_time()
    time.sleep(duration)
    stop[0] = True
    for th in workers:
        th.join(30)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    if any(th.is_alive() for th in workers):
        raise RuntimeError(f"{c.key}: threads did not stop (deadlock?)")
    total = sum(counts)
    return {
        "ops_s": total / elapsed,
        "fairness": (min(counts) / max(counts)) if max(counts) else 0.0,
        "per_thread": counts,
        # the whole process's CPU (user + system, every thread) per operation; a few loops run past the end
        "cpu_us_per_op": cpu / total * 1e6 if total else float("nan"),
    }


def threaded(
    contenders: list[Contender], rounds: int, duration: float, quiet: Quiet
) -> dict[str, dict[str, t.Any]]:
    runnable = [c for c in contenders if c.threaded and c.skip is None]
    results: dict[str, list[dict[str, t.Any]]] = {c.key: [] for c in runnable}
    for r in range(rounds):
        order = runnable[r % len(runnable):] + runnable[: r % len(runnable)]
        for c in order:
            results[c.key].append(quiet.run(f"micro threads {c.key}", lambda c=c: threaded_once(c, duration)))
    out: dict[str, dict[str, t.Any]] = {}
    for c in contenders:
        if not c.threaded:
            continue
        row: dict[str, t.Any] = {"label": c.label}
        if c.skip is not None:
            row["skip"] = c.skip
        else:
            rs = results[c.key]
            row.update(
                ops_s=median([x["ops_s"] for x in rs]),
                fairness=median([x["fairness"] for x in rs]),
                foreign_cores=median([x["foreign_cores"] for x in rs]),
                rounds=rs,
            )
        out[c.key] = row
    return out


def run(db: Database, smoke: bool, quiet: Quiet) -> dict[str, t.Any]:
    setup = Setup(db.dsn("bench_micro"))
    try:
        contenders = setup.contenders()
        repeats, target = (2, 0.01) if smoke else (5, 0.2)
        rounds, duration = (1, 0.15) if smoke else (3, 2.0)
        log(f"micro: one thread, {len([c for c in contenders if not c.skip])} contenders x {repeats} repeats")
        with LoadMeter(db) as load:
            one = single(contenders, repeats, target)
        log(f"micro: {THREADS} threads on {POOL_SIZE}, {rounds} round(s) of {duration:g} s")
        many = threaded(contenders, rounds, duration, quiet)
    finally:
        setup.close()
    return {
        "pool_size": POOL_SIZE,
        "threads": THREADS,
        "single": one,
        "multi": many,
        "method": {"repeats": repeats, "seconds_per_repeat": target, "rounds": rounds, "duration_s": duration},
        "single_foreign_cores": load.foreign_cores,
    }
