"""Test kits: conformance test classes that each backend's tests subclass.

The kits import pytest; importing this package does not (names load on first use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atoll.testing._eventstore import EventStoreConformance

__all__ = ["EventStoreConformance"]

_KITS = {"EventStoreConformance": "atoll.testing._eventstore"}


def __getattr__(name: str) -> Any:
    module = _KITS.get(name)
    if module is None:
        raise AttributeError(f"module 'atoll.testing' has no attribute {name!r}")
    import importlib  # noqa: PLC0415 - kits load lazily so that pytest stays optional

    return getattr(importlib.import_module(module), name)
