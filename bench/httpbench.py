"""HTTP benchmarks: the same Flask app per approach under ``gunicorn -k gthread``, loaded by wrk.

Per phase (a gunicorn shape), one server per approach is started, each warmed
up, then measured in rounds; within a round the approaches take turns (the
order rotates each round) so that a slow minute of a noisy machine hits them
all. Per measurement: requests/s and latency percentiles from wrk, the most
server connections the approach held (pg_stat_activity, sampled every
0.1 s, told apart by application_name), and the CPU the gunicorn processes
used per request (utime + stime of master and workers from /proc, before and
after). Ratios to the per-thread baseline are taken round by round (the
baseline ran minutes, not hours, away), then the median over rounds.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import typing as t
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .common import BENCH, CLK_TCK, ROOT, Database, Quiet, children, log, median, proc_ticks

LUA = BENCH / "load.lua"

LABELS = {
    "baseline": "per-thread connection (`threading.local`), the baseline",
    "baseline_twin": "the baseline again, same code (its ratio is this run's measurement noise)",
    "flask_proxypool": "flask_proxypool proxy",
    "flask_proxypool_release": 'flask_proxypool proxy, `release: "commit"`',
    "flask_proxypool_rollback": 'flask_proxypool proxy, `reset: "rollback"` (no session reset: as before it)',
    "psycopg_pool": "psycopg_pool, getconn into `g`, putconn at teardown",
    "proxypatternpool": "ProxyPatternPool `Proxy`, returned at teardown",
    "sqlalchemy": "SQLAlchemy engine `raw_connection()`, closed at teardown",
    "dbutils": "DBUtils `PooledDB`, closed at teardown",
}

NEEDS = {
    "psycopg_pool": "psycopg_pool",
    "proxypatternpool": "ProxyPatternPool",
    "sqlalchemy": "sqlalchemy",
    "dbutils": "dbutils",
}

HTTP_APPROACHES = (
    "baseline", "baseline_twin", "flask_proxypool", "psycopg_pool", "proxypatternpool", "sqlalchemy", "dbutils",
)  # fmt: skip
MIXED_APPROACHES = ("baseline", "flask_proxypool", "flask_proxypool_release", "psycopg_pool")
#: What the session reset costs (bench/run --only clean): the default against its opt-out, same run.
CLEAN_APPROACHES = ("baseline", "baseline_twin", "flask_proxypool", "flask_proxypool_rollback")


@dataclass(frozen=True)
class Phase:
    key: str
    title: str
    workers: int
    threads: int
    mode: str  # item | mixed
    wrk_connections: int
    approaches: tuple[str, ...]
    pool_size: int  # connections per worker for the pools (the baseline has one per thread)
    gunicorn_args: tuple[str, ...] = ()


def phases(http_approaches: t.Sequence[str] = HTTP_APPROACHES) -> list[Phase]:
    return [
        Phase("1x8", "1 worker x 8 threads", 1, 8, "item", 16, tuple(http_approaches), 8),
        # --worker-connections 8: each worker takes 8 of wrk's 16 keep-alive connections (see run_phase)
        Phase("2x4", "2 workers x 4 threads", 2, 4, "item", 16, tuple(http_approaches), 4,
              ("--worker-connections", "8")),  # fmt: skip
        Phase("mixed", "mixed workload, 1 worker x 16 threads", 1, 16, "mixed", 32, MIXED_APPROACHES, 4),
    ]


def clean_phases() -> list[Phase]:
    """1 worker x 8 threads, on transactions (the library's default) and on autocommit connections."""
    return [
        Phase("clean-txn", "reset cost, transactions (the default), 1 worker x 8 threads", 1, 8, "txn", 16,
              CLEAN_APPROACHES, 8),
        Phase("clean-item", "reset cost, autocommit connections, 1 worker x 8 threads", 1, 8, "item", 16,
              CLEAN_APPROACHES, 8),
    ]  # fmt: skip


def release_option_available(dsn: str) -> str | None:
    """None if ``release: "commit"`` passes config validation, else why not."""
    from flask_proxypool.config import parse_pools
    from flask_proxypool.errors import ConfigError

    try:
        parse_pools({"db": {"conninfo": dsn, "release": "commit"}})
    except ConfigError as e:
        return f"not available yet: config validation refuses it ({str(e).split(';')[0]})"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    phase: Phase
    approach: str
    db: Database
    logdir: Path
    python: str = sys.executable  #: the interpreter gunicorn runs on
    tag: str = ""  #: tells apart servers of one approach on several interpreters (bench/ft.py)
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None
    #: a command gunicorn runs under (valgrind, for bench/instructions.py), and more environment for the app
    wrapper: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.approach + self.tag

    @property
    def app_name(self) -> str:
        return f"bench_{self.phase.key}_{self.key}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def logfile(self) -> Path:
        return self.logdir / f"{self.app_name}.log"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(
            BENCH_APPROACH=self.approach,
            BENCH_DSN=self.db.dsn(self.app_name),
            BENCH_SIZE=str(self.phase.threads if self.approach.startswith("baseline") else self.phase.pool_size),
            BENCH_MODE=self.phase.mode,
            # Like for like in the comparisons: no other pool resets sessions, so flask_proxypool's
            # session reset is off there; the clean phases (bench/run --only clean) measure it.
            BENCH_FPP_RESET="session" if self.phase.key.startswith("clean") else "rollback",
            PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        )
        env.update(self.env)
        cmd = [
            *self.wrapper, self.python, "-m", "gunicorn",
            "-k", "gthread", "-w", str(self.phase.workers), "--threads", str(self.phase.threads),
            "-b", f"127.0.0.1:{self.port}", "--log-level", "warning", "--graceful-timeout", "5",
            *self.phase.gunicorn_args, "bench.apps:create_app()",
        ]  # fmt: skip
        with open(self.logfile, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 60.0) -> None:
        path = "/mixed/1" if self.phase.mode == "mixed" else "/item/1"
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                    if resp.status == 200:
                        json.loads(resp.read())
                        return
            except Exception as e:  # not up yet
                last = e
            time.sleep(0.1)
        tail = self.logfile.read_text(errors="replace")[-3000:] if self.logfile.exists() else ""
        raise RuntimeError(f"{self.app_name}: server did not become ready ({last!r}); log tail:\n{tail}")

    def runtime(self) -> list[dict[str, t.Any]]:
        """What the worker processes run on (``GET /runtime``: interpreter, GIL, psycopg's libpq wrapper).

        Asked several times: each answer comes from whichever worker accepted the connection.
        """
        seen: dict[int, dict[str, t.Any]] = {}
        for _ in range(4 * self.phase.workers):
            with urllib.request.urlopen(self.url + "/runtime", timeout=10) as resp:
                info = json.loads(resp.read())
            seen[info["pid"]] = info
        return list(seen.values())

    def pids(self) -> list[int]:
        """The gunicorn master and its workers."""
        return [] if self.proc is None else [self.proc.pid, *children(self.proc.pid)]

    def cpu_ticks(self) -> int:
        return sum(proc_ticks(pid) for pid in self.pids())

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then `timeout` seconds for a graceful exit (callgrind writes its counts then), then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class ConnectionSampler:
    """Samples pg_stat_activity every 0.1 s; the most connections seen with one application_name."""

    def __init__(self, admin_dsn: str, app_name: str) -> None:
        self.admin_dsn = admin_dsn
        self.app_name = app_name
        self.max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            while True:
                n = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", (self.app_name,)
                ).fetchone()
                self.max = max(self.max, int(n[0]) if n else 0)
                if self._stop.wait(0.1):
                    return

    def __enter__(self) -> ConnectionSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def run_wrk(url: str, mode: str, duration: int, connections: int, pace_ms: float = 0.0) -> dict[str, t.Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found: apt-get install -y wrk (bench/run does this when run as root)")
    cmd = [wrk, "-t2", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "--latency",
           "-s", str(LUA), url, "--", mode, f"{pace_ms:.3f}"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            return t.cast(dict[str, t.Any], json.loads(line[len("BENCHJSON "):]))
    raise RuntimeError(f"wrk failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def measure(server: Server, duration: int, db: Database, admin_dsn: str, pace_ms: float = 0.0) -> dict[str, t.Any]:
    before = server.cpu_ticks()
    pg_before = sum(proc_ticks(p) for p in db.server_pids())
    with ConnectionSampler(admin_dsn, server.app_name) as sampler:
        w = run_wrk(server.url, server.phase.mode, duration, server.phase.wrk_connections, pace_ms)
    after = server.cpu_ticks()
    pg_after = sum(proc_ticks(p) for p in db.server_pids())
    requests = max(int(w["requests"]), 1)
    errors = sum(int(w[k]) for k in ("connect", "read", "write", "status", "timeout"))
    return {
        "rps": w["requests"] / (w["duration_us"] / 1e6),
        "p50_ms": w["p50_us"] / 1000,
        "p90_ms": w["p90_us"] / 1000,
        "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "requests": w["requests"],
        "errors": errors,
        "non_2xx": int(w["status"]),
        "socket_errors": errors - int(w["status"]),
        "server_connections": sampler.max,
        "cpu_us_per_req": (after - before) / CLK_TCK / requests * 1e6,
        # every PostgreSQL process of our cluster; the pg_stat_activity sampler adds 10 tiny queries/s
        "db_cpu_us_per_req": (pg_after - pg_before) / CLK_TCK / requests * 1e6,
    }


METRICS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "db_cpu_us_per_req", "server_connections")
RATIO_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_us_per_req", "db_cpu_us_per_req")  #: compared with the baseline


def measure_rounds(
    phase: Phase, servers: list[Server], rounds: int, duration: int, db: Database, parallel: bool, quiet: Quiet,
    pace_ms: float = 0.0, order_of: t.Callable[[int], list[Server]] | None = None,
) -> dict[str, list[dict[str, t.Any]]]:
    """``rounds`` measurements per server, the servers taking turns (the order rotates each round, or is
    ``order_of(round)``)."""
    admin = db.admin_dsn()
    samples: dict[str, list[dict[str, t.Any]]] = {s.key: [] for s in servers}
    kind = "paced" if pace_ms else "saturated"
    for r in range(rounds):
        order = order_of(r) if order_of else servers[r % len(servers):] + servers[: r % len(servers)]
        if parallel:  # smoke mode: proves it works, measures nothing worth reading
            with concurrent.futures.ThreadPoolExecutor(len(order)) as ex:
                got = list(ex.map(lambda s: measure(s, duration, db, admin, pace_ms), order))
            for s, m in zip(order, got, strict=True):
                m.update(foreign_cores=float("nan"), attempts=1)
                samples[s.key].append(m)
        else:
            all_pids = lambda: [p for x in servers for p in x.pids()]  # noqa: E731
            for s in order:
                one = lambda s=s: measure(s, duration, db, admin, pace_ms)  # noqa: E731
                samples[s.key].append(quiet.run(f"http {phase.key} {kind} {s.key}", one, all_pids))
        log(f"http {phase.key}: {kind} round {r + 1}/{rounds} done")
    return samples


@contextlib.contextmanager
def serving(phase: Phase, servers: list[Server], warmup: int, together: bool = False) -> t.Iterator[None]:
    """Start every server, wait until each answers, warm each up with wrk; stop them all at exit.

    ``together``: warm them all up at once (bench/ft.py, whose many short rounds each start every server
    afresh: one warm-up instead of one per server leaves time for more rounds).
    """
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait_ready()
        if warmup and together:
            with concurrent.futures.ThreadPoolExecutor(len(servers)) as ex:
                list(ex.map(lambda s: run_wrk(s.url, phase.mode, warmup, phase.wrk_connections), servers))
        elif warmup:
            for s in servers:
                run_wrk(s.url, phase.mode, warmup, phase.wrk_connections)
        yield
    finally:
        for s in servers:
            s.stop()


def summarize(rs: list[dict[str, t.Any]], base: list[dict[str, t.Any]], keys: t.Sequence[str]) -> dict[str, t.Any]:
    """Medians over rounds, and the median of the round-by-round ratios to the baseline."""
    out: dict[str, t.Any] = {
        "rounds": rs,
        "median": {k: median([m[k] for m in rs]) for k in (*METRICS, "errors", "foreign_cores")},
        "errors": sum(m["errors"] for m in rs),
    }
    if base:
        out["ratio"] = {
            k: median([m[k] / b[k] if b[k] else float("nan") for m, b in zip(rs, base, strict=True)]) for k in keys
        }
    return out


PACED_LOAD = 0.5  #: paced pass: offered load as a fraction of the baseline's saturated req/s


def run_phase(
    phase: Phase, db: Database, rounds: int, duration: int, warmup: int, parallel: bool, logdir: Path,
    quiet: Quiet, paced_duration: int = 0,
) -> dict[str, t.Any]:
    """Saturated rounds (wrk as fast as it can), then paced rounds at half the baseline's rate."""
    out: dict[str, t.Any] = {
        "title": phase.title,
        "workers": phase.workers,
        "threads": phase.threads,
        "pool_size": phase.pool_size,
        "wrk_connections": phase.wrk_connections,
        "gunicorn_args": list(phase.gunicorn_args),
        "mode": phase.mode,
        "approaches": {},
    }
    skips: dict[str, str] = {}
    if "flask_proxypool_release" in phase.approaches:
        why = release_option_available(db.dsn())
        if why:
            skips["flask_proxypool_release"] = why
    for a in phase.approaches:
        module = NEEDS.get(a)
        if a not in skips and module and importlib.util.find_spec(module) is None:
            skips[a] = f"not installed (`pip install -r bench/requirements.txt`: {module} missing)"
    servers = [Server(phase, a, db, logdir) for a in phase.approaches if a not in skips]
    paced: dict[str, list[dict[str, t.Any]]] = {}
    with serving(phase, servers, warmup):
        saturated = measure_rounds(phase, servers, rounds, duration, db, parallel, quiet)
        base_rps = median([m["rps"] for m in saturated.get("baseline", [])])
        if paced_duration and base_rps > 0:
            rate = base_rps * PACED_LOAD
            out["paced_rps"] = rate
            # each connection waits a random time (mean pace_ms) after each response
            pace_ms = phase.wrk_connections / rate * 1000
            paced = measure_rounds(phase, servers, rounds, paced_duration, db, parallel, quiet, pace_ms)
    for a in phase.approaches:
        row: dict[str, t.Any] = {"label": LABELS[a]}
        if a in skips:
            row["skip"] = skips[a]
        else:
            row.update(summarize(saturated[a], saturated.get("baseline", []), RATIO_KEYS))
            if paced:
                row["paced"] = summarize(paced[a], paced.get("baseline", []), RATIO_KEYS)
        out["approaches"][a] = row
    return out


def run(
    db: Database,
    smoke: bool,
    quiet: Quiet,
    http_approaches: t.Sequence[str] = HTTP_APPROACHES,
    which: t.Callable[[t.Sequence[str]], list[Phase]] | None = None,
) -> dict[str, t.Any]:
    rounds, duration, paced_duration, warmup = (1, 1, 1, 0) if smoke else (5, 6, 5, 1)
    results: dict[str, t.Any] = {
        "method": {
            "rounds": rounds,
            "duration_s": duration,
            "paced_duration_s": paced_duration,
            "paced_load": PACED_LOAD,
            "warmup_s": warmup,
            "parallel": smoke,
        },
        "phases": {},
    }
    logdir = Path(tempfile.mkdtemp(prefix="ppbench-logs-"))
    try:
        todo = (which or phases)(http_approaches)

        def pd(ph: Phase) -> int:  # the mixed workload's and the reset's targets are throughput: no paced pass
            return 0 if ph.mode == "mixed" or ph.key.startswith("clean") else paced_duration

        if smoke:  # every phase at once: proves each server and approach works, in seconds
            log(f"http: {len(todo)} phases at once, {rounds} x {duration} s (smoke: numbers meaningless)")
            with concurrent.futures.ThreadPoolExecutor(len(todo)) as ex:
                futs = {
                    ph.key: ex.submit(run_phase, ph, db, rounds, duration, warmup, True, logdir, quiet, pd(ph))
                    for ph in todo
                }
            for key, fut in futs.items():
                results["phases"][key] = fut.result()
        for ph in todo if not smoke else ():
            log(f"http {ph.key}: {ph.title}, {len(ph.approaches)} approaches, {rounds} x {duration} s")
            part = quiet.part(60.0)
            results["phases"][ph.key] = run_phase(ph, db, rounds, duration, warmup, False, logdir, part, pd(ph))
    except BaseException:
        log(f"server logs kept in {logdir}")
        raise
    shutil.rmtree(logdir, ignore_errors=True)
    return results
