"""`flask --app myapp proxypool stats|check|size|held`: the pools seen from a terminal.

Registered on every app by `flask_proxypool.ProxyPool.init_app`.

A CLI command runs in a process of its own, with pools of its own: `stats`
shows *that* process (useful with in-process load, a script or a shell
session), not a running server's workers. For a server's numbers, use the
stats endpoint (`PROXYPOOL_STATS_URL`) or the Prometheus metrics
(`flask_proxypool.metrics`), and feed the endpoint's JSON to
`proxypool size --stats FILE`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import typing as t
from concurrent.futures import ThreadPoolExecutor

import click
from flask import current_app
from flask.cli import AppGroup

from ._deadline import DeadlineExceeded, run_with_deadline
from .state import AppPools, app_state
from .masking import mask_password
from .stats import WINDOW, PoolStats

__all__ = ["proxypool_cli", "render_held", "render_stats"]

proxypool_cli = AppGroup(
    "proxypool",
    help="Pool stats, a deploy-time connection check, and sizing advice (flask_proxypool).",
)


def _state() -> AppPools:
    return app_state(current_app)


def _names(state: AppPools, wanted: t.Sequence[str]) -> list[str]:
    unknown = [n for n in wanted if n not in state.configs]
    if unknown:
        raise click.BadParameter(
            f"no pool named {', '.join(map(repr, unknown))}; configured pools: {', '.join(state.configs)}",
            param_hint="--pool",
        )
    return list(wanted) or list(state.configs)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def render_stats(stats: PoolStats) -> str:
    """One pool's stats as a readable block of text (times in milliseconds)."""
    s = stats
    waits_in_window = min(s.wait_count, WINDOW)
    holds_in_window = min(max(s.checkouts - s.in_use, 0), WINDOW)
    closed = ", ".join(f"{k} {v}" for k, v in sorted(s.closed_by_reason.items())) or "none"
    waited = f"{s.wait_count / s.checkouts:.1%}" if s.checkouts else "-"
    max_hold = s.config.get("max_hold", 0.0)
    lines = [
        f"pool {s.name!r}  {s.kind}  {s.target}",
        f"  size        {s.size} of max {s.max_size} (min {s.min_size}): "
        f"{s.in_use} in use, {s.idle} idle, {s.waiting} waiting",
        f"  checkouts   {s.checkouts}   waited {s.wait_count} ({waited})   timeouts {s.timeouts}   "
        f"refused {s.refused}   errors {s.errors}   connect failures {s.connect_failures}",
        f"  resources   created {s.created}   closed {s.closed} (by reason: {closed})",
        f"  wait ms     p50 {_ms(s.wait_time_p50)}   p95 {_ms(s.wait_time_p95)}   p99 {_ms(s.wait_time_p99)}   "
        f"max {_ms(s.wait_time_max)}   (last {waits_in_window} waits)",
        f"  hold ms     p50 {_ms(s.hold_time_p50)}   p95 {_ms(s.hold_time_p95)}   p99 {_ms(s.hold_time_p99)}   "
        f"max {_ms(s.hold_time_max)}   (last {holds_in_window} returns)",
        f"  long held   {s.long_held}"
        + (
            f" (max_hold {max_hold:g} s, {s.config.get('max_hold_action', 'report')})"
            if max_hold
            else " (max_hold off)"
        )
        + f"   reclaimed {s.reclaimed}   oldest hold ms {_ms(s.oldest_hold)}",
    ]
    if s.top_holders:
        width = max(24, *(len(str(h["holder"])) for h in s.top_holders))
        lines.append("  top holders (longest hold in the window):")
        lines.append(f"    {'holder':<{width}}  {'max ms':>9}  {'mean ms':>9}  {'count':>6}")
        for h in s.top_holders:
            lines.append(f"    {str(h['holder']):<{width}}  {_ms(h['max']):>9}  {_ms(h['mean']):>9}  {h['count']:>6}")
    return "\n".join(lines)


@proxypool_cli.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print {pool name: stats} as JSON (passwords masked).")
@click.option("--pool", "pools", multiple=True, metavar="NAME", help="Only this pool (repeatable).")
def stats_command(as_json: bool, pools: tuple[str, ...]) -> None:
    """Stats of every pool of the app, in this process.

    A CLI process has its own pools: these numbers are the ones of this
    process only. For a running server, read the stats endpoint
    (PROXYPOOL_STATS_URL) or the Prometheus metrics.
    """
    state = _state()
    names = _names(state, pools)
    stats = {n: s for n, s in state.stats().items() if n in names}
    if as_json:
        click.echo(json.dumps({n: s.to_dict() for n, s in stats.items()}, indent=2, allow_nan=False))
        return
    click.echo(
        f"# app {state.app_name!r}, process {os.getpid()}: the pools of this process only "
        "(a server's workers each have their own: use the stats endpoint or Prometheus for those)"
    )
    for s in stats.values():
        click.echo("")
        click.echo(render_stats(s))


def _check_one(state: AppPools, name: str, timeout: float) -> tuple[bool, str, float, t.Any]:
    """(passed, error, seconds, server limits or None) for one pool; a hang counts as failed after `timeout`.

    A psycopg pool that connects straight to PostgreSQL also reads the
    server's max_connections on the same connection, for the warnings.
    """
    from .sizing import ServerLimits
    from .sizing.limits import _LIMITS_QUERY

    start = time.monotonic()
    cfg = state.configs[name]
    read_limits = cfg.kind == "psycopg" and not cfg.kind_options.get("pgbouncer")

    def check() -> ServerLimits | None:
        pool = state.pool(name)
        with pool.connection(timeout=timeout) as res:
            pool.kind.check(res)
            if not read_limits:
                return None
            try:
                row = res.execute(_LIMITS_QUERY).fetchone()
            except Exception as e:
                return ServerLimits(error=mask_password(f"{type(e).__name__}: {e}"))
            return ServerLimits(max_connections=row[0], reserved=row[1] + row[2])

    try:
        # the getconn timeout fires first
        limits = run_with_deadline(check, timeout + 0.5, f"{name}-cli-check")
    except DeadlineExceeded:
        return False, f"no answer within {timeout:g} sec", timeout, None
    except Exception as e:
        # masked first (a known password is matched as written), then one line per pool
        return False, " ".join(mask_password(f"{type(e).__name__}: {e}").split()), time.monotonic() - start, None
    return True, "", time.monotonic() - start, limits


@proxypool_cli.command("check")
@click.option("--pool", "pools", multiple=True, metavar="NAME", help="Only this pool (repeatable).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds each pool may take to give and check a resource (all pools run at once).",
)
def check_command(pools: tuple[str, ...], timeout: float) -> None:
    """Take one resource from each pool and run the full check: a deploy-time smoke test.

    Prints OK or FAILED per pool, with its target (password masked) and the
    error; exits with status 1 naming the pools that failed. Then lists the
    deployment warnings the server would log at run time (pools smaller than
    gunicorn's threads, all workers' connections above max_connections,
    pools the app opens at load time under --preload without the hooks, the
    GIL turned on), reading gunicorn's settings as `size` does; warnings do
    not change the exit status.
    """
    state = _state()
    names = _names(state, pools)
    # what loading the app opened (the app factory), before the checks take anything
    loaded = {n: p.stats().size for n, p in state.opened().items() if not p.closed}
    # all pools at once; each check is bounded by its deadline, so the fan-out ends in time
    with ThreadPoolExecutor(max_workers=len(names) or 1, thread_name_prefix="proxypool-check") as fan_out:
        results = dict(zip(names, fan_out.map(lambda n: _check_one(state, n, timeout), names), strict=True))
    failed = []
    for name in names:
        cfg = state.configs[name]
        target = state.pool(name).kind.describe()
        ok, error, took, _ = results[name]
        if ok:
            click.echo(f"OK      {name}  {cfg.kind}  {target}  ({took * 1000:.1f} ms)")
        else:
            failed.append(name)
            click.echo(f"FAILED  {name}  {cfg.kind}  {target}  {error}")
    limits = {n: r[3] for n, r in results.items() if r[3] is not None}
    for advisory in _deployment_warnings(state, limits, loaded):
        click.echo(f"WARNING {advisory.message}")
    if failed:
        raise click.ClickException(f"proxypool check failed for pool(s): {', '.join(failed)}")


def _libpq_conninfo(state: AppPools, name: str) -> str:
    """A psycopg pool's conninfo with its separate libpq keys merged in (password included: for connecting only)."""
    from psycopg.conninfo import make_conninfo

    from .keys import KIND_KEYS

    options = state.configs[name].kind_options
    params = {k: v for k, v in options.items() if k not in KIND_KEYS["psycopg"]}
    return make_conninfo(options["conninfo"], **params)


def _deployment_warnings(
    state: AppPools, limits_by_pool: t.Mapping[str, t.Any], loaded: t.Mapping[str, int]
) -> list[t.Any]:
    """The run-time deployment warnings (`flask_proxypool.deployment_checks`), for gunicorn's settings here.

    `loaded`: connections each pool had open once the app was loaded; with
    gunicorn's preload and no closing hook, the master would keep them.
    """
    from .deployment_checks import Server, collect, preload_without_hooks
    from .sizing import detect_deployment, server_key

    d = detect_deployment()
    server = Server(
        f"gunicorn {'gthread' if d.threads > 1 and not d.is_async else d.worker_class}",
        workers=d.workers,
        threads=d.threads,
        hint="run gunicorn with --threads {max_size}",
        by_threads=not d.is_async,  # gevent: worker_connections, sized by rate (flask proxypool size)
    )
    limits: dict[str, t.Any] = {}
    for name, lim in limits_by_pool.items():
        key = server_key(dataclasses.replace(state.pool(name).stats(), config=state.configs[name].public()))
        if key is not None:
            limits.setdefault(key, lim)
    hosts = int(current_app.config.get("PROXYPOOL_HOSTS", 1))
    found = collect(state.app_name, state, server, hosts=hosts, limits=limits)
    return found + preload_without_hooks(state.app_name, loaded, d.preload, d.when_ready)


def _rates(given: t.Sequence[str], pools: t.Iterable[str]) -> dict[str, float] | None:
    """`--rate N` for every pool, `--rate POOL=N` for one (wins)."""
    if not given:
        return None
    names = list(pools)
    out: dict[str, float] = {}
    for item in sorted(given, key=lambda g: "=" in g):  # plain numbers first, then per-pool overrides
        name, eq, number = item.rpartition("=")
        try:
            rate = float(number)
        except ValueError:
            rate = -1.0
        if rate <= 0 or (eq and name not in names):
            raise click.BadParameter(
                f"{item!r}: expected N or POOL=N with N > 0 and POOL one of {', '.join(names)}", param_hint="--rate"
            )
        if eq:
            out[name] = rate
        else:
            out.update(dict.fromkeys(names, rate))
    return out


@proxypool_cli.command("size")
@click.option("--workers", type=click.IntRange(min=1), help="Worker processes (default: from gunicorn settings).")
@click.option("--threads", type=click.IntRange(min=1), help="Threads per worker (default: from gunicorn settings).")
@click.option(
    "--gunicorn-config",
    type=click.Path(dir_okay=False),
    help="gunicorn config file (or python:MODULE) to read workers/threads from "
    "(default: GUNICORN_CMD_ARGS' -c, or ./gunicorn.conf.py).",
)
@click.option(
    "--rate",
    "rates",
    multiple=True,
    metavar="[POOL=]N",
    help="Checkouts per second across all workers (about: requests/s that use the pool), for every pool "
    "or for POOL (repeatable); enables Little's law.",
)
@click.option(
    "--stats",
    "stats_file",
    type=click.File("r"),
    help="Stats JSON of a running server (the stats endpoint's body, or 'stats --json'); '-' reads stdin.",
)
@click.option(
    "--hosts",
    type=click.IntRange(min=1),
    help="Hosts running the app, each with these workers (default: the app's PROXYPOOL_HOSTS, else 1, said to "
    "be assumed).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    help="PostgreSQL's max_connections, instead of asking the server (reserved slots then count as 0).",
)
@click.option(
    "--max-client-conn",
    type=click.IntRange(min=1),
    help="PgBouncer's max_client_conn (default: read on its admin console, else PgBouncer's default 100).",
)
@click.option(
    "--pgbouncer-pool-size",
    type=click.IntRange(min=1),
    help="PgBouncer's default_pool_size: server connections per database/user pair "
    "(default: read on its admin console, else PgBouncer's default 20).",
)
@click.option(
    "--pgbouncer-pools",
    type=click.IntRange(min=1),
    help="Database/user pairs PgBouncer serves on the app's PostgreSQL server "
    "(default: read on its admin console, else this app's pairs).",
)
@click.option(
    "--no-server", is_flag=True, help="Do not connect to read the servers' max_connections or PgBouncer's settings."
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds to wait for a server's max_connections, or for PgBouncer's admin console.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the advice as JSON.")
def size_command(
    workers: int | None,
    threads: int | None,
    gunicorn_config: str | None,
    rates: tuple[str, ...],
    stats_file: t.TextIO | None,
    hosts: int | None,
    max_connections: int | None,
    max_client_conn: int | None,
    pgbouncer_pool_size: int | None,
    pgbouncer_pools: int | None,
    no_server: bool,
    timeout: float,
    as_json: bool,
) -> None:
    """Sizing advice: max_size per pool, and the connections all workers open per server.

    Judges the stats of this process, or of --stats FILE (a server's stats
    endpoint body). Workers and threads are read as gunicorn reads them
    (WEB_CONCURRENCY, ./gunicorn.conf.py or -c, GUNICORN_CMD_ARGS), then
    --workers/--threads win; 1 x 1 when nothing says.

    A pool with `pgbouncer: "transaction"` gets two budgets: hosts x workers
    x max_size against PgBouncer's max_client_conn, and PgBouncer's pools
    against PostgreSQL's max_connections. PgBouncer's settings are read on
    its admin console when the pool's user may (admin_users, stats_users),
    else taken from the options; the advice names the numbers it assumed.
    """
    from .sizing import (
        BouncerOptions,
        BouncerSettings,
        ServerLimits,
        advise,
        database_user,
        detect_deployment,
        query_bouncer,
        query_server_limits,
        render_text,
        server_key,
        stats_from_dict,
    )

    state = _state()
    if stats_file is not None:
        try:
            stats = stats_from_dict(json.load(stats_file))
        except (ValueError, TypeError) as e:
            raise click.BadParameter(f"not pool stats JSON: {e}", param_hint="--stats") from None
    else:
        stats = state.stats()
    deployment = detect_deployment(workers, threads, config_file=gunicorn_config)
    servers = {name: server_key(s) for name, s in stats.items()}
    limits: dict[str, ServerLimits] = {}
    bouncers: dict[str, BouncerSettings] = {}
    for name, key in servers.items():
        if key is None:
            continue
        if key not in limits:
            if max_connections is not None:
                limits[key] = ServerLimits(max_connections=max_connections, given=True)
            elif no_server:
                limits[key] = ServerLimits(error="--no-server")
            elif name not in state.configs:
                limits[key] = ServerLimits(error=f"pool {name!r} is not configured in this app")
            else:
                # behind PgBouncer the query runs on one of its server connections: PostgreSQL's own numbers
                limits[key] = query_server_limits(state.pool(name), timeout)
        if key in bouncers or stats[name].config.get("pgbouncer") != "transaction":
            continue
        if no_server:
            bouncers[key] = BouncerSettings(error="--no-server")
        elif name not in state.configs:
            bouncers[key] = BouncerSettings(error=f"pool {name!r} is not configured in this app")
        else:
            own = {p for n, k in servers.items() if k == key and (p := database_user(stats[n])) is not None}
            bouncers[key] = query_bouncer(_libpq_conninfo(state, name), sorted(own), timeout)
    if hosts is None and "PROXYPOOL_HOSTS" in current_app.config:
        hosts = int(current_app.config["PROXYPOOL_HOSTS"])  # checked by init_app
    advice = advise(
        stats,
        deployment,
        rate=_rates(rates, stats),
        servers=servers,
        limits=limits,
        hosts=hosts,
        bouncers=bouncers,
        bouncer_options=BouncerOptions(max_client_conn, pgbouncer_pool_size, pgbouncer_pools),
    )
    if as_json:
        click.echo(json.dumps(advice.to_dict(), indent=2, allow_nan=False))
    else:
        if stats_file is None:
            click.echo(f"# judged from the stats of this process ({os.getpid()}); --stats FILE for a server's")
        click.echo(render_text(advice))


def render_held(held: t.Sequence[t.Mapping[str, t.Any]]) -> str:
    """What is held right now (`PoolStats.held` rows of one or more pools) as a table, oldest first."""
    rows = sorted(held, key=lambda h: -float(h.get("age", 0.0)))
    if not rows:
        return "nothing held"
    pw = max(4, *(len(str(h.get("pool", ""))) for h in rows))
    hw = max(6, *(len(str(h.get("holder", ""))) for h in rows))
    lines = [f"{'pool':<{pw}}  {'holder':<{hw}}  {'age s':>9}  where taken"]
    for h in rows:
        lines.append(
            f"{str(h.get('pool', '')):<{pw}}  {str(h.get('holder', '')):<{hw}}  {float(h.get('age', 0.0)):>9.3f}  "
            f"{h.get('where') or '-'}"
        )
    return "\n".join(lines)


@proxypool_cli.command("held")
@click.option("--pool", "pools", multiple=True, metavar="NAME", help="Only this pool (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@click.option(
    "--stats",
    "stats_file",
    type=click.File("r"),
    help="Stats JSON of a running server's worker (the stats endpoint's body, or 'stats --json'); '-' reads stdin.",
)
def held_command(pools: tuple[str, ...], as_json: bool, stats_file: t.TextIO | None) -> None:
    """What is held right now: pool, holder (endpoint, or thread outside a request), age, where it was taken.

    "where" (file:line) is recorded for takes outside a request (pool.getconn(),
    db.borrow(), a background thread); a request's holder is its endpoint.
    Without --stats this is the pools of this process only.
    """
    from .sizing.advice import stats_from_dict

    state = _state()
    names = _names(state, pools)
    if stats_file is not None:
        try:
            stats = stats_from_dict(json.load(stats_file))
        except (ValueError, TypeError) as e:
            raise click.BadParameter(f"not pool stats JSON: {e}", param_hint="--stats") from None
    else:
        stats = {n: s for n, s in state.stats().items() if n in names}
    held = [dict(h, pool=n) for n, s in stats.items() if n in names for h in s.held]
    held.sort(key=lambda h: -float(h.get("age", 0.0)))
    if as_json:
        click.echo(json.dumps(held, indent=2, allow_nan=False))
        return
    if stats_file is None:
        click.echo(
            f"# app {state.app_name!r}, process {os.getpid()}: held in this process only (--stats FILE for a server's)"
        )
    click.echo(render_held(held))
