"""What a Flask context holds: taking a resource on first access, giving it back at teardown or commit.

A request's connection, followed from `db.execute` to teardown:

1. `take` (called by the proxy on the first access in an app
   context) takes a resource from the current app's pool and records a
   `Binding` in the app context's `HELD` dict, keyed by pool name.
   The binding remembers the request context that took it, so that request
   gives it back even when it ran inside an outer app context of the app.
2. Later accesses find the binding and use its resource: same connection,
   same transaction.
3. `after_request` decides about the work before the response leaves
   (`on_return: "commit"` commits; a streamed response keeps the binding
   until its body ends, `StreamEnd`).
4. `teardown_request` and `teardown_appcontext` give back
   whatever is still bound (`release`), rolled back unless committed
   above; the pool resets it.

`release: "commit"` gives a connection back earlier, when a commit or
rollback through the proxy leaves it idle (`txn_attr`); a connection
the view closed goes back at once and leaves a `ClosedByView`
(`closed_by_view`).
"""

from __future__ import annotations

import functools
import logging
import typing as t
import weakref

from flask import Response

from .contexts import app_ctx, request_ctx
from .errors import UsageError
from .pool import Pool
from .state import EXTENSION_KEY, app_state

__all__ = [
    "HELD",
    "Binding",
    "ClosedByView",
    "StreamEnd",
    "after_request",
    "closed_by_view",
    "held",
    "mark_failed",
    "observe",
    "release",
    "take",
    "teardown_appcontext",
    "teardown_request",
    "txn_attr",
]

logger = logging.getLogger("flask_proxypool")

#: Attribute on a Flask app context: {pool name: `Binding`}.
HELD = "_proxypool_held"
#: Attribute on a Flask app context: {pool name: WeakSet of cursors made through the proxy}.
CURSORS = "_proxypool_cursors"
#: Set on a request context once after_request has decided about commit.
_DECIDED = "_proxypool_decided"
#: Set on a request context when the view (or a before_request hook) raised, handled or not:
#: its work is never committed (Django's ATOMIC_REQUESTS rule).
_FAILED = "_proxypool_failed"
#: Set on an app context whose request's bindings belong to a streamed response until it ends.
_STREAM = "_proxypool_stream"
_ANY = object()


class Binding(t.NamedTuple):
    """One resource bound to an app context (a named tuple: immutable, and half the cost of a frozen dataclass
    to make, one per first access)."""

    #: the resource (a `ClosedByView` once the view closed it)
    resource: t.Any
    #: the pool it goes back to (None once the view closed it: it went back already)
    pool: Pool[t.Any] | None
    #: the request context that took it, or None outside a request
    taker: t.Any
    #: ``release: "commit"``: given back as soon as a commit or rollback leaves it idle
    release_at_commit: bool


#: `Binding(*fields)` without the named tuple's `__new__`, a Python function: this runs on every first
#: access, and on free-threaded 3.13 (no specialising interpreter) it cost 4,000 machine instructions that
#: way against 1,800 this way (callgrind).
_binding: t.Callable[[tuple[t.Any, Pool[t.Any], t.Any, bool]], Binding] = functools.partial(tuple.__new__, Binding)

#: Called with (app context, binding) after each take; test tools record which contexts hold what.
_observers: list[t.Callable[[t.Any, Binding], object]] = []


def observe(callback: t.Callable[[t.Any, Binding], object]) -> t.Callable[[], None]:
    """Call ``callback(ctx, binding)`` after every take, in the taking thread; returns the function that stops it.

    For test tools (the pytest plugin's leak check asks which resources are
    still bound to a context); the take costs one list check when nobody observes.
    """
    _observers.append(callback)

    def stop() -> None:
        if callback in _observers:
            _observers.remove(callback)

    return stop


def held(ctx: t.Any) -> dict[str, Binding] | None:
    """The bindings of the app context `ctx`, or None if it holds nothing yet."""
    bindings: dict[str, Binding] | None = getattr(ctx, HELD, None)  # (no t.cast: a call, on hot paths)
    return bindings


def take(ctx: t.Any, name: str, bindings: dict[str, Binding] | None, want: type | None = None) -> Binding:
    """Take a resource from `ctx.app`'s pool `name` and bind it to the app context `ctx`.

    The pool is kept in the binding so that the return needs no lookup, and
    goes to the pool the resource came from whatever happens to the app's
    pools meanwhile. `bindings` is what the proxy found on `ctx` (or
    None), so it is not looked up twice. `want`: the type a typed proxy
    declared; a resource of another type is given back and refused.
    """
    app = ctx.app
    state = app.extensions.get(EXTENSION_KEY)
    if state is None:
        state = app_state(app)  # raises, saying how to register
    pool = state._pools.get(name) or state.pool(name)  # AppPools.made(), without the call
    rctx = request_ctx(None)
    holder = None
    if rctx is not None:
        if rctx.app is app:
            request = rctx.request
            rule = request.url_rule  # request.endpoint, without the property's call
            holder = (rule.endpoint if rule is not None else None) or request.path
        else:
            rctx = None  # an app context of another app pushed inside a request: not that request's
    resource = pool.getconn(None, holder)
    if want is not None and not isinstance(resource, want):
        pool.putconn(resource)
        raise UsageError(
            f"flask_proxypool: proxy({name!r}, {want.__qualname__}) got a {type(resource).__qualname__} "
            f"from pool {name!r}: declare the proxy with the type the pool's kind makes"
        )
    binding = _binding((resource, pool, rctx, name in state.release_at_commit))
    if bindings is None:
        setattr(ctx, HELD, {name: binding})
    else:
        bindings[name] = binding
    if _observers:
        for callback in list(_observers):
            callback(ctx, binding)
    return binding


class ClosedByView:
    """Stands, in a context's bindings, for a resource the code using it closed.

    Pooled resources must not be closed: the resource went back to the pool
    (counted as `closed_by_app`) and any further use through the proxy in
    the same context raises `UsageError` saying so, instead of the
    driver's "connection is closed" read as an outage.
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __getattr__(self, attr: str) -> t.Any:
        raise self.error()

    def error(self) -> UsageError:
        return UsageError(
            f"flask_proxypool: the {self.name!r} resource of this context was closed by the code using it "
            f"({self.name}.close(), or 'with {self.name}:', which closes a psycopg connection), then used "
            f"again. A pooled resource must not be closed: end work with {self.name}.commit() or "
            f"{self.name}.rollback(), and use 'with {self.name}.transaction():' for a transaction block. "
            "The closed one went back to the pool; the next context gets a new one."
        )


def closed_by_view(ctx: t.Any, name: str) -> None:
    """The view closed the resource bound as `name`: give it back now, leave a `ClosedByView`.

    The pool counts it as `closed_by_app` and logs that once; the binding
    stays (with no pool), so further use in this context says what happened.
    """
    bindings = held(ctx) if ctx is not None else None
    binding = bindings.get(name) if bindings else None
    if bindings is None or binding is None or binding.pool is None:
        return
    bindings[name] = Binding(ClosedByView(name), None, binding.taker, False)
    _give_back(binding.pool, name, binding.resource, True)


def txn_attr(ctx: t.Any, name: str, resource: t.Any, attr: str) -> t.Any:
    """`release: "commit"`: wrap the calls that make cursors or end a transaction.

    A cursor made through the proxy and still open keeps the connection
    bound (its results or a server-side cursor live on it); otherwise the
    connection goes back to the pool as soon as a commit or rollback leaves
    it idle, and the next access in the same context takes one again.
    """
    real = getattr(resource, attr)
    if attr in ("execute", "cursor"):

        def tracked(*args: t.Any, **kwargs: t.Any) -> t.Any:
            cursor = real(*args, **kwargs)
            cursors = getattr(ctx, CURSORS, None)
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
    bindings = held(ctx)
    binding = bindings.get(name) if bindings else None
    if bindings is None or binding is None or binding.resource is not resource or binding.pool is None:
        return
    cursors = (getattr(ctx, CURSORS, None) or {}).get(name)
    if cursors and any(not getattr(c, "closed", True) for c in list(cursors)):
        return  # an open cursor keeps its connection
    if binding.pool.kind.in_transaction(resource):
        return  # e.g. commit() inside a transaction() block: not over yet
    del bindings[name]
    if cursors:
        cursors.clear()
    binding.pool.putconn(resource)


def release(bindings: dict[str, Binding], failed: bool, taker: t.Any = _ANY) -> None:
    """Give back what a context holds (only what `taker` took, if given), newest first.

    Idempotent and never raises: each binding leaves `bindings` before its resource is returned.
    """
    names = list(bindings)
    names.reverse()  # the newest first
    for name in names:
        binding = bindings[name]
        if taker is _ANY or binding.taker is taker:
            del bindings[name]
            pool = binding.pool
            if pool is not None:  # _give_back, inlined: this runs at the end of every request or context that took
                try:
                    pool.putconn(binding.resource, failed=failed)
                except Exception:
                    logger.exception("pool %r: returning a resource at teardown failed", name)


def _give_back(pool: Pool[t.Any] | None, name: str, resource: t.Any, failed: bool) -> None:
    if pool is None:  # closed by the view: went back to the pool already
        return
    try:
        pool.putconn(resource, failed=failed)
    except Exception:
        logger.exception("pool %r: returning a resource at teardown failed", name)


def after_request(response: Response) -> Response:
    """Decide about the request's work before the response leaves.

    `on_return: commit` commits here, so a failed commit is a 500; never when
    the view raised, even if an error handler made a success of it. A streamed
    response keeps the request's resources (a `stream_with_context` generator
    works on the view's connection and transaction) until it ends: see
    `StreamEnd`.
    """
    rctx = request_ctx(None)
    ctx = app_ctx(None)
    if rctx is None or ctx is None:
        return response
    rctx._proxypool_decided = True  # _DECIDED
    bindings = getattr(ctx, HELD, None)  # held(ctx), without the call: this runs for every request
    if not bindings:
        return response
    # One loop, no generator (`any(...)` made one per request: 2,000 machine instructions on 3.13t).
    ours = commit = False
    for b in bindings.values():
        if b.taker is rctx and b.pool is not None:
            ours = True
            if b.pool.on_return == "commit":
                commit = True
    if not ours:
        return response
    streamed = response.is_streamed
    if not streamed and not commit:
        return response  # nothing to decide: the common case stops here (the two reads below cost 2,500 on 3.13t)
    if response.status_code >= 400 or getattr(rctx, _FAILED, False):
        return response  # rolled back at teardown (an error page's body needs no connection)
    if streamed:
        end = StreamEnd(response.response, ctx, rctx)
        response.response = end
        setattr(ctx, _STREAM, end)
        return response
    for b in bindings.values():  # not streamed, so something to commit
        if b.taker is rctx and b.pool is not None and b.pool.on_return == "commit":
            b.pool.kind.commit(b.resource)
    return response


class StreamEnd:
    """A streamed response's body: the request's resources are given back when it ends.

    Flask (3.1) tears the request down when the view returns, then pushes its
    contexts again around a `stream_with_context` generator. The teardown
    hooks leave a streaming request's bindings alone, so the generator finds
    the view's connection, in the view's transaction. When the body is
    exhausted the work is committed (`on_return: commit`, no error so far)
    and the resources go back; a commit that fails is raised out of the body,
    so the server ends the response without its final chunk and the client
    sees an error (the 200 and the headers went out long before). `close()`
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
        bindings = held(self.ctx)
        if not bindings:
            return
        if not failed:
            _commit_stream(bindings, self.rctx)
        release(bindings, True, self.rctx)


def _commit_stream(bindings: dict[str, Binding], rctx: t.Any) -> None:
    """Commit what a finished stream's request holds (`on_return: commit`); a failure is rolled back and raised."""
    for name, b in list(bindings.items()):
        if b.taker is rctx and b.pool is not None and b.pool.on_return == "commit":
            try:
                b.pool.kind.commit(b.resource)
            except Exception:
                logger.exception(
                    "pool %r: commit at the end of a streamed response failed; its work is rolled back and the "
                    "response is cut short",
                    name,
                )
                release(bindings, True, rctx)
                raise


def teardown_request(exc: BaseException | None) -> None:
    """Give back what the request took, rolled back unless after_request committed it."""
    rctx = request_ctx(None)
    ctx = app_ctx(None)
    if rctx is not None and ctx is not None:
        bindings = getattr(ctx, HELD, None)  # held(ctx), without the call: this runs for every request
        if bindings:
            stream = getattr(ctx, _STREAM, None)  # _streaming(ctx), inlined
            if stream is None or stream.done:
                # Committed (or refused to) in after_request already: only roll back here.
                release(bindings, exc is not None or getattr(rctx, _DECIDED, False), rctx)


def teardown_appcontext(exc: BaseException | None) -> None:
    """Give back everything still bound to the app context (a CLI command, `with app.app_context():`)."""
    ctx = app_ctx(None)
    if ctx is not None:
        bindings = getattr(ctx, HELD, None)  # held(ctx), without the call: this runs for every app context
        if bindings:
            stream = getattr(ctx, _STREAM, None)  # _streaming(ctx), inlined
            if stream is None or stream.done:
                release(bindings, exc is not None)


def mark_failed(original: t.Callable[[Exception], t.Any], e: Exception) -> t.Any:
    """Wraps `app.handle_user_exception`: the request raised, so its work is never committed."""
    rctx = request_ctx(None)
    if rctx is not None:
        setattr(rctx, _FAILED, True)
    return original(e)
