"""Crash points: named places where a test can have the process killed with SIGKILL.

Armed by the environment variable ``ATOLL_CRASHPOINT=name`` (crash at the first hit) or
``name@N`` (crash at the N-th hit), read once at import. Unarmed, a crash point costs one
string comparison. The crash tests of ``atoll.testing`` use them to kill a real process
at each step of the exactly-once pipeline.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

_armed_name: str | None = None
_armed_hits = 1
_hits = 0
_handler: Callable[[str], None] | None = None


def _arm_from_environment() -> None:
    global _armed_name, _armed_hits  # noqa: PLW0603 - process-wide test switch
    spec = os.environ.get("ATOLL_CRASHPOINT")
    if not spec:
        return
    name, _, count = spec.partition("@")
    _armed_name = name
    _armed_hits = int(count) if count else 1


def arm(name: str | None, *, hits: int = 1, handler: Callable[[str], None] | None = None) -> None:
    """Arm (or with ``None`` disarm) a crash point in this process.

    ``handler`` replaces the SIGKILL, for in-process simulated crashes.
    """
    global _armed_name, _armed_hits, _hits, _handler
    _armed_name, _armed_hits, _hits, _handler = name, hits, 0, handler


def crashpoint(name: str) -> None:
    """Kill this process here if the crash point ``name`` is armed and due."""
    global _hits  # noqa: PLW0603 - process-wide test switch
    if _armed_name != name:
        return
    _hits += 1
    if _hits < _armed_hits:
        return
    if _handler is not None:
        _handler(name)
        return
    os.kill(os.getpid(), signal.SIGKILL)


_arm_from_environment()
