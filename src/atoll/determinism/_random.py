"""Randomness: the only way framework code draws random numbers or identifiers."""

from __future__ import annotations

import os
import random as _random_module
from uuid import UUID

from atoll.determinism._clock import Clock, SystemClock


class RandomSource:
    """A seedable source of random numbers and time-ordered identifiers.

    Every jitter, sample and identifier that atoll draws comes from one of these, so a
    seeded source replays a run exactly. Unseeded, it seeds itself from the OS.
    """

    __slots__ = ("_clock", "_last_ms", "_random", "_seq")

    def __init__(self, seed: int | None = None, *, clock: Clock | None = None) -> None:
        self._random = _random_module.Random(  # noqa: S311 - jitter and ids, not secrets
            seed if seed is not None else int.from_bytes(os.urandom(16), "big")
        )
        self._clock: Clock = clock or SystemClock()
        self._last_ms = -1
        self._seq = 0

    def random(self) -> float:
        """A float in ``[0.0, 1.0)``."""
        return self._random.random()

    def uniform(self, low: float, high: float) -> float:
        """A float in ``[low, high]``."""
        return self._random.uniform(low, high)

    def randrange(self, stop: int) -> int:
        """An int in ``[0, stop)``."""
        return self._random.randrange(stop)

    def getrandbits(self, k: int) -> int:
        """An int with ``k`` random bits."""
        return self._random.getrandbits(k)

    def choice(self, seq: list[str]) -> str:
        """One element of a non-empty list of strings."""
        return self._random.choice(seq)

    def uuid7(self) -> UUID:
        """A UUIDv7 (RFC 9562): 48 bits of milliseconds, then a counter and random bits.

        Identifiers from one source sort in creation order, even within one millisecond,
        which keeps primary-key indexes append-only.
        """
        return UUID(int=self._uuid7_int())

    def new_id(self) -> str:
        """A new identifier as 32 lowercase hex digits (a UUIDv7 without dashes)."""
        # Formatted from the int: every message gets one, and a UUID object only to ask
        # for its .hex costs more than the id itself.
        return f"{self._uuid7_int():032x}"

    def _uuid7_int(self) -> int:
        ms = int(self._clock.time() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._seq += 1
            if self._seq >= 1 << 12:
                ms += 1
                self._seq = 0
        else:
            self._seq = self._random.getrandbits(11)
        self._last_ms = ms
        value = (ms & ((1 << 48) - 1)) << 80
        value |= 0x7 << 76
        value |= self._seq << 64
        value |= 0b10 << 62
        value |= self._random.getrandbits(62)
        return value

    def __repr__(self) -> str:
        return "RandomSource()"
