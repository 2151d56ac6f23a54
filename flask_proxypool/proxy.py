"""Module-level proxies that stand for the resource the current Flask context holds from a pool.

`from flask_proxypool import db` works before any app exists. Inside a
request (or any app context) the first attribute access takes a resource
from the current app's pool and binds it to that context (see
`flask_proxypool.binding`); later accesses reuse it; teardown gives it
back.

Typed: `db = proxy("db", psycopg.Connection)` is, to a type checker, a
`psycopg.Connection`, so `db.execute(...)` is checked and a misspelled
method is an error. `current(db)` is the real object, `borrow(db)` a
resource for a block. `isinstance(db, X)` happens to work for bound
proxies (`__class__` is forwarded) but is not promised; pass the real
object to code that needs its exact type.
"""

from __future__ import annotations

import contextlib
import threading
import typing as t

from .binding import closed_by_view, held, take, txn_attr
from .contexts import app_ctx
from .errors import UsageError
from .state import app_state

if t.TYPE_CHECKING:
    from flask import Flask

__all__ = ["Proxy", "borrow", "current", "proxy"]

T = t.TypeVar("T")

#: With ``release: "commit"``, these are intercepted to track cursors and give
#: the connection back as soon as its transaction ends.
_TXN_ATTRS = frozenset({"commit", "rollback", "execute", "cursor"})

_NO_CONTEXT = (
    "flask_proxypool: proxy {name!r} used outside of an application context. "
    "Use it inside a request, a CLI command or 'with app.app_context():', "
    "or take a resource explicitly with 'with {var}.borrow(app) as conn:' (or, typed, 'with borrow({var}, app)')."
)

_OWN = frozenset({"borrow", "_get_current_object", "_pp_name", "_pp_type", "__class__"})


class Proxy:
    """Stands for the resource the current context holds from pool `name`.

    Attribute access, calls, `with`, iteration, `len`, indexing,
    `repr`/`str` and comparisons are forwarded. `repr`, `str`,
    `bool` and `dir` never take a resource: before the first real use
    they describe the proxy instead.
    """

    __slots__ = ("_pp_name", "_pp_type")

    def __init__(self, name: str, type_: type | None = None) -> None:
        object.__setattr__(self, "_pp_name", name)
        object.__setattr__(self, "_pp_type", type_)

    def _get_current_object(self) -> t.Any:
        """The real resource bound to the current context, taking one if needed."""
        name = _name_of(self)
        ctx = app_ctx(None)
        if ctx is None:
            raise UsageError(_NO_CONTEXT.format(name=name, var=name))
        bindings = held(ctx)
        binding = bindings.get(name) if bindings is not None else None
        if binding is None:
            binding = take(ctx, name, bindings, _type_of(self))
        if binding.pool is None:  # closed by the view
            raise binding.resource.error()
        return binding.resource

    def __getattribute__(self, attr: str) -> t.Any:
        # Every use of the resource comes through here: no call that can be avoided (on free-threaded 3.13,
        # which does not specialise, a call to a Python function costs 600 machine instructions before its
        # first line, and `object.__getattribute__(self, name)` 2,000 against 1,000 for `_name_of`).
        if attr in _OWN:
            return object.__getattribute__(self, attr)
        ctx = app_ctx(None)
        name = _name_of(self)
        if ctx is None:
            raise UsageError(_NO_CONTEXT.format(name=name, var=name))
        bindings = getattr(ctx, "_proxypool_held", None)  # binding.HELD, spelled out: no global lookup
        binding = None if bindings is None else bindings.get(name)
        if binding is None:
            binding = take(ctx, name, bindings, _type_of(self))  # the first use in this context
        if binding.release_at_commit and attr in _TXN_ATTRS:
            return txn_attr(ctx, name, binding.resource, attr)
        if attr == "close" and binding.pool is not None:
            return _closer(ctx, name, binding.resource)
        return getattr(binding.resource, attr)

    def _bound(self) -> t.Any:
        """The resource if one is bound already, else None: never takes one."""
        ctx = app_ctx(None)
        if ctx is None:
            return None
        bindings = held(ctx)
        binding = None if bindings is None else bindings.get(object.__getattribute__(self, "_pp_name"))
        return None if binding is None else binding.resource

    @contextlib.contextmanager
    def borrow(self, app: Flask | None = None, timeout: float | None = None) -> t.Iterator[t.Any]:
        """`with db.borrow() as conn:`: a resource for this block only (or `borrow(db)`).

        For background threads and scripts: it is returned when the block
        exits, exceptions included, whatever the current context holds. Pass
        `app` when there is no app context.
        """
        name = object.__getattribute__(self, "_pp_name")
        if app is None:
            ctx = app_ctx(None)
            if ctx is None:
                raise UsageError(
                    f"flask_proxypool: {name}.borrow() needs an app: call it inside an app context "
                    f"or pass one, as in 'with {name}.borrow(app) as conn:' (or, typed, 'with borrow({name}, app)')"
                )
            app = ctx.app
        pool = app_state(app).pool(name)
        with pool.connection(timeout) as resource:
            yield resource

    # -- forwarded protocol ---------------------------------------------------

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: F811
        """The bound resource's type, else Proxy: a type check never takes a resource nor raises.

        (gevent's `monkey.patch_all()` runs isinstance() on every object gc knows.)
        """
        res = object.__getattribute__(self, "_bound")()
        return Proxy if res is None else type(res)

    def __repr__(self) -> str:
        res = object.__getattribute__(self, "_bound")()
        if res is None:
            name = object.__getattribute__(self, "_pp_name")
            state = "unbound" if app_ctx(None) is None else "not taken yet"
            return f"<flask_proxypool proxy {name!r} ({state})>"
        return repr(res)

    def __str__(self) -> str:
        res = object.__getattribute__(self, "_bound")()
        return object.__getattribute__(self, "__repr__")() if res is None else str(res)

    def __bool__(self) -> bool:
        res = object.__getattribute__(self, "_bound")()
        if res is None:
            return app_ctx(None) is not None
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
                closed_by_view(app_ctx(None), object.__getattribute__(self, "_pp_name"))

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
        # An untyped proxy: any attribute, typed as Any (proxy(name, cls) gives a typed one).
        def __getattr__(self, attr: str) -> t.Any: ...


#: A proxy's pool name and type, read through the slots' descriptors: cheaper than
#: `object.__getattribute__(proxy, "_pp_name")` on every access.
_name_of: t.Callable[[Proxy], str] = Proxy._pp_name.__get__  # type: ignore[attr-defined]
_type_of: t.Callable[[Proxy], type | None] = Proxy._pp_type.__get__  # type: ignore[attr-defined]


def _closer(ctx: t.Any, name: str, resource: t.Any) -> t.Callable[..., t.Any]:
    """`db.close`: close, then give the resource back as closed by the view."""
    real = resource.close

    def close(*args: t.Any, **kwargs: t.Any) -> t.Any:
        try:
            return real(*args, **kwargs)
        finally:
            closed_by_view(ctx, name)

    return close


_proxies: dict[tuple[str, type | None], Proxy] = {}
# Guards _proxies, so that two threads asking for the same proxy get one object.
# A Proxy itself is immutable (set once in __init__), and the bindings it
# reads live on the Flask context, which one thread owns.
_proxies_lock = threading.Lock()


@t.overload
def proxy(name: str) -> Proxy: ...


@t.overload
def proxy(name: str, type_: type[T]) -> T: ...


def proxy(name: str, type_: type[t.Any] | None = None) -> t.Any:
    """The proxy for pool `name` (the same object on every call with the same arguments).

    `ldap = proxy("ldap")` at module level, before any app exists. Give the
    resource's type, `db = proxy("db", psycopg.Connection)`, and a type
    checker sees `db` as that type; the first use in a context checks that
    the pool does make that type.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise UsageError(f"flask_proxypool.proxy(): a pool name must be an identifier, got {name!r}")
    if type_ is not None and not isinstance(type_, type):
        raise UsageError(f"flask_proxypool.proxy({name!r}, ...): the second argument must be a class, got {type_!r}")
    key = (name, type_)
    with _proxies_lock:
        p = _proxies.get(key)
        if p is None:
            p = _proxies[key] = Proxy(name, type_)
        return p


def _as_proxy(obj: t.Any, what: str) -> Proxy:
    if type(obj) is not Proxy:  # type(), not isinstance(): a bound proxy forwards __class__
        raise UsageError(f"flask_proxypool.{what}(): expected a proxy made by proxy(), got {type(obj).__qualname__}")
    return obj


def current(resource_proxy: T) -> T:
    """The real object behind a proxy, taking one if the context holds none yet.

    For code that checks types or needs the object itself (`db._get_current_object()`, typed).
    """
    p = _as_proxy(resource_proxy, "current")
    return t.cast(T, object.__getattribute__(p, "_get_current_object")())


def borrow(resource_proxy: T, app: Flask | None = None, timeout: float | None = None) -> t.ContextManager[T]:
    """`with borrow(db) as conn:`: a resource of the proxy's pool for this block only, typed as the proxy.

    For background threads and scripts: returned when the block exits,
    exceptions included, whatever the current context holds. Pass `app`
    when there is no app context.
    """
    p = _as_proxy(resource_proxy, "borrow")
    return t.cast("t.ContextManager[T]", object.__getattribute__(p, "borrow")(app, timeout))
