"""Sizing rules (flask_proxypool.sizing) on hand-made PoolStats, gunicorn settings through gunicorn's classes,
the server-limits query, and PgBouncer's two budgets with its admin console (a real PgBouncer)."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
import typing as t
from pathlib import Path

import pytest

from flask_proxypool.kinds.factory import FactoryKind
from flask_proxypool.pool import Pool
from flask_proxypool.sizing import (
    BouncerOptions,
    BouncerPool,
    BouncerSettings,
    Deployment,
    ServerLimits,
    advise,
    advise_pool,
    detect_deployment,
    query_bouncer,
    query_server_limits,
    render_text,
    server_key,
    stats_from_dict,
)
from flask_proxypool.stats import PoolStats
from pgbouncer import PgBouncer, running
from pgserver import PgServer, make_basedir

GTHREAD_2x4 = Deployment(workers=2, threads=4, worker_class="gthread", source="test")


def make_stats(**over: t.Any) -> PoolStats:
    """A pool's stats with quiet defaults: 4 of max 4, 1000 checkouts, no waits, 2 ms holds."""
    base: dict[str, t.Any] = dict(
        name="db",
        kind="psycopg",
        target="host=db.example port=5433 dbname=app user=app password=***",
        min_size=0,
        max_size=4,
        size=4,
        idle=4,
        in_use=0,
        waiting=0,
        created=4,
        closed=0,
        closed_by_reason={},
        checkouts=1000,
        timeouts=0,
        refused=0,
        errors=0,
        connect_failures=0,
        wait_count=0,
        wait_time_total=0.0,
        wait_time_max=0.0,
        hold_time_total=2.0,
        hold_time_max=0.01,
        long_held=0,
        hold_time_p50=0.002,
        hold_time_p95=0.004,
        hold_time_p99=0.008,
        config={"conninfo": "host=db.example port=5433 dbname=app user=app password=***"},
    )
    base.update(over)
    return PoolStats(**base)


def test_quiet_pool_at_full_use_is_ok() -> None:
    """A pool that reached max_size with no waits is left alone."""
    a = advise_pool(make_stats(), GTHREAD_2x4)
    assert (a.verdict, a.suggested_max_size) == ("ok", 4)
    assert a.hold_mean == pytest.approx(0.002)
    assert "no checkout waited" in a.reasons[0]


def test_timeouts_and_refusals_say_too_small() -> None:
    """Timeouts or max_waiting refusals make a pool below the thread count too small: grow to threads."""
    a = advise_pool(make_stats(max_size=2, size=2, timeouts=3, refused=5, wait_count=40), GTHREAD_2x4)
    assert a.verdict == "too small"
    assert a.suggested_max_size == 4  # never more than a worker's threads
    text = " ".join(a.reasons)
    assert "3 checkout(s) timed out" in text and "5 checkout(s) were refused" in text


def test_frequent_waits_say_too_small() -> None:
    """More than 5% of checkouts waiting is too small; fewer, short waits are fine."""
    many = advise_pool(make_stats(max_size=2, size=2, wait_count=100, wait_time_p95=0.003), GTHREAD_2x4)
    assert (many.verdict, many.suggested_max_size) == ("too small", 4)
    assert "10.0% of checkouts had to wait" in many.reasons[0]
    few = advise_pool(make_stats(wait_count=10, wait_time_p95=0.003), GTHREAD_2x4)
    assert (few.verdict, few.suggested_max_size) == ("ok", 4)
    assert "rare and short" in few.reasons[0]


def test_rare_but_long_waits_say_too_small() -> None:
    """A 1% wait ratio with a 200 ms p95 is still too small."""
    a = advise_pool(make_stats(max_size=3, size=3, wait_count=10, wait_time_p95=0.2), GTHREAD_2x4)
    assert (a.verdict, a.suggested_max_size) == ("too small", 4)
    assert "waits are long" in a.reasons[0]


def test_waits_with_max_size_at_threads_point_outside_requests() -> None:
    """Waits although max_size >= threads: growing is not the fix; the advice says where to look."""
    a = advise_pool(make_stats(timeouts=2, wait_count=80), GTHREAD_2x4)
    assert (a.verdict, a.suggested_max_size) == ("too small", 4)
    assert "held outside requests" in a.reasons[-1]


def test_max_size_above_threads_is_too_large() -> None:
    """A pool larger than the worker's threads can never be used fully by requests."""
    a = advise_pool(make_stats(max_size=10, size=4), GTHREAD_2x4)
    assert (a.verdict, a.suggested_max_size) == ("too large", 4)
    assert "above the 4 threads per worker" in a.reasons[0]


def test_max_size_above_threads_kept_when_held_outside_requests() -> None:
    """Extra resources used by code outside requests (seen in top holders) are not called waste."""
    holders = [{"holder": "(outside a request)", "max": 2.0, "count": 3, "mean": 1.0}]
    a = advise_pool(make_stats(max_size=6, size=6, top_holders=holders), GTHREAD_2x4)
    assert (a.verdict, a.suggested_max_size) == ("ok", 6)
    assert "outside requests" in a.reasons[0]


def test_pool_that_never_grew_is_too_large() -> None:
    """Under real load a pool that stayed at 2 of 4 (it grows only when all are busy) needs 2."""
    a = advise_pool(make_stats(size=2, idle=2, closed_by_reason={"max_idle": 3}), GTHREAD_2x4)
    assert (a.verdict, a.suggested_max_size) == ("too large", 2)
    assert "never grew beyond 2 of 4" in a.reasons[0]
    assert "3 resource(s) were closed after max_idle" in a.reasons[-1]
    # min_size is a floor for the suggestion
    b = advise_pool(make_stats(size=1, min_size=2, max_size=4), GTHREAD_2x4)
    assert b.suggested_max_size == 2


def test_too_little_traffic_is_not_evidence() -> None:
    """A pool with a handful of checkouts is not called too large; with none, there is no data."""
    few = advise_pool(make_stats(size=1, checkouts=10), GTHREAD_2x4)
    assert (few.verdict, few.suggested_max_size) == ("ok", 4)
    assert "only 10 checkout(s)" in few.reasons[0]
    none = advise_pool(make_stats(size=0, checkouts=0, hold_time_total=0.0), GTHREAD_2x4)
    assert (none.verdict, none.suggested_max_size) == ("no data", 4)


def test_littles_law_with_a_rate() -> None:
    """With the rate, mean busy = rate / workers x mean hold, plus square-root headroom."""
    # 400/s over 2 workers, 2 ms mean hold: 0.4 busy per worker -> ceil(0.4 + 2*sqrt(0.4)) = 2
    low = advise_pool(make_stats(checkouts=50, hold_time_total=0.1), GTHREAD_2x4, rate=400)
    assert low.busy_mean == pytest.approx(0.4)
    assert (low.verdict, low.suggested_max_size) == ("too large", 2)
    assert "utilisation 10% of 4); 2 cover the bursts" in low.reasons[0]
    # the same rate, but 1000 checkouts saw all 4 in use at once: observed peaks are a floor
    peaked = advise_pool(make_stats(), GTHREAD_2x4, rate=400)
    assert (peaked.verdict, peaked.suggested_max_size) == ("ok", 4)
    assert "idle most of the time, yet the peaks used all 4" in peaked.reasons[-1]
    # it never grew beyond 3: 3, not the 2 of the formula
    grew3 = advise_pool(make_stats(size=3), GTHREAD_2x4, rate=400)
    assert (grew3.verdict, grew3.suggested_max_size) == ("too large", 3)
    # 3000/s, 2 ms: 3 busy -> ceil(3 + 2*sqrt(3)) = 7 > 4, but a worker has 4 threads
    high = advise_pool(make_stats(max_size=2, size=2), GTHREAD_2x4, rate=3000)
    assert (high.verdict, high.suggested_max_size) == ("too small", 4)


def test_rates_per_pool() -> None:
    """One rate for every pool, or one per pool: a pool without a rate is judged without Little's law."""
    stats = {"db": make_stats(), "svc": make_stats(name="svc", kind="factory", config={})}
    every = advise(stats, GTHREAD_2x4, rate=400)
    assert [p.busy_mean for p in every.pools] == [pytest.approx(0.4), pytest.approx(0.4)]
    some = advise(stats, GTHREAD_2x4, rate={"svc": 4000, "nope": 1})
    assert some.rates == {"svc": 4000.0}
    assert [p.rate for p in some.pools] == [None, 4000.0]
    assert "checkout rates across all workers: svc 4000/s" in render_text(some)


def test_async_workers_size_by_rate_not_threads() -> None:
    """gevent workers: concurrency is worker_connections, so max_size above threads is not waste."""
    gevent = Deployment(workers=1, threads=1, worker_class="gevent", worker_connections=100, source="test")
    a = advise_pool(make_stats(max_size=8, size=8), gevent)
    assert a.verdict == "ok"
    b = advise_pool(make_stats(max_size=8, size=8, timeouts=4, wait_count=100), gevent)
    assert (b.verdict, b.suggested_max_size) == ("too small", 16)
    c = advise_pool(make_stats(max_size=8, size=8, timeouts=4, wait_count=100), gevent, rate=10000)
    assert c.suggested_max_size == 29  # 20 busy -> ceil(20 + 2*sqrt(20)) = ceil(28.9)


def test_server_totals_against_max_connections() -> None:
    """workers x max_size over every pool on a server, compared with what the server accepts."""
    stats = {
        "db": make_stats(),
        "reports": make_stats(name="reports", max_size=2, size=2),
        "ldap": make_stats(name="ldap", kind="factory", target="factory:connect", config={}),
    }
    key = server_key(stats["db"])
    assert key == "db.example:5433" and server_key(stats["ldap"]) is None
    ok = advise(stats, GTHREAD_2x4, limits={key: ServerLimits(max_connections=100, reserved=3)})
    (srv,) = ok.servers
    assert (srv.pools, srv.connections, srv.available, srv.verdict) == (("db", "reports"), 12, 97, "ok")
    over = advise(stats, Deployment(workers=8, threads=4), limits={key: ServerLimits(max_connections=40)})
    assert (over.servers[0].connections, over.servers[0].verdict) == (48, "over")
    assert "PgBouncer" in over.servers[0].reasons[1]
    tight = advise(stats, Deployment(workers=3, threads=4), limits={key: ServerLimits(max_connections=20)})
    assert (tight.servers[0].connections, tight.servers[0].verdict) == (18, "tight")
    unknown = advise(stats, GTHREAD_2x4, limits={key: ServerLimits(error="OperationalError: refused")})
    assert unknown.servers[0].verdict == "unknown" and "refused" in unknown.servers[0].reasons[1]


def test_advice_is_json_and_text() -> None:
    """to_dict() survives json.dumps (no NaN), and the text names each pool, verdict and change."""
    stats = {"db": make_stats(max_size=10, size=4), "cache": make_stats(name="cache", kind="sqlite3", config={})}
    adv = advise(stats, GTHREAD_2x4, limits={"db.example:5433": ServerLimits(max_connections=100)})
    data = json.loads(json.dumps(adv.to_dict(), allow_nan=False))
    assert data["pools"]["db"]["suggested_max_size"] == 4
    assert data["servers"][0]["connections"] == 20
    assert data["deployment"]["concurrency"] == 4
    text = render_text(adv)
    assert "pool 'db' (psycopg): TOO LARGE: max_size 10 -> 4" in text
    assert "pool 'cache' (sqlite3): OK: keep max_size 4" in text
    assert "server db.example:5433 (pools: db): OK" in text


def test_stats_from_dict_reads_cli_and_endpoint_json() -> None:
    """Stats JSON round-trips into PoolStats, bare or wrapped as the endpoint sends it."""
    d = make_stats(closed_by_reason={"broken": 1}).to_dict()
    assert stats_from_dict({"db": d})["db"] == make_stats(closed_by_reason={"broken": 1})
    assert stats_from_dict({"app": "x", "pid": 1, "pools": {"db": {**d, "future_field": 1}}})["db"].checkouts == 1000
    with pytest.raises(ValueError, match="not a stats mapping"):
        stats_from_dict({"db": {"nope": 1}})


def test_detect_deployment_sources(tmp_path: Path) -> None:
    """Later sources win: WEB_CONCURRENCY < gunicorn.conf.py < GUNICORN_CMD_ARGS < options; default 1 x 1."""
    d = detect_deployment(environ={}, cwd=tmp_path)
    assert (d.workers, d.threads, d.source) == (1, 1, "default")
    assert "assuming 1 worker x 1 thread" in d.notes[0]
    (tmp_path / "gunicorn.conf.py").write_text("workers = 3\nthreads = int('6')\nworker_class = 'gthread'\n")
    d = detect_deployment(environ={"WEB_CONCURRENCY": "9"}, cwd=tmp_path)
    assert (d.workers, d.threads, d.concurrency) == (3, 6, 6)
    assert d.source == f"WEB_CONCURRENCY, {tmp_path / 'gunicorn.conf.py'}"
    d = detect_deployment(environ={"GUNICORN_CMD_ARGS": "--threads=8 -w 5 --bind :80"}, cwd=tmp_path)
    assert (d.workers, d.threads) == (5, 8)
    d = detect_deployment(2, None, environ={"GUNICORN_CMD_ARGS": "-w5"}, cwd=tmp_path)
    assert (d.workers, d.threads) == (2, 6)
    other = tmp_path / "other.py"
    other.write_text("workers = 4\nworker_class = 'gevent'\nworker_connections = 50\n")
    d = detect_deployment(environ={"GUNICORN_CMD_ARGS": f"-c {other}"}, cwd=tmp_path)
    assert (d.workers, d.is_async, d.concurrency) == (4, True, 50)
    assert "size pools by the rate" in d.notes[-1]
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    d = detect_deployment(config_file="bad.py", environ={}, cwd=tmp_path)
    assert (d.workers, d.threads) == (1, 1) and "RuntimeError: boom" in d.notes[0]


def test_detect_deployment_reads_the_example_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The example's gunicorn.conf.py gives 2 workers x 4 gthread threads."""
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    for var in ("SHOP_WORKERS", "SHOP_THREADS", "SHOP_WORKER_CLASS", "WEB_CONCURRENCY"):
        monkeypatch.delenv(var, raising=False)
    examples = Path(__file__).resolve().parent.parent / "examples"
    d = detect_deployment(cwd=examples)
    assert (d.workers, d.threads, d.worker_class) == (2, 4, "gthread")


# -- gunicorn's settings, read through gunicorn's own classes ------------------------------


def test_config_file_is_run_and_set_as_gunicorn_does(tmp_path: Path) -> None:
    """gunicorn.conf.py runs as Python; known names go through Config.set, the rest is ignored; sync + threads is
    gthread, as gunicorn runs it; the module gunicorn registers is not left behind."""
    (tmp_path / "gunicorn.conf.py").write_text(
        "import os\nworkers = 2 * 2 + 1\nthreads = len('abc')\nworker_class = 'sync'\n"
        "bind = '127.0.0.1:0'\nmy_own_helper = 42\n"
    )
    d = detect_deployment(environ={}, cwd=tmp_path)
    assert (d.workers, d.threads, d.worker_class, d.concurrency) == (5, 3, "gthread", 3)
    assert d.source == str(tmp_path / "gunicorn.conf.py") and d.notes == ()
    assert "__config__" not in sys.modules


def test_config_file_with_a_value_gunicorn_refuses(tmp_path: Path) -> None:
    """A value gunicorn's validator refuses: the file is left out whole, and a note names it and the error."""
    (tmp_path / "gunicorn.conf.py").write_text("threads = 8\nworkers = 'many'\n")
    d = detect_deployment(environ={"WEB_CONCURRENCY": "3"}, cwd=tmp_path)
    assert (d.workers, d.threads) == (3, 1)  # WEB_CONCURRENCY still counts; nothing of the file does
    assert d.source == "WEB_CONCURRENCY"
    assert d.notes[0].startswith(f"could not read {tmp_path / 'gunicorn.conf.py'}: ValueError: ")
    assert "'many'" in d.notes[0]
    missing = detect_deployment(config_file="nope.py", environ={}, cwd=tmp_path)
    assert "could not read" in missing.notes[0] and "doesn't exist" in missing.notes[0]


def test_config_file_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``-c`` takes what gunicorn takes: a path, ``file:PATH``, ``python:MODULE``; the explicit one beats the
    ``-c`` of GUNICORN_CMD_ARGS, as gunicorn's command line beats its environment."""
    (tmp_path / "plain.conf").write_text("workers = 2\n")  # no .py: gunicorn still runs it
    (tmp_path / "envconf.py").write_text("workers = 9\n")
    (tmp_path / "sizing_conf_mod.py").write_text("workers = 4\nthreads = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = {"GUNICORN_CMD_ARGS": "-c envconf.py"}
    assert detect_deployment(environ=env, cwd=tmp_path).workers == 9
    d = detect_deployment(config_file="file:plain.conf", environ=env, cwd=tmp_path)
    assert (d.workers, d.source) == (2, str(tmp_path / "plain.conf"))
    d = detect_deployment(config_file="python:sizing_conf_mod", environ=env, cwd=tmp_path)
    assert (d.workers, d.threads, d.source) == (4, 2, "python:sizing_conf_mod")


def test_gunicorn_cmd_args_through_gunicorn_parser(tmp_path: Path) -> None:
    """GUNICORN_CMD_ARGS is parsed by Config.parser(): every spelling gunicorn accepts; it beats the file."""
    (tmp_path / "gunicorn.conf.py").write_text("workers = 2\nthreads = 2\n")
    for args in ("--workers=3 --threads 6", "-w3 --threads=6 --bind :80 app:app", "-w 3 --threads 6 --preload"):
        d = detect_deployment(environ={"GUNICORN_CMD_ARGS": args}, cwd=tmp_path)
        assert (d.workers, d.threads, d.worker_class) == (3, 6, "gthread"), args
        assert d.source == f"{tmp_path / 'gunicorn.conf.py'}, GUNICORN_CMD_ARGS"
    d = detect_deployment(environ={"GUNICORN_CMD_ARGS": "-k gevent --worker-connections 20"}, cwd=tmp_path)
    assert (d.worker_class, d.is_async, d.concurrency) == ("gevent", True, 20)
    # options that do not size anything do not make GUNICORN_CMD_ARGS a source
    d = detect_deployment(environ={"GUNICORN_CMD_ARGS": "--bind :80 --timeout 5"}, cwd=tmp_path)
    assert d.source == str(tmp_path / "gunicorn.conf.py")


def test_gunicorn_cmd_args_gunicorn_would_refuse(tmp_path: Path) -> None:
    """A command line gunicorn would refuse is not read, whole, and the note says what gunicorn says."""
    cases = {
        "--workers many": "argument -w/--workers: invalid int value: 'many'",
        "-w 4 --no-such-option": "unrecognized arguments: --no-such-option",
        "-w 4 --threads -1": "Value must be positive: -1",  # the parser takes it; Config.set refuses it
    }
    for args, said in cases.items():
        d = detect_deployment(environ={"GUNICORN_CMD_ARGS": args}, cwd=tmp_path)
        assert (d.workers, d.threads, d.source) == (1, 1, "default"), args
        assert d.notes[0].startswith("GUNICORN_CMD_ARGS not read, gunicorn would refuse it too: ValueError: ")
        assert said in d.notes[0], d.notes[0]


def test_command_line_options_win(tmp_path: Path) -> None:
    """--workers/--threads are gunicorn's command line: set last, through Config.set, over file and environment."""
    (tmp_path / "gunicorn.conf.py").write_text("workers = 2\nthreads = 2\nworker_class = 'sync'\n")
    env = {"WEB_CONCURRENCY": "7", "GUNICORN_CMD_ARGS": "-w 5 --threads 3"}
    d = detect_deployment(6, 1, environ=env, cwd=tmp_path)
    assert (d.workers, d.threads, d.worker_class) == (6, 1, "sync")  # one thread: sync stays sync
    assert d.source == f"WEB_CONCURRENCY, {tmp_path / 'gunicorn.conf.py'}, GUNICORN_CMD_ARGS, options"
    d = detect_deployment(None, 4, environ=env, cwd=tmp_path)
    assert (d.workers, d.threads, d.worker_class) == (5, 4, "gthread")


def test_same_numbers_as_gunicorn_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """File, GUNICORN_CMD_ARGS and command line together give what gunicorn's own WSGIApplication reads."""
    from gunicorn.app.wsgiapp import WSGIApplication  # type: ignore[import-untyped,unused-ignore]

    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("workers = 2\nthreads = 4\nworker_class = 'sync'\nworker_connections = 7\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--threads 6 --worker-connections 50")
    monkeypatch.setattr(sys, "argv", ["gunicorn", "-c", str(conf), "-w", "5", "app:app"])
    monkeypatch.setattr(sys, "path", list(sys.path))  # gunicorn adds its chdir to sys.path
    monkeypatch.setitem(sys.modules, "__config__", None)  # and leaves the config module there
    monkeypatch.chdir(tmp_path)  # and changes directory
    cfg = WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").cfg
    d = detect_deployment(5, None, config_file=conf, environ={"GUNICORN_CMD_ARGS": os.environ["GUNICORN_CMD_ARGS"]})
    gunicorn_says = (cfg.workers, cfg.threads, cfg.worker_class_str, cfg.worker_connections)
    assert (d.workers, d.threads, d.worker_class, d.worker_connections) == gunicorn_says == (5, 6, "gthread", 50)


def test_without_gunicorn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn not importable: WEB_CONCURRENCY and the options still count, and a note says what was not read."""
    for name in ("gunicorn", "gunicorn.app", "gunicorn.app.base", "gunicorn.config"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError, as if not installed
    (tmp_path / "gunicorn.conf.py").write_text("workers = 5\n")
    env = {"WEB_CONCURRENCY": "3", "GUNICORN_CMD_ARGS": "-w 9"}
    d = detect_deployment(None, 4, environ=env, cwd=tmp_path)
    assert (d.workers, d.threads, d.worker_class, d.source) == (3, 4, "gthread", "WEB_CONCURRENCY, options")
    assert d.notes[0] == (
        f"gunicorn is not installed here, so its settings were not read (GUNICORN_CMD_ARGS, "
        f"{tmp_path / 'gunicorn.conf.py'}): only WEB_CONCURRENCY and --workers/--threads count"
    )
    bare = detect_deployment(environ={}, cwd=tmp_path / "nothing-here")
    assert (bare.workers, bare.threads, bare.source) == (1, 1, "default")
    assert bare.notes[0].endswith("not read: only WEB_CONCURRENCY and --workers/--threads count")
    assert "assuming 1 worker x 1 thread" in bare.notes[1]


def test_web_concurrency_that_is_not_a_number() -> None:
    """gunicorn would fail on it at import; here it is left out, with a note."""
    d = detect_deployment(environ={"WEB_CONCURRENCY": "lots"}, cwd=Path(__file__).parent)
    assert d.workers == 1 and "WEB_CONCURRENCY='lots' is not a positive number of workers: ignored" in d.notes


# -- a server's limits, asked with a deadline ----------------------------------------------


class FakeServer:
    """A connection-like resource whose query answers, fails or hangs until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.mode = "answer"

    def execute(self, query: str) -> FakeServer:
        assert "max_connections" in query
        if self.mode == "hang":
            self.release.wait(30)
        if self.mode == "fail":
            raise RuntimeError("server said no, password=hunter2")
        return self

    def fetchone(self) -> tuple[int, int, int]:
        return (100, 3, 2)


def test_query_server_limits_answers_fails_or_times_out() -> None:
    """The answer, a failure (masked) or no answer within the timeout; a hung query's connection comes back."""
    server = FakeServer()
    pool: Pool[FakeServer] = Pool(FactoryKind(lambda: server), name="fake-pg", max_size=1, timeout=5.0)
    try:
        assert query_server_limits(pool, timeout=5.0) == ServerLimits(max_connections=100, reserved=5)
        server.mode = "fail"
        failed = query_server_limits(pool, timeout=5.0)
        assert failed.error is not None and failed.error.startswith("RuntimeError: server said no")
        assert "hunter2" not in failed.error
        server.mode = "hang"
        start = time.monotonic()
        hung = query_server_limits(pool, timeout=0.3)
        assert hung == ServerLimits(error="no answer within 0.3 sec") and time.monotonic() - start < 3
        server.release.set()
        assert pool.getconn(timeout=5.0) is server  # given back once the query ended: no slot lost
        pool.putconn(server)
    finally:
        server.release.set()
        pool.close(timeout=1.0)


def test_query_server_limits_asks_on_the_calling_threads_own_connection() -> None:
    """A request thread that asks gets its own connection back, not the one another thread gave back last:
    the check runs in the thread of the first request (deployment_checks), and no connection changes thread."""
    made: dict[int, FakeServer] = {}

    def make() -> FakeServer:
        made[threading.get_ident()] = server = FakeServer()
        return server

    pool: Pool[FakeServer] = Pool(FactoryKind(make), name="fake-pg", max_size=2, timeout=5.0)
    asked: list[FakeServer] = []
    a_done, b_returned = threading.Event(), threading.Event()

    def thread_a() -> None:  # makes its own, gives it back first
        pool.putconn(pool.getconn(holder="view"))
        a_done.set()
        assert b_returned.wait(5)
        real = FakeServer.execute

        def execute(self: FakeServer, query: str) -> FakeServer:
            asked.append(self)
            return real(self, query)

        FakeServer.execute = execute  # type: ignore[method-assign]
        try:
            assert query_server_limits(pool, timeout=5.0) == ServerLimits(max_connections=100, reserved=5)
        finally:
            FakeServer.execute = real  # type: ignore[method-assign]

    def thread_b() -> None:  # makes its own once A gave its back, and gives it back last
        assert a_done.wait(5)
        pool.putconn(pool.getconn(holder="view"))
        b_returned.set()

    try:
        threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        assert len(made) == 2 and asked == [made[t.cast(int, threads[0].ident)]], (made, asked)
        assert pool.stats().in_use == 0
    finally:
        pool.close(timeout=1.0)


# -- pools behind PgBouncer: two budgets ---------------------------------------------------

BOUNCED = "host=pgb.example port=6432 dbname=app user=app password=***"


def bounced(**over: t.Any) -> PoolStats:
    """A pool with `pgbouncer: "transaction"` whose conninfo points at PgBouncer."""
    return make_stats(**{"target": BOUNCED, "config": {"conninfo": BOUNCED, "pgbouncer": "transaction"}, **over})


def test_pool_behind_pgbouncer_gets_two_budgets_not_max_connections() -> None:
    """hosts x workers x max_size against max_client_conn; PgBouncer's pools against max_connections."""
    stats = {"db": bounced(), "jobs": bounced(name="jobs", max_size=2, size=2)}
    settings = BouncerSettings(
        version="PgBouncer 1.18.0",
        max_client_conn=100,
        default_pool_size=10,
        reserve_pool_size=2,
        pool_mode="transaction",
        pools=(BouncerPool("app", "app", 10, 2), BouncerPool("app", "reports", 5, 2)),
    )
    adv = advise(
        stats,
        GTHREAD_2x4,
        hosts=5,
        limits={"pgb.example:6432": ServerLimits(max_connections=25, reserved=3)},
        bouncers={"pgb.example:6432": settings},
    )
    assert adv.servers == ()  # no server budget against PgBouncer's address
    (b,) = adv.bouncers
    assert (b.pools, b.hosts, b.clients, b.max_client_conn, b.client_verdict) == (("db", "jobs"), 5, 60, 100, "ok")
    assert b.client_reasons[0] == "5 host(s) x 2 worker(s) x (db 4 + jobs 2) = 60 client connections"
    assert (b.servers, b.available, b.server_verdict) == (19, 22, "tight")  # 10+2 + 5+2 of 25-3
    assert "app/app 10+2, app/reports 5+2 = 19 server connections" in b.server_reasons[0]
    assert b.assumed == ()  # every number read or given
    assert "60 clients share 10 server connection(s) for app/app" in " ".join(b.server_reasons)
    text = render_text(adv)
    assert "pgbouncer pgb.example:6432 (pools: db, jobs): clients OK, servers TIGHT (PgBouncer 1.18.0" in text
    assert "put PgBouncer in front" not in text and "server pgb.example" not in text
    data = json.loads(json.dumps(adv.to_dict(), allow_nan=False))
    assert data["pgbouncers"][0]["clients"] == 60 and data["servers"] == []


def test_pgbouncer_budgets_over_on_either_side() -> None:
    """Too many clients for max_client_conn, or too many server connections for PostgreSQL, each said apart."""
    stats = {"db": bounced()}
    settings = BouncerSettings(
        max_client_conn=50, default_pool_size=20, reserve_pool_size=0, pools=(BouncerPool("app", "app", 20),)
    )
    key = "pgb.example:6432"
    many_hosts = advise(
        stats, GTHREAD_2x4, hosts=10, bouncers={key: settings}, limits={key: ServerLimits(max_connections=100)}
    )
    (b,) = many_hosts.bouncers
    assert (b.clients, b.client_verdict, b.server_verdict) == (80, "over", "ok")
    assert "raise max_client_conn to at least 80" in b.client_reasons[1]
    small_server = advise(
        stats,
        GTHREAD_2x4,
        hosts=1,
        bouncers={key: settings},
        limits={key: ServerLimits(max_connections=15, reserved=3)},
    )
    (b,) = small_server.bouncers
    assert (b.client_verdict, b.servers, b.server_verdict) == ("ok", 20, "over")
    assert "more than the 12 PostgreSQL accepts" in b.server_reasons[1]
    assert "lower default_pool_size" in b.server_reasons[1]
    capped = dataclasses.replace(settings, database_caps={"app": 10})
    (b,) = advise(
        stats, GTHREAD_2x4, hosts=1, bouncers={key: capped}, limits={key: ServerLimits(max_connections=15, reserved=3)}
    ).bouncers
    assert (b.servers, b.server_verdict) == (10, "tight")
    assert "capped by max_db_connections: app 10" in b.server_reasons


def test_pgbouncer_numbers_not_read_are_given_or_assumed() -> None:
    """Without the admin console: options win, PgBouncer's defaults fill the rest, and each is named as assumed."""
    stats = {"db": bounced()}
    key = "pgb.example:6432"
    refused = BouncerSettings(error="admin console: OperationalError: FATAL:  not allowed")
    (b,) = advise(stats, GTHREAD_2x4, bouncers={key: refused}).bouncers
    assert (b.hosts, b.clients, b.max_client_conn, b.servers, b.server_verdict) == (1, 8, 100, 20, "unknown")
    assert b.settings_from == "options and defaults (admin console: OperationalError: FATAL:  not allowed)"
    assert [a.split(" (")[0] for a in b.assumed] == [
        "1 host",
        "max_client_conn 100",
        "default_pool_size 20",
        "reserve_pool_size 0",
        "1 database/user pair(s): this app's only",
    ]
    given = BouncerOptions(max_client_conn=400, pool_size=8, pools=3)
    (b,) = advise(
        stats,
        GTHREAD_2x4,
        hosts=30,
        bouncers={key: refused},
        bouncer_options=given,
        limits={key: ServerLimits(max_connections=50, given=True)},
    ).bouncers
    assert (b.clients, b.max_client_conn, b.client_verdict) == (240, 400, "ok")
    assert (b.servers, b.available, b.server_verdict) == (24, 50, "ok")  # 3 pairs x 8
    assert "max_connections 50 - 0 reserved, given" in b.server_reasons[1]
    assert [a.split(" (")[0] for a in b.assumed] == ["reserve_pool_size 0"]
    assert "assumed: reserve_pool_size 0 (PgBouncer's default)" in render_text(
        advise(stats, GTHREAD_2x4, hosts=30, bouncers={key: refused}, bouncer_options=given)
    )


def test_direct_pools_count_hosts() -> None:
    """--hosts multiplies a direct server's connections too, and replaces the note that says to add other hosts."""
    key = server_key(make_stats())
    assert key is not None
    adv = advise({"db": make_stats()}, GTHREAD_2x4, hosts=3, limits={key: ServerLimits(max_connections=100)})
    (srv,) = adv.servers
    assert (srv.connections, srv.verdict) == (24, "ok")
    assert srv.reasons[0] == "3 host(s) x 2 worker(s) x (db 4) = 24 connections"
    assert not any("other hosts" in n for n in adv.notes)


def test_query_bouncer_reads_the_admin_console(pg: PgServer, pgb: PgBouncer) -> None:
    """As an admin_users login: version, max_client_conn, default_pool_size and the app's pool from the console."""
    config = {row["key"]: row["value"] for row in pgb.admin("SHOW CONFIG")}
    got = query_bouncer(pgb.conninfo("app"), [("app", pg.user)], timeout=10.0)
    assert got.error is None
    assert got.version == pgb.admin("SHOW VERSION")[0]["version"]
    assert (got.max_client_conn, got.default_pool_size) == (int(config["max_client_conn"]), 4)
    assert (got.pool_mode, got.reserve_pool_size) == ("transaction", 0)
    assert BouncerPool("app", pg.user, 4) in got.pools
    assert all(p.database != "pgbouncer" for p in got.pools)


def test_query_bouncer_not_allowed_then_stats_user(pg: PgServer) -> None:
    """A login outside admin_users/stats_users gets an error naming the refusal; once in stats_users, the numbers."""
    user = "pp_sizing_reader"
    pg.psql(f"DROP ROLE IF EXISTS {user}; CREATE ROLE {user} LOGIN")
    with running(make_basedir("pp-pgb-"), pg, max_client_conn=37, default_pool_size=3, reserve_pool_size=1) as bouncer:
        bouncer.add_user(user)
        conninfo = bouncer.conninfo("app", user=user, password="hunter2")
        refused = query_bouncer(conninfo, [("app", user)], timeout=10.0)
        assert refused.error is not None and "not allowed" in refused.error
        assert "hunter2" not in refused.error and refused.max_client_conn is None
        bouncer.reload(stats_users=user)
        got = query_bouncer(conninfo, [("app", user)], timeout=10.0)
        assert got.error is None
        assert (got.max_client_conn, got.default_pool_size, got.reserve_pool_size) == (37, 3, 1)
        assert got.pools == (BouncerPool("app", user, 3, 1),)  # not used yet: the app's own pair, sized by default
        nothing = query_bouncer("host=127.0.0.1 port=1 user=x", [], timeout=2.0)
        assert nothing.error is not None and nothing.error.startswith("admin console: ")
