"""A pretend remote pricing service client: the kind of costly resource a ``factory`` pool holds."""

from __future__ import annotations

import itertools

_ids = itertools.count(1)


class PricingClient:
    """Stands for a connection to a remote service (an LDAP bind, a search client...)."""

    def __init__(self) -> None:
        self.id = next(_ids)
        self.closed = False

    def quote(self, base_price: int, qty: int) -> int:
        return base_price * qty - (base_price * qty // 10 if qty >= 10 else 0)

    def ping(self) -> bool:
        return not self.closed

    def close(self) -> None:
        self.closed = True


def connect() -> PricingClient:
    return PricingClient()
