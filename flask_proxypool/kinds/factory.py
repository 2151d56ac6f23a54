"""The `factory` kind: any resource, from a callable you give."""

from __future__ import annotations

import typing as t

__all__ = ["FactoryKind"]

#: A hook is a callable taking the resource, or the name of one of its methods.
Hook = t.Callable[[t.Any], t.Any] | str | None


def _call(hook: Hook, resource: t.Any) -> t.Any:
    if hook is None:
        return None
    if isinstance(hook, str):
        return getattr(resource, hook)()
    return hook(resource)


class FactoryKind:
    """Resources made by `factory()`, e.g. an LDAP bind or a search client.

    `close`, `check` and `reset` are each a callable taking the
    resource or the name of a method of it. `check` fails by raising or by
    returning False. `reset` returning False discards the resource.
    """

    name = "factory"

    def __init__(
        self,
        factory: t.Callable[[], t.Any],
        *,
        close: Hook = None,
        check: Hook = None,
        reset: Hook = None,
        commit: Hook = None,
        alive: Hook = None,
        label: str | None = None,
    ) -> None:
        self.factory = factory
        self._close = close
        self._check = check
        self._reset = reset
        self._commit = commit
        self._alive = alive
        self.label = label or getattr(factory, "__qualname__", repr(factory))

    def create(self) -> t.Any:
        return self.factory()

    def close(self, resource: t.Any) -> None:
        _call(self._close, resource)

    def alive(self, resource: t.Any) -> bool:
        return self._alive is None or _call(self._alive, resource) is not False

    def check(self, resource: t.Any) -> None:
        if _call(self._check, resource) is False:
            raise RuntimeError(f"check of {self.label} resource returned False")

    def reset(self, resource: t.Any) -> bool:
        return _call(self._reset, resource) is not False

    def closed(self, resource: t.Any) -> bool:
        return False  # no way to know: a failing reset counts as broken

    def in_transaction(self, resource: t.Any) -> bool:
        return False

    def commit(self, resource: t.Any) -> None:
        _call(self._commit, resource)

    def describe(self) -> str:
        return f"factory:{self.label}"
