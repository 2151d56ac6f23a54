"""Resource kinds: one module per kind, each implementing :class:`~.base.Kind`."""

from .base import Kind

__all__ = ["Kind"]
