"""A database server's connection limits: which server a pool uses, what it accepts, and whether all workers fit.

Every worker has its own pools, so a server sees `workers x max_size`
connections per pool, summed over the pools that use it; PostgreSQL accepts
`max_connections` less the reserved slots from an ordinary role.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import typing as t

from .._deadline import DeadlineExceeded, run_with_deadline
from ..masking import mask_password
from ..stats import PoolStats
from .deployment import Deployment
from .evidence import DEFAULT_THRESHOLDS, PoolAdvice, Thresholds

if t.TYPE_CHECKING:
    from ..pool import Pool

__all__ = ["ServerAdvice", "ServerLimits", "advise_server", "database_user", "query_server_limits", "server_key"]


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """A PostgreSQL server's connection limits (`SHOW max_connections`), or why they are unknown."""

    max_connections: int | None = None
    reserved: int = 0  #: superuser_reserved_connections + reserved_connections
    error: str | None = None
    given: bool = False  #: stated on the command line (`--max-connections`), not asked of the server

    @property
    def available(self) -> int | None:
        """Connections an ordinary role may open."""
        return None if self.max_connections is None else self.max_connections - self.reserved


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


def _params(stats: PoolStats) -> dict[str, t.Any] | None:
    """A psycopg pool's libpq parameters (conninfo, then separate keys); None if the conninfo does not parse."""
    cfg = stats.config
    try:
        from psycopg.conninfo import conninfo_to_dict

        params = dict(conninfo_to_dict(cfg.get("conninfo", stats.target)))
    except Exception:
        return None
    params.update({k: cfg[k] for k in ("host", "port", "user", "dbname") if cfg.get(k)})
    return params


def server_key(stats: PoolStats) -> str | None:
    """`host:port` of a psycopg pool's server (the limits are per server); None for other kinds.

    For a pool with `pgbouncer: "transaction"` that is PgBouncer's address.
    """
    if stats.kind != "psycopg":
        return None
    params = _params(stats)
    if params is None:
        return mask_password(str(stats.config.get("conninfo", stats.target)))
    host = params.get("host") or os.environ.get("PGHOST") or "local socket"
    port = params.get("port") or os.environ.get("PGPORT") or "5432"
    return f"{host}:{port}"


def database_user(stats: PoolStats) -> tuple[str, str] | None:
    """(database, user) a psycopg pool logs in as, libpq's defaults included: PgBouncer keeps one pool per pair."""
    if stats.kind != "psycopg":
        return None
    params = _params(stats)
    if params is None:
        return None
    import getpass

    user = params.get("user") or os.environ.get("PGUSER") or getpass.getuser()
    return str(params.get("dbname") or os.environ.get("PGDATABASE") or user), str(user)


_LIMITS_QUERY = (
    "SELECT current_setting('max_connections')::int,"
    " current_setting('superuser_reserved_connections')::int,"
    " coalesce(current_setting('reserved_connections', true), '0')::int"
)


def query_server_limits(pool: Pool[t.Any], timeout: float = 5.0) -> ServerLimits:
    """`max_connections` and the reserved slots of a psycopg pool's server, through the pool.

    The calling thread takes the connection and gives it back, so a
    request thread asking gets its own (see "Affinity" in `pool`) and
    nobody else's moves; only the query runs in a helper thread, bounded by
    `timeout` in all. A query still running then gives its connection back
    when it ends; any failure gives limits with `error` set instead of
    raising.
    """
    deadline = time.monotonic() + timeout
    try:
        conn = pool.getconn(timeout=timeout)
    except Exception as e:
        return _failed(e)
    lock = threading.Lock()
    # "asking" until one side ends it: the query's thread sets "answered", the caller "left" when it gives up;
    # whichever comes second gives the connection back
    state = ["asking"]

    def ask() -> ServerLimits:
        try:
            row = conn.execute(_LIMITS_QUERY).fetchone()
            return ServerLimits(max_connections=row[0], reserved=row[1] + row[2])
        finally:
            with lock:
                left, state[0] = state[0] == "left", "answered"
            if left:
                pool.putconn(conn, failed=True)

    try:
        return run_with_deadline(ask, max(0.0, deadline - time.monotonic()), f"{pool.name}-limits")
    except DeadlineExceeded:
        return ServerLimits(error=f"no answer within {timeout:g} sec")
    except Exception as e:
        return _failed(e)
    finally:
        with lock:
            answered, state[0] = state[0] == "answered", "left"
        if answered:
            pool.putconn(conn, failed=True)


def _failed(e: Exception) -> ServerLimits:
    return ServerLimits(error=mask_password(f"{type(e).__name__}: {e}".strip()))


def advise_server(
    server: str,
    pools: t.Sequence[PoolAdvice],
    deployment: Deployment,
    limits: ServerLimits | None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    hosts: int | None = None,
) -> ServerAdvice:
    """Total connections of all workers (of `hosts` hosts, if given) to one server, against its `max_connections`."""
    w = deployment.workers * (hosts or 1)
    conns = w * sum(p.max_size for p in pools)
    suggested = w * sum(p.suggested_max_size for p in pools)
    shape = f"{deployment.workers} worker(s)" if hosts is None else f"{hosts} host(s) x {deployment.workers} worker(s)"
    what = f"{shape} x ({' + '.join(f'{p.pool} {p.max_size}' for p in pools)}) = {conns} connections"
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
        given = ", given" if limits.given else ""
        reasons.append(f"within the {available} the server accepts (max_connections {limits.max_connections}{given})")
    if suggested != conns:
        reasons.append(f"with the suggested sizes: {suggested} connections")
    return ServerAdvice(
        server=server,
        pools=tuple(p.pool for p in pools),
        connections=conns,
        suggested_connections=suggested,
        max_connections=limits.max_connections if limits else None,
        available=available,
        verdict=verdict,
        reasons=tuple(reasons),
    )
