"""The current Flask app and request contexts, read through Flask's public globals, as fast as a ContextVar.

`flask.globals.app_ctx` and `request_ctx` are Werkzeug `LocalProxy`
objects over ContextVars; `LocalProxy.__wrapped__` (public since Werkzeug
2.2.2) is that ContextVar. Reading it directly costs one `ContextVar.get`,
which the proxy's hot path can afford on every attribute access. Flask 3.2
merges the request context into the app context: there `request_ctx` and
`app_ctx` are one, and `SEPARATE_REQUEST_CONTEXT` is False.
"""

from __future__ import annotations

import typing as t
from contextvars import ContextVar

from flask import globals as _globals

__all__ = ["SEPARATE_REQUEST_CONTEXT", "app_ctx", "request_ctx"]

_APP: ContextVar[t.Any] = t.cast(t.Any, _globals).app_ctx.__wrapped__
_REQUEST: ContextVar[t.Any] | None = getattr(getattr(_globals, "request_ctx", None), "__wrapped__", None)

#: True on Flask < 3.2, where a request context is pushed on top of an app context.
SEPARATE_REQUEST_CONTEXT = _REQUEST is not None and _REQUEST is not _APP

#: ``app_ctx(None)``: the current app context, or None outside one.
app_ctx: t.Callable[[None], t.Any] = _APP.get


def _no_request(default: None) -> None:
    return default


#: ``request_ctx(None)``: the current request context, or None (always None on Flask 3.2, where
#: the app context is the request's).
request_ctx: t.Callable[[None], t.Any] = (
    t.cast(ContextVar[t.Any], _REQUEST).get if SEPARATE_REQUEST_CONTEXT else _no_request
)
