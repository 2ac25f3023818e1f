"""The determinism seam: time and randomness reach atoll only through these.

Framework code never calls :func:`time.time`, :func:`time.monotonic`,
:func:`asyncio.sleep`, :mod:`random` or :func:`uuid.uuid4` directly (a test enforces
it). Components take a :class:`Clock` and a :class:`RandomSource`; task scheduling
goes through the running asyncio event loop, which a simulator replaces by installing
its own loop. Together they let a whole system run in one process under a seed.
"""

from atoll.determinism._clock import Clock, SystemClock, VirtualClock
from atoll.determinism._random import RandomSource

__all__ = ["Clock", "RandomSource", "SystemClock", "VirtualClock"]
