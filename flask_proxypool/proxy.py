"""Module-level proxies that bind a pooled resource to the current Flask context.

``from flask_proxypool import db`` works before any app exists. Inside a
request (or any app context) the first attribute access takes a resource
from the current app's pool and binds it to that context; later accesses
reuse it; the extension's teardown gives it back.

The real object is ``db._get_current_object()``. ``isinstance(db, X)``
happens to work for bound proxies (``__class__`` is forwarded) but is not
promised; pass the real object to code that needs its exact type.
"""

from __future__ import annotations

import contextlib
import threading
import typing as t

from flask import globals as _flask_globals

from .errors import UsageError

if t.TYPE_CHECKING:
    from flask import Flask

__all__ = ["ClosedByView", "Proxy", "proxy"]

_cv_app = _flask_globals._cv_app
_get_app_ctx = _cv_app.get
#: Flask < 3.2 has a separate request context. Resources always bind to the
#: app context (so they follow ``current_app``), and remember the request that
#: took them, so the request gives them back even when it ran inside an outer
#: app context of the same app (Flask then reuses that context).
_cv_request = getattr(_flask_globals, "_cv_request", None)
_get_req_ctx = _cv_request.get if _cv_request is not None else (lambda default: default)

#: Attribute on a Flask app context:
#: {pool name: (resource, request context that took it or None, released at commit?, pool)}.
HELD = "_proxypool_held"

#: With ``release: "commit"``, these are intercepted to track cursors and give
#: the connection back as soon as its transaction ends.
_TXN_ATTRS = frozenset({"commit", "rollback", "execute", "cursor"})

_NO_CONTEXT = (
    "flask_proxypool: proxy {name!r} used outside of an application context. "
    "Use it inside a request, a CLI command or 'with app.app_context():', "
    "or take a resource explicitly with 'with {var}.borrow(app) as conn:'."
)

_OWN = frozenset({"borrow", "_get_current_object", "_pp_name", "__class__"})


# The slow paths live in extension.py, which imports this module; it installs
# them here when it is imported (the package's __init__ imports both), so the
# first access in a context pays no import statement.
#: take a resource for (app context, pool name) and bind it; returns the binding (see HELD)
_take: t.Callable[[t.Any, str, t.Any], tuple[t.Any, t.Any, bool, t.Any]]
#: wrap commit/rollback/execute/cursor of a ``release: "commit"`` binding
_txn_attr: t.Callable[[t.Any, str, t.Any, str], t.Any]
#: after the view closed the bound resource: give it back, leave a ClosedByView in its place
_closed_by_view: t.Callable[[t.Any, str], None]


def install_slow_paths(
    take: t.Callable[[t.Any, str, t.Any], tuple[t.Any, t.Any, bool, t.Any]],
    txn_attr: t.Callable[[t.Any, str, t.Any, str], t.Any],
    closed_by_view: t.Callable[[t.Any, str], None],
) -> None:
    """Called once by extension.py at import."""
    global _take, _txn_attr, _closed_by_view
    _take, _txn_attr, _closed_by_view = take, txn_attr, closed_by_view


class ClosedByView:
    """Stands, in a context's bindings, for a resource the code using it closed.

    Pooled resources must not be closed: the resource went back to the pool
    (counted as ``closed_by_app``) and any further use through the proxy in
    the same context raises :class:`UsageError` saying so, instead of the
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


class Proxy:
    """Stands for the resource the current context holds from pool ``name``.

    Attribute access, calls, ``with``, iteration, ``len``, indexing,
    ``repr``/``str`` and comparisons are forwarded. ``repr``, ``str``,
    ``bool`` and ``dir`` never take a resource: before the first real use
    they describe the proxy instead.
    """

    __slots__ = ("_pp_name",)

    def __init__(self, name: str) -> None:
        object.__setattr__(self, "_pp_name", name)

    def _get_current_object(self) -> t.Any:
        """The real resource bound to the current context, taking one if needed."""
        name = object.__getattribute__(self, "_pp_name")
        ctx = _get_app_ctx(None)
        if ctx is None:
            raise UsageError(_NO_CONTEXT.format(name=name, var=name))
        held = ctx.__dict__.get(HELD)
        if held is not None:
            bound = held.get(name)
            if bound is not None:
                if bound[3] is None:  # closed by the view
                    raise bound[0].error()
                return bound[0]
        return _take(ctx, name, held)[0]

    def __getattribute__(self, attr: str) -> t.Any:
        # The hot path: one ContextVar read, two dict lookups, getattr.
        if attr in _OWN:
            return object.__getattribute__(self, attr)
        ctx = _get_app_ctx(None)
        if ctx is None:
            name = object.__getattribute__(self, "_pp_name")
            raise UsageError(_NO_CONTEXT.format(name=name, var=name))
        held = ctx.__dict__.get(HELD)
        bound = None if held is None else held.get(object.__getattribute__(self, "_pp_name"))
        if bound is None:
            bound = _take(ctx, object.__getattribute__(self, "_pp_name"), held)  # the first use in this context
        if bound[2] and attr in _TXN_ATTRS:
            return _txn_attr(ctx, object.__getattribute__(self, "_pp_name"), bound[0], attr)
        if attr == "close" and bound[3] is not None:
            return _closer(ctx, object.__getattribute__(self, "_pp_name"), bound[0])
        return getattr(bound[0], attr)

    def _bound(self) -> t.Any:
        """The resource if one is bound already, else None: never takes one."""
        ctx = _get_app_ctx(None)
        if ctx is None:
            return None
        held = ctx.__dict__.get(HELD)
        bound = None if held is None else held.get(object.__getattribute__(self, "_pp_name"))
        return None if bound is None else bound[0]

    @contextlib.contextmanager
    def borrow(self, app: Flask | None = None, timeout: float | None = None) -> t.Iterator[t.Any]:
        """``with db.borrow() as conn:``: a resource for this block only.

        For background threads and scripts: it is returned when the block
        exits, exceptions included, whatever the current context holds. Pass
        ``app`` when there is no app context.
        """
        from .extension import app_state

        name = object.__getattribute__(self, "_pp_name")
        if app is None:
            ctx = _get_app_ctx(None)
            if ctx is None:
                raise UsageError(
                    f"flask_proxypool: {name}.borrow() needs an app: call it inside an app context "
                    f"or pass one, as in 'with {name}.borrow(app) as conn:'"
                )
            app = ctx.app
        pool = app_state(app).pool(name)
        with pool.connection(timeout) as resource:
            yield resource

    # -- forwarded protocol ---------------------------------------------------

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: F811
        """The bound resource's type, else Proxy: a type check never takes a resource nor raises.

        (gevent's ``monkey.patch_all()`` runs isinstance() on every object gc knows.)
        """
        res = object.__getattribute__(self, "_bound")()
        return Proxy if res is None else type(res)

    def __repr__(self) -> str:
        res = object.__getattribute__(self, "_bound")()
        if res is None:
            name = object.__getattribute__(self, "_pp_name")
            state = "unbound" if _get_app_ctx(None) is None else "not taken yet"
            return f"<flask_proxypool proxy {name!r} ({state})>"
        return repr(res)

    def __str__(self) -> str:
        res = object.__getattribute__(self, "_bound")()
        return object.__getattribute__(self, "__repr__")() if res is None else str(res)

    def __bool__(self) -> bool:
        res = object.__getattribute__(self, "_bound")()
        if res is None:
            return _get_app_ctx(None) is not None
        return bool(res)

    def __dir__(self) -> list[str]:
        res = object.__getattribute__(self, "_bound")()
        return [] if res is None else dir(res)

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        res = object.__getattribute__(self, "_bound")()
        if res is None:
            return False
        if isinstance(other, Proxy):
            other = object.__getattribute__(other, "_bound")()
        return bool(res == other)

    def __ne__(self, other: object) -> bool:
        return not Proxy.__eq__(self, other)

    def __hash__(self) -> int:
        return object.__hash__(self)

    def __setattr__(self, attr: str, value: t.Any) -> None:
        setattr(object.__getattribute__(self, "_get_current_object")(), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(object.__getattribute__(self, "_get_current_object")(), attr)

    def __call__(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        return object.__getattribute__(self, "_get_current_object")()(*args, **kwargs)

    def __enter__(self) -> t.Any:
        return object.__getattribute__(self, "_get_current_object")().__enter__()

    def __exit__(self, *exc: object) -> t.Any:
        resource = object.__getattribute__(self, "_get_current_object")()
        try:
            return resource.__exit__(*exc)
        finally:
            if getattr(resource, "closed", False) is True:  # psycopg: 'with conn:' closes it
                _closed_by_view(_get_app_ctx(None), object.__getattribute__(self, "_pp_name"))

    def __iter__(self) -> t.Iterator[t.Any]:
        return iter(object.__getattribute__(self, "_get_current_object")())

    def __len__(self) -> int:
        return len(object.__getattribute__(self, "_get_current_object")())

    def __contains__(self, item: object) -> bool:
        return item in object.__getattribute__(self, "_get_current_object")()

    def __getitem__(self, key: t.Any) -> t.Any:
        return object.__getattribute__(self, "_get_current_object")()[key]

    def __setitem__(self, key: t.Any, value: t.Any) -> None:
        object.__getattribute__(self, "_get_current_object")()[key] = value

    def __delitem__(self, key: t.Any) -> None:
        del object.__getattribute__(self, "_get_current_object")()[key]

    if t.TYPE_CHECKING:
        # Lets ``db.execute(...)`` type-check: any attribute, typed as Any.
        def __getattr__(self, attr: str) -> t.Any: ...


def _closer(ctx: t.Any, name: str, resource: t.Any) -> t.Callable[..., t.Any]:
    """``db.close``: close, then give the resource back as closed by the view."""
    real = resource.close

    def close(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return real(*args, **kwargs)
        finally:
            _closed_by_view(ctx, name)

    return close


_proxies: dict[str, Proxy] = {}
# Guards _proxies, so that two threads asking for the same name get one Proxy.
# A Proxy itself is immutable (its name is set once in __init__), and the
# bindings it reads live on the Flask context, which one thread owns.
_proxies_lock = threading.Lock()


def proxy(name: str) -> Proxy:
    """The proxy for pool ``name`` (the same object on every call).

    ``ldap = proxy("ldap")`` at module level, before any app exists.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise UsageError(f"flask_proxypool.proxy(): a pool name must be an identifier, got {name!r}")
    with _proxies_lock:
        p = _proxies.get(name)
        if p is None:
            p = _proxies[name] = Proxy(name)
        return p
