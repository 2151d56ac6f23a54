"""Shared pieces: the throwaway PostgreSQL server, machine description, small helpers."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import typing as t
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

ROWS = 10_000
DBNAME = "bench"


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


class Database:
    """A PostgreSQL cluster of our own with ``items(id int primary key, name text)``, 10,000 rows."""

    def __init__(self) -> None:
        from pgserver import PgServer, make_basedir  # tests/pgserver.py

        self.basedir = make_basedir("ppbench-")
        self.server = PgServer(self.basedir)

    def __enter__(self) -> Database:
        try:
            self.server.start()
            self.server.create_database(DBNAME)
            self.server.psql(
                "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL);"
                f"INSERT INTO items SELECT i, 'item ' || i FROM generate_series(1, {ROWS}) AS i;",
                dbname=DBNAME,
            )
            self.server.psql("VACUUM ANALYZE items", dbname=DBNAME)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self.server.stop("fast")
        shutil.rmtree(self.basedir, ignore_errors=True)

    def dsn(self, application_name: str | None = None) -> str:
        extra = {"application_name": application_name} if application_name else {}
        return t.cast(str, self.server.conninfo(DBNAME, **extra))

    def admin_dsn(self) -> str:
        return t.cast(str, self.server.conninfo("postgres", application_name="bench_monitor"))

    def server_pids(self) -> list[int]:
        """The postmaster and every process it started (backends, background workers)."""
        try:
            pid = int((self.server.datadir / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        return [pid, *children(pid)]

    def version(self) -> str:
        rows = self.server.psql("SHOW server_version")
        return str(rows[0][0])


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid: int) -> int:
    """utime + stime of one process (all its threads), in clock ticks; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(rest[11]) + int(rest[12])  # fields 14 and 15


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii") as fh:
                rest = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(rest[1]) == pid:
            out.append(int(entry))
    return out


def busy_ticks() -> int:
    """CPU time the whole machine spent busy (all CPUs), in clock ticks."""
    with open("/proc/stat", encoding="ascii") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal guest guest_nice; guest is inside user
    return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]


def child_ticks() -> float:
    """CPU time of our reaped children (wrk), in clock ticks."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (ru.ru_utime + ru.ru_stime) * CLK_TCK


class LoadMeter:
    """CPU that processes outside the benchmark used meanwhile (other people's work on a shared machine).

    Ours: this process, its reaped children (wrk), our PostgreSQL cluster and
    whatever ``extra_pids()`` names (the gunicorn servers). The rest of the
    machine's busy time is foreign, reported in cores.
    """

    def __init__(self, db: Database | None, extra_pids: t.Callable[[], list[int]] = list) -> None:
        self.db = db
        self.extra_pids = extra_pids

    def _ours(self) -> float:
        pids = [os.getpid(), *self.extra_pids()]
        if self.db is not None:
            pids += self.db.server_pids()
        return sum(proc_ticks(p) for p in pids) + child_ticks()

    def __enter__(self) -> LoadMeter:
        self._t0 = time.monotonic()
        self._busy0 = busy_ticks()
        self._ours0 = self._ours()
        return self

    def __exit__(self, *exc: object) -> None:
        elapsed = max(time.monotonic() - self._t0, 1e-6)
        foreign = (busy_ticks() - self._busy0) - (self._ours() - self._ours0)
        self.foreign_cores = max(foreign, 0) / CLK_TCK / elapsed

    @staticmethod
    def wait_quiet(db: Database | None, limit: float, threshold: float) -> float:
        """Wait (at most ``limit`` s) until a 1 s window has less than ``threshold`` foreign cores."""
        start = time.monotonic()
        while True:
            with LoadMeter(db) as m:
                time.sleep(1.0)
            if m.foreign_cores < threshold or time.monotonic() - start >= limit:
                return time.monotonic() - start


class Quiet:
    """Measure again when other processes loaded the machine meanwhile, within a total wait budget.

    Keeps the attempt that saw the least foreign load; every result carries
    ``foreign_cores`` (other processes' CPU during it) and ``attempts``.
    """

    def __init__(self, db: Database | None, *, threshold: float, budget: float, attempts: int) -> None:
        self.db = db
        self.threshold = threshold
        self.budget = budget
        self.attempts = attempts
        self.waited = 0.0
        self.retries = 0
        self.parts: list[Quiet] = []

    def part(self, budget: float) -> Quiet:
        """A share of the budget for one part of the run (so one noisy part cannot use it all)."""
        q = Quiet(self.db, threshold=self.threshold, budget=min(budget, self.budget), attempts=self.attempts)
        self.parts.append(q)
        return q

    def totals(self) -> dict[str, float]:
        return {
            "threshold_cores": self.threshold,
            "retries": self.retries + sum(p.retries for p in self.parts),
            "waited_s": self.waited + sum(p.waited for p in self.parts),
        }

    def run(self, what: str, fn: t.Callable[[], dict[str, t.Any]],
            pids: t.Callable[[], list[int]] = list) -> dict[str, t.Any]:  # fmt: skip
        best: dict[str, t.Any] | None = None
        for attempt in range(1, self.attempts + 1):
            with LoadMeter(self.db, pids) as m:
                r = fn()
            r["foreign_cores"] = m.foreign_cores
            r["attempts"] = attempt
            if best is None or m.foreign_cores < best["foreign_cores"]:
                best = r
            if m.foreign_cores <= self.threshold or attempt == self.attempts or self.budget - self.waited < 1:
                break
            log(f"{what}: other processes used {m.foreign_cores:.2f} cores meanwhile; waiting, measuring again")
            self.retries += 1
            self.waited += LoadMeter.wait_quiet(self.db, min(30.0, self.budget - self.waited), self.threshold)
        assert best is not None
        return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pkg_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def wrk_version() -> str | None:
    wrk = shutil.which("wrk")
    if wrk is None:
        return None
    proc = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    first = (proc.stdout or proc.stderr).strip().splitlines()
    return first[0].split(" [")[0] if first else "wrk"


def machine(db: Database) -> dict[str, t.Any]:
    return {
        "nproc": nproc(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "postgresql": db.version(),
        "os": f"{platform.system()} {platform.release()}",
        "wrk": wrk_version(),
        "packages": {name: pkg_version(name) for name in PACKAGES},
        "source": source_state(),
    }


def source_state() -> str:
    """The commit measured, and whether flask_proxypool/ differs from it (.venv installs the package editable)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changed = [line for line in git("status", "--porcelain", "--", "flask_proxypool").splitlines() if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (f" + uncommitted changes to {len(changed)} file(s) in flask_proxypool/" if changed else "")


PACKAGES = ("flask-proxypool", "Flask", "psycopg", "psycopg-pool", "ProxyPatternPool", "DBUtils", "SQLAlchemy",
            "gunicorn")  # fmt: skip


def runtime() -> dict[str, t.Any]:
    """This process's interpreter, now: version, free-threaded build or not, whether the GIL is on
    (a C extension without free-threading support turns it back on when imported), psycopg's libpq wrapper."""
    import sysconfig

    gil = getattr(sys, "_is_gil_enabled", None)  # 3.13+
    pq = sys.modules.get("psycopg.pq")
    return {
        "pid": os.getpid(),
        "python": platform.python_version(),
        "executable": sys.executable,
        "free_threaded_build": sysconfig.get_config_var("Py_GIL_DISABLED") == 1,
        "gil_enabled": bool(gil()) if gil is not None else True,
        "psycopg_impl": getattr(pq, "__impl__", None),
        "packages": {name: pkg_version(name) for name in PACKAGES},
    }


def median(values: t.Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
