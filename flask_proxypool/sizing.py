"""Pool sizing advice from stats: how many connections each pool needs, and what the server sees.

Small pools used at full capacity beat many idle connections. A request
holds at most one resource per pool, so a pool serving requests never needs
more than the worker's threads; and every worker has its own pools, so the
database sees workers x max_size connections per pool. This module turns a
pool's stats (waits, timeouts, refusals, hold times) and the deployment
(workers x threads) into a suggested ``max_size`` and says why, plainly.

Everything here is a pure function of its inputs except
:func:`detect_deployment` (reads gunicorn settings) and
:func:`query_server_limits` (asks PostgreSQL); ``flask proxypool size``
glues them together.

The rules, per pool (``T`` = concurrent requests per worker, ``M`` = ``max_size``):

* **too small** when checkouts timed out (503), were refused (``max_waiting``),
  or waited often (``wait_ratio`` of checkouts) or long (``wait_p95``).
  Suggested: what Little's law needs when the rate is known, else ``T``.
  If ``M >= T`` already, growing does not help: something holds resources
  outside requests (see top holders).
* **too large** when ``M > T`` (requests can never use more), when the pool
  never grew to ``M`` under real load (it grows only when every resource is
  busy, so ``size`` is its high-water mark), or when the rate says far fewer
  are busy. Suggested: the smallest of those bounds, but never below the
  high-water mark: that many were in use at once, so fewer would have waited.
* With a pool's rate (its checkouts per second over all workers), Little's law gives the
  mean number busy per worker, ``L = rate / workers x mean hold``, and
  square-root staffing adds headroom for bursts: ``ceil(L + 2 sqrt(L))``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import runpy
import shlex
import threading
import typing as t
from pathlib import Path

from .masking import mask_password
from .stats import PoolStats

if t.TYPE_CHECKING:
    from .pool import Pool

__all__ = [
    "Advice",
    "Deployment",
    "PoolAdvice",
    "ServerAdvice",
    "ServerLimits",
    "Thresholds",
    "advise",
    "advise_pool",
    "detect_deployment",
    "query_server_limits",
    "render_text",
    "server_key",
    "stats_from_dict",
]

#: gunicorn worker classes whose concurrency is ``worker_connections``, not threads
_ASYNC_WORKERS = ("gevent", "eventlet", "tornado")


@dataclasses.dataclass(frozen=True)
class Deployment:
    """How many processes serve the app, and how many requests each runs at once."""

    workers: int = 1
    threads: int = 1
    worker_class: str = "sync"
    #: requests in flight at once in an async worker (gevent, eventlet)
    worker_connections: int = 1000
    source: str = "default"  #: where the numbers came from
    notes: tuple[str, ...] = ()

    @property
    def is_async(self) -> bool:
        return any(a in self.worker_class for a in _ASYNC_WORKERS)

    @property
    def concurrency(self) -> int:
        """Requests one worker serves at once: its threads, or ``worker_connections`` for gevent."""
        return self.worker_connections if self.is_async else self.threads

    def to_dict(self) -> dict[str, t.Any]:
        return {**dataclasses.asdict(self), "notes": list(self.notes), "concurrency": self.concurrency}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When waits count as "too many" or "too long", and how much traffic counts as evidence."""

    wait_ratio: float = 0.05  #: share of checkouts that waited
    wait_p95: float = 0.050  #: seconds
    min_checkouts: int = 100  #: fewer: too little traffic to call a pool too large from its size
    tight: float = 0.8  #: share of the server's available connections that leaves too little headroom


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """A PostgreSQL server's connection limits (``SHOW max_connections``), or why they are unknown."""

    max_connections: int | None = None
    reserved: int = 0  #: superuser_reserved_connections + reserved_connections
    error: str | None = None

    @property
    def available(self) -> int | None:
        """Connections an ordinary role may open."""
        return None if self.max_connections is None else self.max_connections - self.reserved


@dataclasses.dataclass(frozen=True)
class PoolAdvice:
    """The verdict on one pool: ``too small``, ``too large``, ``ok`` or ``no data``, and why."""

    pool: str
    kind: str
    verdict: str
    max_size: int
    suggested_max_size: int
    reasons: tuple[str, ...]
    server: str | None  #: the database server it connects to (psycopg pools)
    # the evidence
    checkouts: int
    wait_ratio: float  #: wait_count / checkouts
    wait_p95: float
    timeouts: int
    refused: int
    high_water: int  #: ``size``: the pool grows only when all its resources are busy
    in_use: int
    utilisation: float  #: in_use / size right now
    hold_mean: float
    hold_p95: float
    busy_mean: float | None  #: Little's law: mean resources busy per worker (needs the rate)
    rate: float | None = None  #: the pool's checkouts per second over all workers, if given

    def to_dict(self) -> dict[str, t.Any]:
        return {**dataclasses.asdict(self), "reasons": list(self.reasons)}


@dataclasses.dataclass(frozen=True)
class ServerAdvice:
    """Connections all workers may open to one server, against what the server accepts."""

    server: str
    pools: tuple[str, ...]
    connections: int  #: workers x sum of max_size
    suggested_connections: int  #: workers x sum of suggested max_size
    max_connections: int | None
    available: int | None
    verdict: str  #: ``ok``, ``tight``, ``over`` or ``unknown``
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, t.Any]:
        return {**dataclasses.asdict(self), "pools": list(self.pools), "reasons": list(self.reasons)}


@dataclasses.dataclass(frozen=True)
class Advice:
    """Sizing advice for every pool of an app, and for every database server they use."""

    deployment: Deployment
    rates: dict[str, float]  #: checkouts per second over all workers, per pool, where known
    pools: tuple[PoolAdvice, ...]
    servers: tuple[ServerAdvice, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, t.Any]:
        """Plain data, ready for ``json.dumps``."""
        return {
            "deployment": self.deployment.to_dict(),
            "rates": dict(self.rates),
            "pools": {p.pool: p.to_dict() for p in self.pools},
            "servers": [s.to_dict() for s in self.servers],
            "notes": list(self.notes),
        }


# -- the rules ---------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _held_outside_requests(stats: PoolStats) -> bool:
    return any(h.get("holder") == "(outside a request)" for h in stats.top_holders)


def advise_pool(
    stats: PoolStats,
    deployment: Deployment,
    *,
    rate: float | None = None,
    server: str | None = None,
    thresholds: Thresholds = Thresholds(),
) -> PoolAdvice:
    """Judge one pool from its stats and the deployment; see the module docstring for the rules."""
    th = thresholds
    m = stats.max_size
    conc = deployment.concurrency
    per_thread = "threads" if not deployment.is_async else "worker_connections"
    checkouts = stats.checkouts
    wait_ratio = stats.wait_count / checkouts if checkouts else 0.0
    returns = max(checkouts - stats.in_use, 0)
    hold_mean = stats.hold_time_total / returns if returns else 0.0
    busy: float | None = None
    needed: int | None = None
    if rate is not None and rate > 0 and returns:
        busy = rate / deployment.workers * hold_mean
        needed = max(1, math.ceil(busy + 2 * math.sqrt(busy)))
    outside = _held_outside_requests(stats)

    small: list[str] = []
    if stats.timeouts:
        small.append(f"{stats.timeouts} checkout(s) timed out after waiting `timeout` (HTTP 503)")
    if stats.refused:
        small.append(f"{stats.refused} checkout(s) were refused at once because max_waiting callers were queued")
    if checkouts and wait_ratio >= th.wait_ratio:
        small.append(
            f"{wait_ratio:.1%} of checkouts had to wait for a free resource "
            f"(p95 wait {_ms(stats.wait_time_p95)}; more than {th.wait_ratio:.0%} is too many)"
        )
    elif stats.wait_count and stats.wait_time_p95 >= th.wait_p95:
        small.append(
            f"waits are long: p95 {_ms(stats.wait_time_p95)} (at most {_ms(th.wait_p95)} is fine), "
            f"though only {wait_ratio:.1%} of checkouts waited"
        )
    if needed is not None and busy is not None and needed > m and not small:
        small.append(
            f"at {rate:g} checkouts/s over {deployment.workers} worker(s) and a mean hold of {_ms(hold_mean)}, "
            f"{busy:.1f} resources are busy on average per worker: {needed} cover the bursts"
        )

    large: list[str] = []
    bound = m
    if m > conc:
        if outside:
            large.append(
                f"max_size {m} is above the {conc} {per_thread} per worker; requests can hold at most {conc} "
                "at once, so the rest serve only code outside requests (seen in top holders)"
            )
        else:
            large.append(
                f"max_size {m} is above the {conc} {per_thread} per worker: a request holds at most one "
                f"resource per pool, so at most {conc} can ever be in use at once"
            )
            bound = conc
    if checkouts >= th.min_checkouts and stats.wait_count == 0 and stats.size < m:
        peak = max(stats.size, stats.min_size, 1)
        large.append(
            f"the pool never grew beyond {stats.size} of {m} in {checkouts} checkouts (it grows only when "
            f"every resource is busy): {peak} were enough for this load"
        )
        bound = min(bound, peak)
    info: list[str] = []
    if needed is not None and busy is not None and needed < m and not small:
        littles = (
            f"at {rate:g} checkouts/s over {deployment.workers} worker(s) and a mean hold of {_ms(hold_mean)}, "
            f"{busy:.1f} resources are busy on average per worker (utilisation {busy / m:.0%} of {m})"
        )
        # the high-water mark is observed demand: never suggest fewer than the peak really used
        peak = stats.size if checkouts >= th.min_checkouts else 0
        if max(needed, peak) < m:
            large.append(f"{littles}; {max(needed, peak)} cover the bursts")
            bound = min(bound, max(needed, peak))
        else:
            info.append(f"{littles}: idle most of the time, yet the peaks used all {m}")
    idled = stats.closed_by_reason.get("max_idle", 0)

    reasons: list[str] = []
    if small:
        verdict = "too small"
        reasons += small
        if m < conc:
            if needed is not None:
                target = max(needed, m + 1)
            elif deployment.is_async:
                target = 2 * m
                reasons.append("pass the request rate (--rate) for a better number than doubling")
            else:
                target = conc
            suggested = target if outside else min(target, conc)
        elif needed is not None and needed > m:
            suggested = needed
        else:
            suggested = m
            reasons.append(
                f"max_size is already >= the {conc} {per_thread} per worker, so requests alone cannot exhaust "
                "it: resources are held outside requests (borrow(), background threads) or several at once; "
                "see top holders before growing the pool"
            )
    elif large:
        verdict = "too large"
        reasons += large
        suggested = bound
        if suggested == m:  # only the soft signal (extra connections kept for outside code)
            verdict = "ok"
    elif checkouts == 0:
        verdict = "no data"
        reasons.append("no checkouts in this process: stats of a process that served traffic are needed")
        suggested = m
    else:
        verdict = "ok"
        suggested = m
        if checkouts < th.min_checkouts:
            reasons.append(f"only {checkouts} checkout(s) so far: judge again after real traffic")
        elif stats.wait_count:
            reasons.append(f"{wait_ratio:.1%} of checkouts waited, p95 {_ms(stats.wait_time_p95)}: rare and short")
        else:
            reasons.append(f"no checkout waited, and all {m} resources were needed at some point")
    reasons += info
    if idled and verdict != "too small":
        reasons.append(f"{idled} resource(s) were closed after max_idle: the pool had idle resources for a while")
    suggested = max(suggested, stats.min_size, 1)
    return PoolAdvice(
        pool=stats.name,
        kind=stats.kind,
        verdict=verdict,
        max_size=m,
        suggested_max_size=suggested,
        reasons=tuple(reasons),
        server=server,
        checkouts=checkouts,
        wait_ratio=wait_ratio,
        wait_p95=stats.wait_time_p95,
        timeouts=stats.timeouts,
        refused=stats.refused,
        high_water=stats.size,
        in_use=stats.in_use,
        utilisation=stats.in_use / stats.size if stats.size else 0.0,
        hold_mean=hold_mean,
        hold_p95=stats.hold_time_p95,
        busy_mean=busy,
        rate=rate,
    )


def advise_server(
    server: str,
    pools: t.Sequence[PoolAdvice],
    deployment: Deployment,
    limits: ServerLimits | None,
    thresholds: Thresholds = Thresholds(),
) -> ServerAdvice:
    """Total connections of all workers to one server, against its ``max_connections``."""
    w = deployment.workers
    conns = w * sum(p.max_size for p in pools)
    suggested = w * sum(p.suggested_max_size for p in pools)
    names = tuple(p.pool for p in pools)
    what = f"{w} worker(s) x ({' + '.join(f'{p.pool} {p.max_size}' for p in pools)}) = {conns} connections"
    reasons = [what]
    available = limits.available if limits else None
    if limits is None or available is None:
        verdict = "unknown"
        why = limits.error if limits and limits.error else "not queried"
        reasons.append(f"max_connections unknown ({why})")
    elif conns > available:
        verdict = "over"
        reasons.append(
            f"more than the {available} the server accepts (max_connections {limits.max_connections} - "
            f"{limits.reserved} reserved): lower max_size, run fewer workers, or put PgBouncer in front"
        )
    elif conns > thresholds.tight * available:
        verdict = "tight"
        reasons.append(
            f"{conns} of the {available} the server accepts: only {available - conns} left for everything "
            "else (psql, migrations, other instances of this app)"
        )
    else:
        verdict = "ok"
        reasons.append(f"within the {available} the server accepts (max_connections {limits.max_connections})")
    if suggested != conns:
        reasons.append(f"with the suggested sizes: {suggested} connections")
    return ServerAdvice(
        server=server,
        pools=names,
        connections=conns,
        suggested_connections=suggested,
        max_connections=limits.max_connections if limits else None,
        available=available,
        verdict=verdict,
        reasons=tuple(reasons),
    )


def advise(
    stats: t.Mapping[str, PoolStats],
    deployment: Deployment,
    *,
    rate: float | t.Mapping[str, float] | None = None,
    servers: t.Mapping[str, str | None] | None = None,
    limits: t.Mapping[str, ServerLimits] | None = None,
    thresholds: Thresholds = Thresholds(),
) -> Advice:
    """Advice for every pool, and for every server they connect to.

    :param stats: pool name -> stats (of a process that served traffic).
    :param rate: checkouts per second across all workers, if known: one number for
        every pool, or per pool name (pools differ: not every request uses every pool).
    :param servers: pool name -> server key (:func:`server_key`); default: computed from the stats.
    :param limits: server key -> its limits (:func:`query_server_limits`).
    """
    keys = {name: server_key(s) for name, s in stats.items()} if servers is None else dict(servers)
    if rate is None:
        rates: dict[str, float] = {}
    elif isinstance(rate, (int, float)):
        rates = dict.fromkeys(stats, float(rate))
    else:
        rates = {name: float(r) for name, r in rate.items() if name in stats}
    pools = tuple(
        advise_pool(s, deployment, rate=rates.get(name), server=keys.get(name), thresholds=thresholds)
        for name, s in stats.items()
    )
    by_server: dict[str, list[PoolAdvice]] = {}
    for p in pools:
        if p.server is not None:
            by_server.setdefault(p.server, []).append(p)
    server_advice = tuple(
        advise_server(key, ps, deployment, (limits or {}).get(key), thresholds) for key, ps in by_server.items()
    )
    notes = list(deployment.notes)
    if deployment.workers > 1 or server_advice:
        notes.append("other hosts or processes running this app open their own pools: add theirs")
    return Advice(deployment=deployment, rates=rates, pools=pools, servers=server_advice, notes=tuple(notes))


# -- text ----------------------------------------------------------------------


def render_text(advice: Advice) -> str:
    """The advice for a terminal."""
    d = advice.deployment
    if d.is_async:
        shape = f"{d.workers} worker(s) x {d.worker_connections} worker_connections ({d.worker_class})"
    else:
        shape = f"{d.workers} worker(s) x {d.threads} thread(s)"
    lines = [f"deployment: {shape}, from {d.source}"]
    if advice.rates:
        shown = ", ".join(f"{name} {r:g}/s" for name, r in advice.rates.items())
        lines.append(f"checkout rates across all workers: {shown}")
    for p in advice.pools:
        if p.suggested_max_size != p.max_size:
            change = f"max_size {p.max_size} -> {p.suggested_max_size}"
        else:
            change = f"keep max_size {p.max_size}"
        lines.append("")
        lines.append(f"pool {p.pool!r} ({p.kind}): {p.verdict.upper()}: {change}")
        for r in p.reasons:
            lines.append(f"  - {r}")
        evidence = (
            f"  checkouts {p.checkouts}, waited {p.wait_ratio:.1%}, timeouts {p.timeouts}, refused {p.refused}, "
            f"high water {p.high_water}, in use now {p.in_use}, hold mean {_ms(p.hold_mean)} p95 {_ms(p.hold_p95)}"
        )
        if p.busy_mean is not None:
            evidence += f", at {p.rate:g}/s busy on average {p.busy_mean:.2f} per worker"
        lines.append(evidence)
    for s in advice.servers:
        lines.append("")
        lines.append(f"server {s.server} (pools: {', '.join(s.pools)}): {s.verdict.upper()}")
        for r in s.reasons:
            lines.append(f"  - {r}")
    if advice.notes:
        lines.append("")
        lines.extend(f"note: {n}" for n in advice.notes)
    return "\n".join(lines)


# -- inputs: stats files, gunicorn settings, the server ------------------------------


_FIELDS = {f.name for f in dataclasses.fields(PoolStats)}


def stats_from_dict(data: t.Mapping[str, t.Any]) -> dict[str, PoolStats]:
    """Pool stats from JSON: ``flask proxypool stats --json``, or the stats endpoint's body."""
    if not isinstance(data, t.Mapping):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    pools = data.get("pools", data)
    if not isinstance(pools, t.Mapping):
        raise ValueError("expected {pool name: stats} or {'pools': {pool name: stats}}")
    out = {}
    for name, d in pools.items():
        if not isinstance(d, t.Mapping) or "max_size" not in d:
            raise ValueError(f"pool {name!r}: not a stats mapping")
        out[name] = PoolStats(**{k: v for k, v in d.items() if k in _FIELDS})
    return out


def server_key(stats: PoolStats) -> str | None:
    """``host:port`` of a psycopg pool's server (the limits are per server); None for other kinds."""
    if stats.kind != "psycopg":
        return None
    cfg = stats.config
    params: dict[str, t.Any] = {}
    conninfo = cfg.get("conninfo", stats.target)
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = dict(conninfo_to_dict(conninfo))
    except Exception:
        return mask_password(str(conninfo))
    host = cfg.get("host") or params.get("host") or os.environ.get("PGHOST") or "local socket"
    port = cfg.get("port") or params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def _int_or_none(v: t.Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _parse_cmd_args(args: str) -> dict[str, t.Any]:
    """The sizing-relevant options of a gunicorn command line (``GUNICORN_CMD_ARGS``)."""
    names = {
        "-w": "workers",
        "--workers": "workers",
        "--threads": "threads",
        "-k": "worker_class",
        "--worker-class": "worker_class",
        "--worker-connections": "worker_connections",
        "-c": "config",
        "--config": "config",
    }
    out: dict[str, t.Any] = {}
    words = shlex.split(args)
    i = 0
    while i < len(words):
        word = words[i]
        opt, eq, value = word.partition("=")
        if opt in names:
            if not eq:
                i += 1
                value = words[i] if i < len(words) else ""
            out[names[opt]] = value
        elif word[:2] in ("-w", "-k", "-c") and len(word) > 2:  # -w4
            out[names[word[:2]]] = word[2:]
        i += 1
    return out


def _read_config_file(path: Path) -> dict[str, t.Any]:
    """Run a gunicorn config file as gunicorn does and read its settings."""
    ns = runpy.run_path(str(path))
    return {k: ns[k] for k in ("workers", "threads", "worker_class", "worker_connections") if k in ns}


def detect_deployment(
    workers: int | None = None,
    threads: int | None = None,
    *,
    config_file: str | os.PathLike[str] | None = None,
    environ: t.Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Deployment:
    """Workers and threads, from (later wins) ``WEB_CONCURRENCY``, a gunicorn config file,
    ``GUNICORN_CMD_ARGS`` and the explicit arguments; 1 x 1 when nothing says.

    The config file is ``config_file``, else the ``-c`` of ``GUNICORN_CMD_ARGS``,
    else ``gunicorn.conf.py`` in ``cwd`` (the current directory), as gunicorn looks for it.
    """
    env = os.environ if environ is None else environ
    here = Path(cwd) if cwd is not None else Path.cwd()
    settings: dict[str, t.Any] = {}
    sources: list[str] = []
    notes: list[str] = []
    if _int_or_none(env.get("WEB_CONCURRENCY")):
        settings["workers"] = env["WEB_CONCURRENCY"]
        sources.append("WEB_CONCURRENCY")
    cmd = _parse_cmd_args(env.get("GUNICORN_CMD_ARGS", ""))
    path = Path(config_file) if config_file else Path(cmd["config"]) if cmd.get("config") else None
    if path is not None and not path.is_absolute():
        path = here / path
    if path is None and (here / "gunicorn.conf.py").is_file():
        path = here / "gunicorn.conf.py"
    if path is not None:
        try:
            found = _read_config_file(path)
        except Exception as e:
            notes.append(f"could not read {path}: {type(e).__name__}: {e}")
        else:
            settings.update(found)
            sources.append(str(path))
    cmd.pop("config", None)
    if cmd:
        settings.update(cmd)
        sources.append("GUNICORN_CMD_ARGS")
    if workers is not None:
        settings["workers"] = workers
    if threads is not None:
        settings["threads"] = threads
    if workers is not None or threads is not None:
        sources.append("options")
    w = _int_or_none(settings.get("workers")) or 1
    th = _int_or_none(settings.get("threads")) or 1
    wc = _int_or_none(settings.get("worker_connections")) or 1000
    worker_class = str(settings.get("worker_class") or ("gthread" if th > 1 else "sync"))
    if not sources:
        notes.append(
            "no gunicorn settings found (GUNICORN_CMD_ARGS, gunicorn.conf.py, --workers/--threads): "
            "assuming 1 worker x 1 thread"
        )
    d = Deployment(
        workers=max(w, 1),
        threads=max(th, 1),
        worker_class=worker_class,
        worker_connections=max(wc, 1),
        source=", ".join(sources) or "default",
        notes=tuple(notes),
    )
    if d.is_async:
        notes.append(
            f"{worker_class} workers serve up to worker_connections ({d.worker_connections}) requests at once: "
            "size pools by the rate (--rate), not by threads"
        )
        d = dataclasses.replace(d, notes=tuple(notes))
    return d


def query_server_limits(pool: Pool[t.Any], timeout: float = 5.0) -> ServerLimits:
    """``max_connections`` and the reserved slots of a psycopg pool's server, through the pool.

    Bounded by ``timeout`` in all (a connection that hangs is left behind);
    any failure gives limits with ``error`` set instead of raising.
    """
    out: list[ServerLimits] = []

    def run() -> None:
        try:
            with pool.connection(timeout=timeout) as conn:
                row = conn.execute(
                    "SELECT current_setting('max_connections')::int,"
                    " current_setting('superuser_reserved_connections')::int,"
                    " coalesce(current_setting('reserved_connections', true), '0')::int"
                ).fetchone()
            out.append(ServerLimits(max_connections=row[0], reserved=row[1] + row[2]))
        except Exception as e:
            out.append(ServerLimits(error=mask_password(f"{type(e).__name__}: {e}".strip())))

    th = threading.Thread(target=run, name=f"{pool.name}-limits", daemon=True)
    th.start()
    th.join(timeout)
    return out[0] if out else ServerLimits(error=f"no answer within {timeout:g} sec")
