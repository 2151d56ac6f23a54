"""The Flask extension: the only module that touches ``app``.

Per-app state lives in ``app.extensions["proxypool"]`` (an :class:`AppPools`).
Pools are made on first use in the process that uses them, so a
``gunicorn --preload`` master that never serves a request opens nothing; a
pool that the master did use is rebuilt empty in each forked child.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import logging
import math
import os
import threading
import time
import typing as t
import weakref

from flask import Flask, Response, jsonify

from .config import PoolConfig, parse_pools
from .errors import ConfigError, PoolUnavailable, UsageError
from .masking import mask_password
from .pool import Pool
from .proxy import HELD, ClosedByView, _cv_request, _get_app_ctx, _get_req_ctx, install_slow_paths
from .stats import PoolStats

__all__ = ["AppPools", "ProxyPool", "app_state"]

logger = logging.getLogger("flask_proxypool")

EXTENSION_KEY = "proxypool"
#: Set on a request context once after_request has decided about commit.
_DECIDED = "_proxypool_decided"
#: Set on a request context when the view (or a before_request hook) raised, handled or not:
#: its work is never committed (Django's ATOMIC_REQUESTS rule).
_FAILED = "_proxypool_failed"
#: Set on an app context whose request's bindings belong to a streamed response until it ends.
_STREAM = "_proxypool_stream"
_ANY = object()

_registries: weakref.WeakSet[AppPools] = weakref.WeakSet()
# Guards _registries (a WeakSet is not thread-safe); replaced in a forked child.
_registries_lock = threading.Lock()


class _Throttle:
    """At most one log line per key every ``interval`` seconds; the next one counts those left out.

    An outage turns every request into a 503: one warning per request would
    bury the log (and slow the server) just when an operator reads it.
    """

    def __init__(self, interval: float = 10.0, clock: t.Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()  # guards _next and _skipped
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: leave this one out. Else log it, saying how many were left out before it."""
        now = self.clock()
        with self._lock:
            if now < self._next.get(key, -math.inf):
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return None
            self._next[key] = now + self.interval
            return self._skipped.pop(key, 0)


class AppPools:
    """One app's pools: validated configs, and the pools made from them on first use."""

    def __init__(self, app_name: str, configs: dict[str, PoolConfig], retry_after: int) -> None:
        self.app_name = app_name
        #: validated configuration per pool name (immutable)
        self.configs = configs
        #: pools configured with ``release: "commit"`` (immutable)
        self.release_at_commit = frozenset(n for n, c in configs.items() if c.release == "commit")
        self.retry_after = retry_after
        #: at most one 503 warning per pool and cause every 10 s
        self.throttle_503 = _Throttle()
        # _lock guards writes to _pools (a pool is made once per name, and
        # close() swaps the dict's content). Readers may read it without the
        # lock: a dict read is atomic on every build (the free-threaded one
        # locks each dict), and a pool read just before a close() raises
        # PoolClosed rather than misbehaving.
        self._pools: dict[str, Pool[t.Any]] = {}
        self._lock = threading.Lock()
        with _registries_lock:
            _registries.add(self)

    def pool(self, name: str) -> Pool[t.Any]:
        """The pool named ``name``, made now if this process has not used it yet."""
        p = self._pools.get(name)
        if p is not None:
            return p
        with self._lock:
            p = self._pools.get(name)
            if p is None:
                cfg = self.configs.get(name)
                if cfg is None:
                    raise UsageError(
                        f"flask_proxypool: no pool named {name!r} on app {self.app_name!r}; "
                        f"configured pools: {', '.join(sorted(self.configs))}. "
                        f"Add it to PROXYPOOL_POOLS or use one of those names."
                    )
                p = cfg.make_pool()
                self._pools[name] = p
                logger.debug("pool %r made in process %d: %r", name, os.getpid(), p)
            return p

    def opened(self) -> dict[str, Pool[t.Any]]:
        """The pools this process has made so far."""
        with self._lock:
            return dict(self._pools)

    def made(self, name: str) -> Pool[t.Any] | None:
        """The pool named ``name`` if this process made it already; never makes one."""
        return self._pools.get(name)

    def swap(self, name: str, pool: Pool[t.Any] | None) -> Pool[t.Any] | None:
        """Put ``pool`` in place of the pool named ``name`` (None: forget it); returns the one it replaced.

        For test tools (the pytest plugin's transaction pools): the next take
        in this process uses ``pool``. The replaced pool is neither closed nor
        changed; resources out of it go back to it.
        """
        if name not in self.configs:
            raise UsageError(f"flask_proxypool: no pool named {name!r} on app {self.app_name!r}")
        with self._lock:
            old = self._pools.pop(name, None)
            if pool is not None:
                self._pools[name] = pool
            return old

    def stats(self) -> dict[str, PoolStats]:
        """Stats of every configured pool, with its configuration (password masked).

        Makes the pools this process has not used yet, which opens nothing.
        """
        return {
            name: dataclasses.replace(self.pool(name).stats(), config=cfg.public())
            for name, cfg in self.configs.items()
        }

    def close(self, timeout: float | None = None) -> None:
        """Close every pool made so far; a later use makes a new one."""
        with self._lock:
            pools = list(self._pools.values())
            self._pools.clear()
        for p in pools:
            p.close(timeout)

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()


def close_all(timeout: float | None = None) -> None:
    """Close every pool of every app in this process (worker exit, a preloading master).

    Pools closed here are made again, empty, if an app uses them later.
    """
    with _registries_lock:
        registries = list(_registries)
    for reg in registries:
        try:
            reg.close(timeout)
        except Exception:
            logger.exception("app %r: closing its pools failed", reg.app_name)


def registrations() -> list[AppPools]:
    """The :class:`AppPools` of every app registered in this process and still alive.

    Held weakly here: an app that nothing else references is gone from the
    list. The pytest plugin compares two calls to find the apps a test made.
    """
    with _registries_lock:
        return list(_registries)


atexit.register(close_all, 1.0)


def _after_fork_in_child() -> None:
    global _registries_lock
    _registries_lock = threading.Lock()
    for reg in list(_registries):
        reg._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def app_state(app: Flask) -> AppPools:
    """The :class:`AppPools` of ``app``, or a :class:`UsageError` saying how to register."""
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        raise UsageError(
            f"flask_proxypool is not set up on app {app.name!r}: call ProxyPool(app) "
            "(or pools.init_app(app)) in your app factory before using the proxies"
        )
    return t.cast(AppPools, state)


def take_for_context(ctx: t.Any, name: str, held: dict[str, t.Any] | None) -> tuple[t.Any, t.Any, bool, Pool[t.Any]]:
    """Take a resource from ``ctx.app``'s pool ``name`` and bind it to the app context ``ctx``.

    Returns the binding: (resource, request context that took it or None,
    released at commit?, pool). The pool is kept so that the return needs no
    lookup, and goes to the pool the resource came from whatever happens to
    the app's pools meanwhile. ``held`` is what the proxy found on ``ctx``
    (its bindings, or None), so it is not looked up twice.
    """
    app = ctx.app
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        state = app_state(app)  # raises, saying how to register
    pool = state._pools.get(name) or state.pool(name)
    rctx = _get_req_ctx(None)
    holder = None
    if rctx is not None:
        if rctx.app is app:
            request = rctx.request
            holder = request.endpoint or request.path
        else:
            rctx = None  # an app context of another app pushed inside a request: not that request's
    resource = pool.getconn(None, holder)
    bound = (resource, rctx, name in state.release_at_commit, pool)
    if held is None:
        setattr(ctx, HELD, {name: bound})
    else:
        held[name] = bound
    return bound


#: Attribute on a Flask app context: {pool name: WeakSet of cursors made through the proxy}.
CURSORS = "_proxypool_cursors"


def txn_attr(ctx: t.Any, name: str, resource: t.Any, attr: str) -> t.Any:
    """``release: "commit"``: wrap the calls that make cursors or end a transaction.

    A cursor made through the proxy and still open keeps the connection
    bound (its results or a server-side cursor live on it); otherwise the
    connection goes back to the pool as soon as a commit or rollback leaves
    it idle, and the next access in the same context takes one again.
    """
    real = getattr(resource, attr)
    if attr in ("execute", "cursor"):

        def tracked(*args: t.Any, **kwargs: t.Any) -> t.Any:
            cursor = real(*args, **kwargs)
            cursors = ctx.__dict__.get(CURSORS)
            if cursors is None:
                cursors = {}
                setattr(ctx, CURSORS, cursors)
            cursors.setdefault(name, weakref.WeakSet()).add(cursor)
            return cursor

        return tracked

    def ending(*args: t.Any, **kwargs: t.Any) -> t.Any:
        out = real(*args, **kwargs)
        _release_if_done(ctx, name, resource)
        return out

    return ending


def _release_if_done(ctx: t.Any, name: str, resource: t.Any) -> None:
    held = ctx.__dict__.get(HELD)
    bound = held.get(name) if held else None
    if bound is None or bound[0] is not resource:
        return
    cursors = ctx.__dict__.get(CURSORS, {}).get(name)
    if cursors and any(not getattr(c, "closed", True) for c in list(cursors)):
        return  # an open cursor keeps its connection
    pool = bound[3]
    if pool.kind.in_transaction(resource):
        return  # e.g. commit() inside a transaction() block: not over yet
    del held[name]
    if cursors:
        cursors.clear()
    pool.putconn(resource)


def closed_by_view(ctx: t.Any, name: str) -> None:
    """The view closed the resource bound as ``name``: give it back now, leave a :class:`ClosedByView`.

    The pool counts it as ``closed_by_app`` and logs that once; the binding
    stays (with no pool), so further use in this context says what happened.
    """
    held = ctx.__dict__.get(HELD) if ctx is not None else None
    if not held:
        return
    bound = held.get(name)
    if bound is None or bound[3] is None:
        return
    resource, took, _, pool = bound
    held[name] = (ClosedByView(name), took, False, None)
    _give_back(pool, name, resource, True)


def _release(held: dict[str, t.Any], failed: bool, taker: t.Any = _ANY) -> None:
    """Give back what a context holds (only what ``taker`` took, if given), newest first.

    Idempotent and never raises: each binding leaves ``held`` before its resource is returned.
    """
    if taker is _ANY:
        while held:
            name, (resource, _, _, pool) = held.popitem()  # the newest
            _give_back(pool, name, resource, failed)
        return
    names = list(held)
    names.reverse()
    for name in names:
        resource, took, _, pool = held[name]
        if took is taker:
            del held[name]
            _give_back(pool, name, resource, failed)


def _give_back(pool: Pool[t.Any] | None, name: str, resource: t.Any, failed: bool) -> None:
    if pool is None:  # closed by the view: went back to the pool already
        return
    try:
        pool.putconn(resource, failed=failed)
    except Exception:
        logger.exception("pool %r: returning a resource at teardown failed", name)


def _after_request(response: Response) -> Response:
    """Decide about the request's work before the response leaves.

    ``on_return: commit`` commits here, so a failed commit is a 500; never when
    the view raised, even if an error handler made a success of it. A streamed
    response keeps the request's resources (a ``stream_with_context`` generator
    works on the view's connection and transaction) until it ends: see
    :class:`_StreamEnd`.
    """
    rctx = _get_req_ctx(None)
    ctx = _get_app_ctx(None)
    if rctx is None or ctx is None:
        return response
    setattr(rctx, _DECIDED, True)
    held = getattr(ctx, HELD, None)
    if not held:
        return response
    if response.status_code >= 400 or getattr(rctx, _FAILED, False):
        return response  # rolled back at teardown (an error page's body needs no connection)
    if response.is_streamed and any(b[1] is rctx and b[3] is not None for b in held.values()):
        end = _StreamEnd(response.response, ctx, rctx)
        response.response = end
        setattr(ctx, _STREAM, end)
        return response
    for resource, took, _, pool in held.values():
        if took is rctx and pool is not None and pool.on_return == "commit":
            pool.kind.commit(resource)
    return response


class _StreamEnd:
    """A streamed response's body: the request's resources are given back when it ends.

    Flask (3.1) tears the request down when the view returns, then pushes its
    contexts again around a ``stream_with_context`` generator. The teardown
    hooks leave a streaming request's bindings alone, so the generator finds
    the view's connection, in the view's transaction. When the body is
    exhausted the work is committed (``on_return: commit``, no error so far)
    and the resources go back; a commit that fails is raised out of the body,
    so the server ends the response without its final chunk and the client
    sees an error (the 200 and the headers went out long before). ``close()``
    (which every WSGI server calls, also when the client went away) gives back
    what is still held, rolled back.
    """

    def __init__(self, body: t.Iterable[t.Any], ctx: t.Any, rctx: t.Any) -> None:
        self.body = body
        self.ctx = ctx
        self.rctx = rctx
        self.done = False

    def __iter__(self) -> t.Iterator[t.Any]:
        try:
            yield from self.body
        except BaseException:
            self.finish(failed=True)
            raise
        self.finish(failed=False)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            self.finish(failed=True)

    def finish(self, *, failed: bool) -> None:
        if self.done:
            return
        self.done = True
        held = getattr(self.ctx, HELD, None)
        if not held:
            return
        if not failed:
            _commit_stream(held, self.rctx)
        _release(held, True, self.rctx)


def _streaming(ctx: t.Any) -> bool:
    """True while a streamed response owns the bindings of ``ctx`` (its request's)."""
    stream = getattr(ctx, _STREAM, None)
    return stream is not None and not stream.done


def _teardown_request(exc: BaseException | None) -> None:
    rctx = _get_req_ctx(None)
    ctx = _get_app_ctx(None)
    if rctx is not None and ctx is not None:
        held = getattr(ctx, HELD, None)
        if held and not _streaming(ctx):
            # Committed (or refused to) in after_request already: only roll back here.
            _release(held, exc is not None or getattr(rctx, _DECIDED, False), rctx)


def _commit_stream(held: dict[str, t.Any], rctx: t.Any) -> None:
    """Commit what a finished stream's request holds (``on_return: commit``); a failure is rolled back and raised."""
    for name, (resource, took, _, pool) in list(held.items()):
        if took is rctx and pool is not None and pool.on_return == "commit":
            try:
                pool.kind.commit(resource)
            except Exception:
                logger.exception(
                    "pool %r: commit at the end of a streamed response failed; its work is rolled back and the "
                    "response is cut short",
                    name,
                )
                _release(held, True, rctx)
                raise


def _handle_user_exception(original: t.Callable[[Exception], t.Any], e: Exception) -> t.Any:
    """Mark the request as failed before Flask finds a handler: its work is never committed."""
    rctx = _get_req_ctx(None)
    if rctx is not None:
        setattr(rctx, _FAILED, True)
    return original(e)


def _teardown_appcontext(exc: BaseException | None) -> None:
    ctx = _get_app_ctx(None)
    if ctx is not None:
        held = getattr(ctx, HELD, None)
        if held and not _streaming(ctx):
            _release(held, exc is not None)


def _log_503(key: str, msg: str, *args: object) -> None:
    """Log a 503, throttled per app and per ``key`` (pool and cause)."""
    ctx = _get_app_ctx(None)
    state = None if ctx is None else ctx.app.extensions.get(EXTENSION_KEY)
    throttle = state.throttle_503 if isinstance(state, AppPools) else _Throttle(0.0)
    skipped = throttle.admit(key)
    if skipped is None:
        return
    if skipped:
        msg += f" ({skipped} more like it in the last {throttle.interval:g} sec not logged)"
    logger.warning(msg, *args)


def _service_unavailable(pool: str | None, detail: str) -> tuple[Response, int, dict[str, str]]:
    ctx = _get_app_ctx(None)
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
    ctx = _get_app_ctx(None)
    held = sorted(ctx.__dict__.get(HELD) or ()) if ctx is not None else []
    _log_503(
        f"{held}:OperationalError",
        "pool %s: 503: database operational error: %s",
        ", ".join(map(repr, held)) or "(none held)",
        " ".join(mask_password(str(e)).split()),  # masked first: a known password is matched as written
    )
    return _service_unavailable(None, "the database connection failed")


class ProxyPool:
    """Registers the pools of ``PROXYPOOL_POOLS`` on an app (or several).

    ``ProxyPool(app)``, or ``pools = ProxyPool()`` then ``pools.init_app(app)``
    in an app factory. One instance may serve many apps; each app has its own
    pools.

    Configuration keys (``app.config``):

    ``PROXYPOOL_POOLS``
        ``{pool name: {key: value}}``; see the README's reference table.
    ``PROXYPOOL_RETRY_AFTER``
        seconds sent in ``Retry-After`` with a 503 (default 1).

    :param pools: defaults for ``PROXYPOOL_POOLS``, per pool name; the app's
        config wins for a pool it names.
    """

    def __init__(self, app: Flask | None = None, *, pools: t.Mapping[str, t.Any] | None = None) -> None:
        self.default_pools = dict(pools or {})
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
        if raw is not None and not isinstance(raw, t.Mapping):
            raise ConfigError(f"PROXYPOOL_POOLS must be a dict of pool name to settings, got {type(raw).__name__}")
        merged = {**self.default_pools, **(raw or {})}
        configs = parse_pools(merged, app.instance_path)
        retry_after = app.config.setdefault("PROXYPOOL_RETRY_AFTER", 1)
        if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 0:
            raise ConfigError(f"PROXYPOOL_RETRY_AFTER must be an int >= 0 (seconds), got {retry_after!r}")
        app.extensions[EXTENSION_KEY] = AppPools(app.name, configs, retry_after)
        # Flask runs these hooks in reverse order of registration: put ours first
        # so they run last, after every other hook (even ones registered before
        # init_app) has had its chance to use a proxy.
        if _cv_request is not None:
            app.after_request_funcs.setdefault(None, []).insert(0, _after_request)
            if any(c.options.get("on_return") == "commit" for c in configs.values()):
                # Every exception raised while dispatching (view, before_request) goes
                # through this public method, handled or not; Flask has no signal for
                # the handled ones.
                app.handle_user_exception = functools.partial(  # type: ignore[method-assign]
                    _handle_user_exception, app.handle_user_exception
                )
            app.teardown_request_funcs.setdefault(None, []).insert(0, _teardown_request)
        app.teardown_appcontext_funcs.insert(0, _teardown_appcontext)
        handlers = app.error_handler_spec.get(None, {}).get(None, {})
        if PoolUnavailable not in handlers:  # a handler for a subclass still wins for that subclass
            app.register_error_handler(PoolUnavailable, _unavailable)
        if any(c.kind == "psycopg" for c in configs.values()):
            import psycopg

            if psycopg.OperationalError not in handlers:
                app.register_error_handler(psycopg.OperationalError, _database_lost)
        from .cli import proxypool_cli
        from .endpoint import register_stats_endpoint

        app.cli.add_command(proxypool_cli)  # flask proxypool stats|check|size
        register_stats_endpoint(app)  # PROXYPOOL_STATS_URL, off by default

    def pool(self, name: str, app: Flask | None = None) -> Pool[t.Any]:
        """The :class:`Pool` named ``name`` of ``app`` (default: the current app)."""
        return app_state(_app(app)).pool(name)

    def stats(self, app: Flask | None = None) -> dict[str, PoolStats]:
        """Stats per pool of ``app`` (default: the current app)."""
        return app_state(_app(app)).stats()

    def close(self, app: Flask | None = None, timeout: float | None = None) -> None:
        """Close the pools of ``app`` (default: the current app), waiting for resources out."""
        app_state(_app(app)).close(timeout)


def _app(app: Flask | None) -> Flask:
    if app is not None:
        return app
    ctx = _get_app_ctx(None)
    if ctx is None:
        raise UsageError("flask_proxypool: no app given and no app context: pass app=...")
    return ctx.app


install_slow_paths(take_for_context, txn_attr, closed_by_view)
