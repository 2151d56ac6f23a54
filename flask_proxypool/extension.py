"""The Flask extension: `ProxyPool`, the one place that registers with `app`.

`init_app` validates `PROXYPOOL_POOLS`, keeps the app's state in
`app.extensions["proxypool"]` (`flask_proxypool.state`), registers the
hooks that give resources back (`flask_proxypool.binding`), the 503
handlers, the `flask proxypool` commands and the optional stats endpoint.
It opens nothing: pools are made on first use.
"""

from __future__ import annotations

import functools
import logging
import typing as t

from flask import Flask, Response, jsonify, request

from . import binding, deployment_checks
from .binding import held
from .cli import proxypool_cli
from .config import merge_pools, parse_pools
from .contexts import SEPARATE_REQUEST_CONTEXT, app_ctx
from .endpoint import register_stats_endpoint
from .errors import ConfigError, PoolUnavailable, UsageError
from .kinds.psycopg import pooler_lost_server
from .masking import mask_password
from .pool import Pool
from .state import EXTENSION_KEY, AppPools, Throttle, app_state, close_all, registrations
from .stats import PoolStats

__all__ = ["ProxyPool", "close_all", "registrations"]

logger = logging.getLogger("flask_proxypool")


def _log_503(key: str, msg: str, *args: object) -> None:
    """Log a 503, throttled per app and per `key` (pool and cause)."""
    ctx = app_ctx(None)
    state = None if ctx is None else ctx.app.extensions.get(EXTENSION_KEY)
    throttle = state.throttle_503 if isinstance(state, AppPools) else Throttle(0.0)
    skipped = throttle.admit(key)
    if skipped is None:
        return
    if skipped:
        msg += f" ({skipped} more like it in the last {throttle.interval:g} sec not logged)"
    logger.warning(msg, *args)


def _service_unavailable(pool: str | None, detail: str) -> tuple[Response, int, dict[str, str]]:
    ctx = app_ctx(None)
    retry = app_state(ctx.app).retry_after if ctx is not None else 1
    body = jsonify(error="service unavailable", pool=pool, detail=detail, retry_after=retry)
    return body, 503, {"Retry-After": str(retry)}


def _unavailable(e: PoolUnavailable) -> tuple[Response, int, dict[str, str]]:
    """HTTP 503 with Retry-After; the body names the pool, never its target."""
    _log_503(f"{e.pool}:{type(e).__name__}", "pool %r: 503: %s", e.pool, mask_password(str(e)))
    what = {
        "PoolTimeout": "timed out waiting for a resource",
        "TooManyWaiting": "too many requests waiting for a resource",
        "ConnectFailed": "the backing service is unavailable",
        # not an outage: the server refused the pool's credentials (the log says which pool and server)
        "AuthenticationFailed": "authentication failed: the backing service refused the pool's credentials",
    }.get(type(e).__name__, "no resource available")
    return _service_unavailable(e.pool, what)


def _database_lost(e: Exception) -> tuple[Response, int, dict[str, str]]:
    """psycopg.OperationalError in a view (server restarted, connection lost): 503, not 500.

    The connection is discarded at teardown if it is broken; the next
    request gets a new one.
    """
    ctx = app_ctx(None)
    names = sorted(held(ctx) or ()) if ctx is not None else []
    _log_503(
        f"{names}:OperationalError",
        "pool %s: 503: database operational error: %s",
        ", ".join(map(repr, names)) or "(none held)",
        " ".join(mask_password(str(e)).split()),  # masked first: a known password is matched as written
    )
    if pooler_lost_server(e):
        return _service_unavailable(None, "the connection pooler lost the database server")
    return _service_unavailable(None, "the database connection failed")


def _held_connection_lost() -> bool:
    """True if a psycopg connection this context holds is broken (the server or the pooler dropped it)."""
    ctx = app_ctx(None)
    bindings = held(ctx) if ctx is not None else None
    for b in (bindings or {}).values():
        if b.pool is not None and b.pool.kind.name == "psycopg" and getattr(b.resource, "broken", False):
            return True
    return False


def _lost_is_503(app: Flask, original: t.Callable[[Exception], t.Any], e: Exception) -> t.Any:
    """Wraps `app.handle_user_exception`: a psycopg error that is not an `OperationalError`, raised as the
    connection broke, is a 503 like an `OperationalError`, unless the app has a handler for it.

    psycopg raises `InternalError("received 2 results from command 'BEGIN'")` when PgBouncer
    answers a BEGIN (or COMMIT) with its error and closes the connection: libpq reports the
    error and the lost connection as two results. The connection is broken, so the pool
    discards it at teardown.
    """
    import psycopg

    if isinstance(e, psycopg.Error) and not isinstance(e, psycopg.OperationalError) and _held_connection_lost():
        find = getattr(app, "_find_error_handler", None)  # Flask >= 2.0.1; without it, ours only
        if find is None or find(e, request.blueprints) is None:
            return _database_lost(e)
    return original(e)


class ProxyPool:
    """Registers the pools of `PROXYPOOL_POOLS` on an app (or several).

    `ProxyPool(app)`, or `pools = ProxyPool()` then `pools.init_app(app)`
    in an app factory. One instance may serve many apps; each app has its own
    pools.

    Configuration keys (`app.config`):

    - `PROXYPOOL_POOLS`: `{pool name: {key: value}}` (or `{pool name:
      conninfo}`); see the configuration reference.
    - `PROXYPOOL_RETRY_AFTER`: seconds sent in `Retry-After` with a 503
      (default 1).
    - `PROXYPOOL_HOSTS`: hosts that run this app with the same settings
      (default 1), for the run-time check of all workers' connections
      against the server's `max_connections` (`flask_proxypool.deployment_checks`).

    Args:
        pools: defaults for `PROXYPOOL_POOLS`, per pool name; merged key by
            key, the app's config winning for each key it sets.
    """

    def __init__(self, app: Flask | None = None, *, pools: t.Mapping[str, t.Any] | None = None) -> None:
        self.default_pools: t.Mapping[str, t.Any] = pools if pools is not None else {}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Validate the app's pools and register the teardown; opens nothing."""
        if EXTENSION_KEY in app.extensions:
            raise UsageError(
                f"flask_proxypool is already registered on app {app.name!r}: call ProxyPool(app) "
                "or init_app(app) once per app"
            )
        raw = app.config.get("PROXYPOOL_POOLS")
        if raw is None and not self.default_pools:
            raise ConfigError(
                "PROXYPOOL_POOLS is not set: give each pool a name and settings, e.g. "
                "app.config['PROXYPOOL_POOLS'] = {'db': {'conninfo': 'postgresql://app@localhost/app'}} "
                "or {'db': {'kind': 'sqlite3', 'database': 'app.sqlite3'}}"
            )
        configs = parse_pools(merge_pools(self.default_pools, raw), app.instance_path)
        retry_after = app.config.setdefault("PROXYPOOL_RETRY_AFTER", 1)
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigError(f"PROXYPOOL_RETRY_AFTER must be an int >= 0 (seconds), got {retry_after!r}")
        hosts = app.config.get("PROXYPOOL_HOSTS", 1)  # not set back: `flask proxypool size` tells unset from 1
        if isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1:
            raise ConfigError(
                f"PROXYPOOL_HOSTS must be an int >= 1 (hosts running this app with the same pools), got {hosts!r}"
            )
        app.extensions[EXTENSION_KEY] = AppPools(app.name, configs, retry_after)
        if any(c.kind == "psycopg" for c in configs.values()):
            # before mark_failed wraps it: the request is still marked failed
            app.handle_user_exception = functools.partial(  # type: ignore[method-assign]
                _lost_is_503, app, app.handle_user_exception
            )
        # Flask runs these hooks in reverse order of registration: put ours first
        # so they run last, after every other hook (even ones registered before
        # init_app) has had its chance to use a proxy.
        if SEPARATE_REQUEST_CONTEXT:
            app.after_request_funcs.setdefault(None, []).insert(0, binding.after_request)
            if any(c.options.get("on_return") == "commit" for c in configs.values()):
                # Every exception raised while dispatching (view, before_request) goes
                # through this public method, handled or not; Flask has no signal for
                # the handled ones.
                app.handle_user_exception = functools.partial(  # type: ignore[method-assign]
                    binding.mark_failed, app.handle_user_exception
                )
            app.teardown_request_funcs.setdefault(None, []).insert(0, binding.teardown_request)
        app.teardown_appcontext_funcs.insert(0, binding.teardown_appcontext)
        _skip_sync_check(app)
        handlers = app.error_handler_spec.get(None, {}).get(None, {})
        if PoolUnavailable not in handlers:  # a handler for a subclass still wins for that subclass
            app.register_error_handler(PoolUnavailable, _unavailable)
        if any(c.kind == "psycopg" for c in configs.values()):
            import psycopg

            if psycopg.OperationalError not in handlers:
                app.register_error_handler(psycopg.OperationalError, _database_lost)
        app.cli.add_command(proxypool_cli)  # flask proxypool stats|check|size
        register_stats_endpoint(app)  # PROXYPOOL_STATS_URL, off by default
        deployment_checks.install(app, hosts)  # warnings at the first request, and in a reloader's parent

    def pool(self, name: str, app: Flask | None = None) -> Pool[t.Any]:
        """The `Pool` named `name` of `app` (default: the current app)."""
        return app_state(_app(app)).pool(name)

    def stats(self, app: Flask | None = None) -> dict[str, PoolStats]:
        """Stats per pool of `app` (default: the current app)."""
        return app_state(_app(app)).stats()

    def close(self, app: Flask | None = None, timeout: float | None = None) -> None:
        """Close the pools of `app` (default: the current app), waiting for resources out."""
        app_state(_app(app)).close(timeout)


def _skip_sync_check(app: Flask) -> None:
    """Let our own hooks past `app.ensure_sync` untested; every other function goes to the app's own.

    Flask calls each hook through `ensure_sync`, which runs
    `inspect.iscoroutinefunction` on it every time: 1.3 µs a hook on
    free-threaded 3.13t (0.25 µs on 3.11), so up to 4 µs of every request for
    three hooks known to be plain functions. Identity tests only: whatever
    else the app asks about (views, other hooks, unhashable callables) is
    answered by the `ensure_sync` the app had, its subclass's included.
    """
    original = app.ensure_sync

    def ensure_sync(
        func: t.Callable[..., t.Any],
        _a: object = binding.teardown_appcontext,
        _r: object = binding.teardown_request,
        _f: object = binding.after_request,
    ) -> t.Callable[..., t.Any]:
        if func is _a or func is _r or func is _f:
            return func
        return original(func)

    app.ensure_sync = ensure_sync  # type: ignore[method-assign]


def _app(app: Flask | None) -> Flask:
    if app is not None:
        return app
    ctx = app_ctx(None)
    if ctx is None:
        raise UsageError("flask_proxypool: no app given and no app context: pass app=...")
    return t.cast(Flask, ctx.app)
