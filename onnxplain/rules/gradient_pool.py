"""Exact vector-Jacobian products of pooling operators."""

from .base import register  # noqa: F401
