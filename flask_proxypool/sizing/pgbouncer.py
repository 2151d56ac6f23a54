"""Pools behind PgBouncer in transaction mode: two budgets instead of one.

A pool with `pgbouncer: "transaction"` connects to PgBouncer, not to
PostgreSQL, so the check of `limits` (all workers' connections against
`max_connections`) is the wrong one. There are two:

* client side: `hosts x workers x max_size` (summed over the app's pools
  behind one PgBouncer) against PgBouncer's `max_client_conn`;
* server side: PgBouncer's pools, one per database/user pair, each of
  `pool_size` (`default_pool_size` unless the database sets its own)
  plus `reserve_pool_size`, against PostgreSQL's `max_connections` less
  the reserved slots.

PgBouncer's settings are readable only on its admin console (database
`pgbouncer`, for `admin_users` and `stats_users`): `query_bouncer` reads
them there with the pool's own login. When that is refused, or for numbers
the user wants to state, `BouncerOptions` (the command line) fill in, and
PgBouncer's own defaults fill the rest; the advice names every number that
was not read (`BouncerAdvice.assumed`). PostgreSQL's `max_connections` is
asked through PgBouncer (`limits.query_server_limits` through the pool): the
query runs on a server connection of the app's database, so the answer is
the server behind PgBouncer's pool, which is the one the server side needs.
"""

from __future__ import annotations

import dataclasses
import typing as t

from .._deadline import DeadlineExceeded, run_with_deadline
from ..masking import mask_password
from .deployment import Deployment
from .evidence import DEFAULT_THRESHOLDS, PoolAdvice, Thresholds
from .limits import ServerLimits

__all__ = ["BouncerAdvice", "BouncerOptions", "BouncerPool", "BouncerSettings", "advise_bouncer", "query_bouncer"]

#: PgBouncer's own defaults (its documentation), used when nothing else says
PGBOUNCER_DEFAULTS = {"max_client_conn": 100, "default_pool_size": 20, "reserve_pool_size": 0}

_ADMIN_DB = "pgbouncer"


@dataclasses.dataclass(frozen=True)
class BouncerPool:
    """One of PgBouncer's server-side pools: a database/user pair and the server connections it may open."""

    database: str
    user: str
    pool_size: int
    reserve_pool: int = 0

    @property
    def servers(self) -> int:
        return self.pool_size + self.reserve_pool


@dataclasses.dataclass(frozen=True)
class BouncerSettings:
    """What PgBouncer's admin console said (`SHOW VERSION`, `SHOW CONFIG`, `SHOW DATABASES`, `SHOW POOLS`),
    or why it could not be read (`error`)."""

    version: str | None = None
    max_client_conn: int | None = None
    default_pool_size: int | None = None
    reserve_pool_size: int | None = None
    pool_mode: str | None = None
    #: the pools to the app's PostgreSQL server: the app's pairs and those in SHOW POOLS
    pools: tuple[BouncerPool, ...] = ()
    #: database -> max_db_connections where it is set (0: no cap)
    database_caps: t.Mapping[str, int] = dataclasses.field(default_factory=dict)
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class BouncerOptions:
    """Numbers stated on the command line; each one wins over what the console said."""

    max_client_conn: int | None = None
    pool_size: int | None = None  #: server connections per database/user pair (`default_pool_size`)
    pools: int | None = None  #: database/user pairs PgBouncer serves on the app's PostgreSQL server


@dataclasses.dataclass(frozen=True)
class BouncerAdvice:
    """One PgBouncer: the client-side budget and the server-side budget, each with its verdict."""

    bouncer: str
    pools: tuple[str, ...]
    version: str | None
    settings_from: str  #: ``admin console`` or ``options and defaults``, with the console's error
    hosts: int
    clients: int  #: hosts x workers x sum of max_size
    max_client_conn: int
    client_verdict: str  #: ``ok``, ``tight`` or ``over``
    client_reasons: tuple[str, ...]
    servers: int  #: server connections PgBouncer may open to PostgreSQL
    max_connections: int | None
    available: int | None
    server_verdict: str  #: ``ok``, ``tight``, ``over`` or ``unknown``
    server_reasons: tuple[str, ...]
    assumed: tuple[str, ...]  #: the numbers neither read nor given

    def to_dict(self) -> dict[str, t.Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _int(value: t.Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _admin(conninfo: str, connect_timeout: int) -> dict[str, list[dict[str, t.Any]]]:
    """The console's answers; it speaks the simple query protocol only, which psycopg uses without parameters."""
    import psycopg
    from psycopg.conninfo import make_conninfo

    out: dict[str, list[dict[str, t.Any]]] = {}
    # target_session_attrs would make libpq question the console as if it were a server
    target = make_conninfo(conninfo, dbname=_ADMIN_DB, connect_timeout=connect_timeout, target_session_attrs="any")
    with psycopg.connect(target, autocommit=True, prepare_threshold=None) as conn, conn.cursor() as cur:
        for command in ("SHOW VERSION", "SHOW CONFIG", "SHOW DATABASES", "SHOW POOLS"):
            cur.execute(command.encode())
            names = [c.name for c in cur.description or ()]
            out[command] = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return out


def query_bouncer(conninfo: str, own: t.Iterable[tuple[str, str]], timeout: float = 5.0) -> BouncerSettings:
    """PgBouncer's settings from its admin console, logged in as the pool logs in (`conninfo` with its password).

    `own` are the app's (database, user) pairs behind this PgBouncer; the
    server-side pools are those and every pair `SHOW POOLS` lists on the same
    PostgreSQL server (PgBouncer opens a pool at a pair's first login, so
    pairs not used since its start are not seen). Bounded by `timeout`; any
    failure (the user is not in `admin_users`/`stats_users`: "not allowed")
    gives settings with `error` set instead of raising.
    """
    try:
        answers = run_with_deadline(lambda: _admin(conninfo, max(1, round(timeout))), timeout, "pgbouncer-admin")
    except DeadlineExceeded:
        return BouncerSettings(error=f"admin console: no answer within {timeout:g} sec")
    except Exception as e:
        text = " ".join(mask_password(f"{type(e).__name__}: {e}").split())
        return BouncerSettings(error=f"admin console: {text}")
    config = {row["key"]: row["value"] for row in answers["SHOW CONFIG"]}
    default_size = _int(config.get("default_pool_size"))
    reserve = _int(config.get("reserve_pool_size")) or 0
    global_cap = _int(config.get("max_db_connections")) or 0
    databases = {row["name"]: row for row in answers["SHOW DATABASES"] if row["name"] != _ADMIN_DB}
    own = list(own)
    # the PostgreSQL server of the app's databases, as PgBouncer's [databases] section names it
    targets = {(databases[d]["host"], databases[d]["port"]) for d, _ in own if d in databases}

    def same_server(db: str) -> bool:
        # a database not listed yet comes from the `*` fallback, used only when no entry matches
        return db not in databases or not targets or (databases[db]["host"], databases[db]["port"]) in targets

    pairs = dict.fromkeys(own)
    pairs.update(dict.fromkeys((r["database"], r["user"]) for r in answers["SHOW POOLS"] if r["database"] != _ADMIN_DB))
    pools, caps = [], {}
    for db, user in pairs:
        if not same_server(db):
            continue
        row = databases.get(db, {})
        size = _int(row.get("pool_size"))
        extra = _int(row.get("reserve_pool"))
        pools.append(
            BouncerPool(
                db,
                user,
                size if size is not None and size >= 0 else (default_size or 0),
                extra if extra is not None and extra >= 0 else reserve,
            )
        )
        cap = _int(row.get("max_connections")) or global_cap
        if cap > 0:
            caps[db] = cap
    version = answers["SHOW VERSION"][0]["version"] if answers["SHOW VERSION"] else None
    return BouncerSettings(
        version=version,
        max_client_conn=_int(config.get("max_client_conn")),
        default_pool_size=default_size,
        reserve_pool_size=reserve,
        pool_mode=config.get("pool_mode"),
        pools=tuple(pools),
        database_caps=caps,
    )


def _verdict(used: int, limit: int, thresholds: Thresholds) -> str:
    if used > limit:
        return "over"
    return "tight" if used > thresholds.tight * limit else "ok"


def _server_pools(
    settings: BouncerSettings, options: BouncerOptions, own: t.Sequence[tuple[str, str]], assumed: list[str]
) -> list[BouncerPool]:
    """PgBouncer's pools on the app's server: as read, with a stated pool size or count applied over them."""
    size = options.pool_size
    if size is None and settings.default_pool_size is None:
        size = PGBOUNCER_DEFAULTS["default_pool_size"]
        assumed.append(f"default_pool_size {size} (PgBouncer's default; --pgbouncer-pool-size N)")
    if settings.reserve_pool_size is None:
        assumed.append("reserve_pool_size 0 (PgBouncer's default)")
    pools = list(settings.pools) or [BouncerPool(db, user, 0) for db, user in own]
    if size is not None:
        pools = [dataclasses.replace(p, pool_size=size) for p in pools]
    count = options.pools
    if count is None and not settings.pools:
        assumed.append(f"{len(pools)} database/user pair(s): this app's only (--pgbouncer-pools N)")
    if count is not None and count != len(pools):
        pools = pools[:count]
        like = size if size is not None else (settings.default_pool_size or 0)
        pools += [BouncerPool("?", "?", like, settings.reserve_pool_size or 0)] * (count - len(pools))
    return pools


def advise_bouncer(
    bouncer: str,
    pools: t.Sequence[PoolAdvice],
    deployment: Deployment,
    *,
    own: t.Sequence[tuple[str, str]] = (),
    per_pair: t.Mapping[tuple[str, str], int] | None = None,
    settings: BouncerSettings | None = None,
    options: BouncerOptions | None = None,
    limits: ServerLimits | None = None,
    hosts: int | None = None,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> BouncerAdvice:
    """Both budgets of one PgBouncer; a number neither read nor given is PgBouncer's default, and named in `assumed`.

    Args:
        own: the app's (database, user) pairs behind it.
        per_pair: pool connections per worker for each pair (sum of `max_size`), for the queueing remark.
        settings: what `query_bouncer` read (None: not asked).
        limits: PostgreSQL's limits, asked through PgBouncer or given.
    """
    settings = settings or BouncerSettings(error="not asked")
    options = options or BouncerOptions()
    assumed: list[str] = []
    if hosts is None:
        assumed.append("1 host (--hosts N: every host runs its own workers and pools)")
    n_hosts = hosts or 1
    per_worker = sum(p.max_size for p in pools)
    clients = n_hosts * deployment.workers * per_worker

    # -- client side: every worker's pools hold client connections to PgBouncer
    max_client = options.max_client_conn or settings.max_client_conn
    if max_client is None:
        max_client = PGBOUNCER_DEFAULTS["max_client_conn"]
        assumed.append(f"max_client_conn {max_client} (PgBouncer's default; --max-client-conn N)")
    sizes = " + ".join(f"{p.pool} {p.max_size}" for p in pools)
    client_reasons = [f"{n_hosts} host(s) x {deployment.workers} worker(s) x ({sizes}) = {clients} client connections"]
    client_verdict = _verdict(clients, max_client, thresholds)
    if client_verdict == "over":
        client_reasons.append(
            f"more than max_client_conn {max_client}: PgBouncer refuses the rest at login; raise "
            f"max_client_conn to at least {clients} (plus psql, migrations, other apps), or lower max_size"
        )
    elif client_verdict == "tight":
        client_reasons.append(
            f"{clients} of max_client_conn {max_client}: only {max_client - clients} left for other clients"
        )
    else:
        client_reasons.append(f"within max_client_conn {max_client}")

    # -- server side: PgBouncer's pools against PostgreSQL
    server_pools = _server_pools(settings, options, own, assumed)
    by_db: dict[str, int] = {}
    for sp in server_pools:
        by_db[sp.database] = by_db.get(sp.database, 0) + sp.servers
    servers = sum(min(n, settings.database_caps.get(db) or n) for db, n in by_db.items())
    shown = ", ".join(
        f"{sp.database}/{sp.user} {sp.pool_size}" + (f"+{sp.reserve_pool}" if sp.reserve_pool else "")
        for sp in server_pools
    )
    server_reasons = [
        f"{len(server_pools)} PgBouncer pool(s) (database/user: size) {shown} = {servers} server connections"
    ]
    capped = {db: cap for db, cap in settings.database_caps.items() if db in by_db and cap < by_db[db]}
    if capped:
        server_reasons.append("capped by max_db_connections: " + ", ".join(f"{db} {cap}" for db, cap in capped.items()))
    available = limits.available if limits else None
    if limits is None or available is None:
        server_verdict = "unknown"
        why = limits.error if limits and limits.error else "not queried"
        server_reasons.append(f"PostgreSQL's max_connections unknown ({why}; --max-connections N)")
    else:
        server_verdict = _verdict(servers, available, thresholds)
        where = "given" if limits.given else "read through PgBouncer"
        accepts = f"max_connections {limits.max_connections} - {limits.reserved} reserved, {where}"
        if server_verdict == "over":
            server_reasons.append(
                f"more than the {available} PostgreSQL accepts ({accepts}): lower default_pool_size or "
                "reserve_pool_size, set max_db_connections, or raise max_connections"
            )
        elif server_verdict == "tight":
            server_reasons.append(
                f"{servers} of the {available} PostgreSQL accepts ({accepts}): only {available - servers} left "
                "for direct clients (psql, migrations, replication)"
            )
        else:
            server_reasons.append(f"within the {available} PostgreSQL accepts ({accepts})")
    sizes_by_pair = {(sp.database, sp.user): sp.pool_size for sp in server_pools}
    for pair, count in (per_pair or {}).items():
        size = sizes_by_pair.get(pair)
        pair_clients = n_hosts * deployment.workers * count
        if size is not None and pair_clients > size:
            server_reasons.append(
                f"{pair_clients} clients share {size} server connection(s) for {pair[0]}/{pair[1]}: beyond {size} "
                "transactions at once the rest wait inside PgBouncer, unseen by the pool's stats and timeout "
                "(SHOW POOLS: cl_waiting, maxwait; PgBouncer's query_wait_timeout bounds it)"
            )
    if settings.pool_mode is not None and settings.pool_mode != "transaction":
        server_reasons.append(f"PgBouncer says pool_mode = {settings.pool_mode}, the pool says transaction")
    if options.max_client_conn and settings.max_client_conn and options.max_client_conn != settings.max_client_conn:
        client_reasons.append(
            f"--max-client-conn {options.max_client_conn} used; PgBouncer says {settings.max_client_conn}"
        )
    if settings.error is None:
        source = "admin console"
    else:
        source = f"options and defaults ({settings.error})"
    return BouncerAdvice(
        bouncer=bouncer,
        pools=tuple(p.pool for p in pools),
        version=settings.version,
        settings_from=source,
        hosts=n_hosts,
        clients=clients,
        max_client_conn=max_client,
        client_verdict=client_verdict,
        client_reasons=tuple(client_reasons),
        servers=servers,
        max_connections=limits.max_connections if limits else None,
        available=available,
        server_verdict=server_verdict,
        server_reasons=tuple(server_reasons),
        assumed=tuple(assumed),
    )
