"""Real gunicorn processes serving examples/shop, and an HTTP load driver for them."""

from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as t
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
GUNICORN = Path(sys.executable).parent / "gunicorn"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gunicorn:
    """``gunicorn -c examples/gunicorn.conf.py 'shop:create_app()'`` on a loopback port."""

    def __init__(
        self,
        database_url: str | None,
        *,
        workers: int = 2,
        threads: int = 4,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log: Path,
    ) -> None:
        self.port = free_port()
        self.log = log
        self.env = {
            **os.environ,
            "SHOP_BIND": f"127.0.0.1:{self.port}",
            "SHOP_WORKERS": str(workers),
            "SHOP_THREADS": str(threads),
            "SHOP_DEBUG": "1",
            "SHOP_ACCESSLOG": "",  # keep the log to errors and warnings
            **(env or {}),
        }
        if database_url:
            self.env["SHOP_DATABASE_URL"] = database_url
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> None:
        cmd = [str(GUNICORN), "-c", "gunicorn.conf.py", *self.args, "shop:create_app()"]
        self._logf = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, cwd=EXAMPLES, env=self.env, stdout=self._logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Bounded wait until /health answers (it touches no pool)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}; log:\n{self.log_text()}")
            try:
                status, _, _ = self.request("GET", "/health", timeout=1.0)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"gunicorn not ready after {timeout} s; log:\n{self.log_text()}")

    def request(
        self, method: str, path: str, body: t.Any = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], t.Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            return send(conn, method, path, body)
        finally:
            conn.close()

    def each_worker(self, path: str, workers: int, timeout: float = 20.0) -> dict[int, t.Any]:
        """GET ``path`` until every worker has answered; {worker pid: json}."""
        seen: dict[int, t.Any] = {}
        deadline = time.monotonic() + timeout
        while len(seen) < workers and time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            try:
                status, _, data = send(conn, "GET", path)
            finally:
                conn.close()
            if status == 200:
                seen[data["worker"]] = data
        if len(seen) < workers:
            raise TimeoutError(f"only {len(seen)} of {workers} workers answered {path}")
        return seen

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), bounded wait, then SIGKILL."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._logf.close()
        return self.proc.returncode

    def stop(self) -> None:
        if self.proc is not None:
            try:
                self.terminate()
            finally:
                try:  # the workers too, if the master died first
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-5000:]
        except OSError:
            return ""


def send(
    conn: http.client.HTTPConnection, method: str, path: str, body: t.Any = None
) -> tuple[int, dict[str, str], t.Any]:
    payload = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if payload is not None else {}
    conn.request(method, path, body=payload, headers=headers)
    resp = conn.getresponse()
    raw = resp.read()
    try:
        data = json.loads(raw) if raw else None
    except ValueError:
        data = raw.decode(errors="replace")
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


@dataclasses.dataclass
class Result:
    kind: str
    ident: int
    status: int  # 0: the connection failed
    start: float
    end: float
    data: t.Any = None
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


Plan = Callable[[int, random.Random], tuple[str, str, str, t.Any, int]]


def mixed_plan(items: int) -> Plan:
    """Reads, writes, writes that fail mid-transaction, and backend-pid probes."""

    def plan(i: int, rng: random.Random) -> tuple[str, str, str, t.Any, int]:
        r = rng.random()
        if r < 0.45:
            return "read", "GET", f"/items/{rng.randint(1, items)}", None, 0
        if r < 0.75:
            return "write", "POST", "/orders", {"id": i, "item_id": rng.randint(1, items), "qty": 1}, i
        if r < 0.90:
            return "fail", "POST", "/orders", {"id": i, "item_id": rng.randint(1, items), "qty": 1, "fail": True}, i
        return "whoami", "GET", "/_debug/whoami", None, 0

    return plan


def drive(
    port: int,
    plan: Plan,
    *,
    requests: int,
    clients: int,
    seed: int = 1,
    stop: threading.Event | None = None,
    timeout: float = 15.0,
    reconnect_every: int = 20,
) -> list[Result]:
    """Send ``requests`` requests from ``clients`` keep-alive connections; returns every result.

    Each client opens a new connection every ``reconnect_every`` requests so
    that the load spreads over gunicorn's workers.
    """
    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(1, requests + 1))

    def client(n: int) -> None:
        rng = random.Random(seed * 1000 + n)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        mine: list[Result] = []
        while stop is None or not stop.is_set():
            with lock:
                i = next(counter, None)
            if i is None:
                break
            kind, method, path, body, ident = plan(i, rng)
            t0 = time.monotonic()
            try:
                status, headers, data = send(conn, method, path, body)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
                status, headers, data = 0, {}, None
            mine.append(Result(kind, ident, status, t0, time.monotonic(), data, headers))
            if len(mine) % reconnect_every == 0:
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.close()
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(600)
    return results


class Sampler:
    """Samples how many server connections a database has, in a thread, until stopped."""

    def __init__(self, conninfo: str, dbname: str, interval: float = 0.01) -> None:
        self.conninfo = conninfo
        self.dbname = dbname
        self.interval = interval
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.conninfo, autocommit=True, connect_timeout=2) as c:
                    while not self._stop.is_set():
                        row = c.execute(
                            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                            (self.dbname,),
                        ).fetchone()
                        self.samples.append(int(row[0]) if row else -1)
                        self._stop.wait(self.interval)
            except psycopg.OperationalError:
                self._stop.wait(0.05)  # server restarting: sample again once it is back

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def statuses(results: list[Result]) -> dict[int, int]:
    out: dict[int, int] = {}
    for r in results:
        out[r.status] = out.get(r.status, 0) + 1
    return dict(sorted(out.items()))


@dataclasses.dataclass
class Run:
    results: list[Result]
    max_connections: int


def iter_chunks(seq: list[Result], key: Callable[[Result], str]) -> Iterator[tuple[str, list[Result]]]:
    groups: dict[str, list[Result]] = {}
    for r in seq:
        groups.setdefault(key(r), []).append(r)
    yield from groups.items()
