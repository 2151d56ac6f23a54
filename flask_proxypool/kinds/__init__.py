"""Resource kinds: one module per kind, each implementing `Kind`."""

from .base import Kind

__all__ = ["Kind"]
