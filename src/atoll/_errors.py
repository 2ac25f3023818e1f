"""The root of atoll's exception hierarchy."""

from __future__ import annotations


class AtollError(Exception):
    """Base of every error atoll raises on purpose."""
