"""Prometheus metrics (flask_proxypool.metrics): scraped and parsed, in one process and under gunicorn."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
import typing as t
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from e2e import free_port, send
from flask_proxypool import db, metrics

TESTS = Path(__file__).resolve().parent
GUNICORN = Path(sys.executable).parent / "gunicorn"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _app(make_app: t.Callable[..., Flask], conninfo: str) -> Flask:
    app = make_app(
        {
            "db": {"conninfo": f"{conninfo} password=s3cr3t", "max_size": 3, "max_use": 4},
            "cache": {"kind": "sqlite3", "database": "cache.sqlite3"},
        }
    )

    @app.get("/one")
    def one() -> dict[str, int]:
        return {"n": db.execute("SELECT 1").fetchone()[0]}

    return app


def test_scrape_after_requests(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """Gauges, counters (closed by reason) and quantile gauges carry app and pool labels and the right values."""
    app = _app(make_app, conninfo)
    registry = CollectorRegistry()
    metrics.register(app, registry)
    client = app.test_client()
    for _ in range(10):
        assert client.get("/one").status_code == 200
    text = generate_latest(registry).decode()
    assert "s3cr3t" not in text
    s = parse(text)
    db_ = {"app": app.name, "pool": "db"}
    assert value(s, "proxypool_checkouts_total", **db_) == 10
    assert value(s, "proxypool_created_total", **db_) == 3  # max_use 4: one new connection per 4 checkouts
    assert value(s, "proxypool_closed_total", reason="max_use", **db_) == 2
    assert value(s, "proxypool_size", **db_) == 1
    assert value(s, "proxypool_in_use", **db_) == value(s, "proxypool_waiting", **db_) == 0
    assert value(s, "proxypool_max_size", **db_) == 3
    assert value(s, "proxypool_timeouts_total", **db_) == value(s, "proxypool_refused_total", **db_) == 0
    assert value(s, "proxypool_hold_seconds_total", **db_) > 0
    p50 = value(s, "proxypool_hold_quantile_seconds", quantile="0.5", **db_)
    p99 = value(s, "proxypool_hold_quantile_seconds", quantile="0.99", **db_)
    assert 0 < p50 <= p99
    assert value(s, "proxypool_wait_quantile_seconds", quantile="0.95", **db_) == 0
    cache = {"app": app.name, "pool": "cache"}
    assert value(s, "proxypool_checkouts_total", **cache) == 0  # configured, never used: still exported
    # counters keep counting between scrapes
    assert client.get("/one").status_code == 200
    assert value(parse(generate_latest(registry).decode()), "proxypool_checkouts_total", **db_) == 11


def test_registered_once_per_process(make_app: t.Callable[..., Flask]) -> None:
    """register() twice, or for a second app, adds no second collector; each app gets its own label."""
    a = make_app({"db": {"kind": "sqlite3"}})
    b = make_app({"db": {"kind": "sqlite3"}})
    registry = CollectorRegistry()
    metrics.register(a, registry)
    metrics.register(a, registry)  # prometheus_client would raise on a duplicate collector
    metrics.register(b, registry)
    s = parse(generate_latest(registry).decode())
    assert value(s, "proxypool_max_size", app=a.name, pool="db") == 4
    assert value(s, "proxypool_max_size", app=b.name, pool="db") == 4
    metrics.register(a)  # the default registry, twice
    metrics.register(a)
    assert sum(c is metrics._collector for c in REGISTRY._collector_to_names) == 1


def test_served_from_the_app(make_app: t.Callable[..., Flask], conninfo: str) -> None:
    """path= serves the registry's text format from the app."""
    app = _app(make_app, conninfo)
    registry = CollectorRegistry()
    metrics.register(app, registry, path="/metrics")
    client = app.test_client()
    client.get("/one")
    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.content_type.startswith("text/plain")
    s = parse(resp.get_data(as_text=True))
    assert value(s, "proxypool_checkouts_total", app=app.name, pool="db") == 1


def test_env_set_too_late_is_refused(make_app: t.Callable[..., Flask], monkeypatch: pytest.MonkeyPatch) -> None:
    """PROMETHEUS_MULTIPROC_DIR set after prometheus_client was imported cannot work: register() says so."""
    app = make_app({"db": {"kind": "sqlite3"}})
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/nonexistent")
    with pytest.raises(Exception, match="PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported"):
        metrics.register(app, CollectorRegistry())


# -- gunicorn, multiprocess mode --------------------------------------------------


class Server:
    def __init__(self, port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.port, self.proc, self.log = port, proc, log

    def get(self, path: str) -> tuple[int, t.Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            status, _, data = send(conn, "GET", path)
        finally:
            conn.close()
        return status, data

    def scrape(self) -> Samples:
        status, text = self.get("/metrics")
        assert status == 200, text
        return parse(text)


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[t.Callable[[bool], Server]]:
    """Start metrics_app under gunicorn (2 workers x 2 threads) with PROMETHEUS_MULTIPROC_DIR."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(preload: bool) -> Server:
        mpdir = tmp_path / "prom"
        mpdir.mkdir()
        conf = tmp_path / "gunicorn.conf.py"
        conf.write_text(
            "from flask_proxypool.gunicorn import when_ready, worker_exit  # noqa: F401\n"
            "from flask_proxypool.metrics import child_exit  # noqa: F401\n"
        )
        port = free_port()
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(mpdir),
            "METRICS_APP_DB": str(tmp_path / "app.sqlite3"),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        args = [str(GUNICORN), "-c", str(conf), "-k", "gthread", "--workers", "2", "--threads", "2"]
        args += ["--bind", f"127.0.0.1:{port}", *(["--preload"] if preload else []), "metrics_app:create_app()"]
        log = tmp_path / "gunicorn.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        server = Server(port, proc, log)
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if server.get("/metrics")[0] == 200:
                    return server
            except OSError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.05)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _until(check: t.Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``check`` until true (the workers publish every 0.1 s); fail naming ``what``."""
    if not wait_until(check, timeout, interval=0.05):
        raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_multiprocess(gunicorn: t.Callable[[bool], Server], preload: bool) -> None:
    """Scrapes aggregate both workers: counters summed, max_size = workers x max_size; a dead worker's gauges go."""
    server = gunicorn(preload)
    workers: dict[int, int] = {}
    sent = 0
    while len(workers) < 2 or sent < 40:
        assert sent < 2000, "only one worker ever answered"
        status, data = server.get("/one")
        assert status == 200
        workers[data["worker"]] = workers.get(data["worker"], 0) + 1
        sent += 1
    labels = {"app": "metrics_app", "pool": "db"}

    def settled() -> bool:
        s = server.scrape()
        return (
            value(s, "proxypool_checkouts_total", **labels) == sent
            and value(s, "proxypool_max_size", **labels) == 4
            and value(s, "proxypool_in_use", **labels) == 0
        )

    _until(settled, f"{sent} checkouts over 2 workers with 2 x 2 max_size")
    s = server.scrape()
    assert 2 <= value(s, "proxypool_size", **labels) <= 4
    assert value(s, "proxypool_hold_quantile_seconds", quantile="0.99", **labels) > 0
    assert not any(name == "proxypool_size" and "pid" in dict(lab) for name, lab in s)

    # a worker dies: gunicorn's child_exit drops its live gauges; its counts stay in the total
    os.kill(next(iter(workers)), signal.SIGTERM)

    def one_left() -> bool:
        s = server.scrape()
        return value(s, "proxypool_max_size", **labels) == 2 and value(s, "proxypool_checkouts_total", **labels) == sent

    _until(one_left, "the dead worker's gauges to go while its counters stay")
