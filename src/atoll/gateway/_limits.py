"""Rate limits per route and per client, on ``atoll.resilience.RateLimiter`` (GCRA).

Each (route, client) pair gets its own limiter, made on first use and kept in a bounded
least-recently-used table. With ``shared: true`` every permit is taken in Redis (one
round trip running GCRA in Lua, atomic across gateway instances); while Redis is down
or slow each instance limits locally at ``degraded_rate`` instead of failing requests.
:class:`_GatedStore` makes the whole gateway notice a dead store once: without it every
client's limiter would wait out its own first timeout.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
import re
from collections import OrderedDict

from atoll.determinism import Clock
from atoll.gateway._config import RateLimitConfig
from atoll.resilience import Permit, RateLimiter, SharedState, SharedStateDownError, SharedWindow

log = logging.getLogger("atoll.gateway")

_SAFE_KEY = re.compile(r"^[A-Za-z0-9._:@/-]{1,64}$")


class StoreUnavailableError(SharedStateDownError):
    """The shared store failed recently; limiters decide locally for a while.

    A :class:`SharedStateDownError`: the gate has logged the outage once, so the
    limiters' links count it without a warning each (one per client key, a second).
    """


class _GatedStore(SharedState):
    """A store wrapper that fails fast for ``retry_interval`` after any failure, and
    logs an outage once when it begins and once when it ends."""

    def __init__(self, store: SharedState, clock: Clock, retry_interval: float = 1.0) -> None:
        self.store = store
        self.clock = clock
        self.retry_interval = retry_interval
        self.down_until = float("-inf")
        self.healthy = True

    def _check(self) -> None:
        if self.clock.monotonic() < self.down_until:
            raise StoreUnavailableError("the shared rate-limit store failed recently")

    def _succeeded(self) -> None:
        if not self.healthy:
            self.healthy = True
            log.info("the shared rate-limit store answers again; limits are shared again")

    def _failed(self, exc: BaseException | None) -> None:
        self.down_until = self.clock.monotonic() + self.retry_interval
        if self.healthy and exc is not None:
            self.healthy = False
            log.warning(
                "the shared rate-limit store failed (%s: %s); limits are local until it"
                " answers again",
                type(exc).__name__,
                exc,
            )

    async def take_permit(
        self, name: str, *, now: float, interval: float, tolerance: float
    ) -> tuple[bool, float, float]:
        self._check()
        try:
            result = await self.store.take_permit(
                name, now=now, interval=interval, tolerance=tolerance
            )
        except Exception as exc:
            self._failed(exc)
            raise StoreUnavailableError(f"the shared rate-limit store failed: {exc}") from exc
        except BaseException:  # cancelled (the link's timeout): a hung store
            self._failed(None)
            raise
        self._succeeded()
        return result

    async def reserve_permit(
        self, name: str, *, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[bool, float]:
        self._check()
        try:
            result = await self.store.reserve_permit(
                name, now=now, interval=interval, tolerance=tolerance, max_wait=max_wait
            )
        except Exception as exc:
            self._failed(exc)
            raise StoreUnavailableError(f"the shared rate-limit store failed: {exc}") from exc
        except BaseException:
            self._failed(None)
            raise
        self._succeeded()
        return result

    async def sync_window(
        self,
        name: str,
        *,
        now: float,
        bucket_width: float,
        buckets: int,
        calls: int,
        failures: int,
        slow: int,
    ) -> SharedWindow:
        raise NotImplementedError("the gateway shares only rate limits through this store")

    async def open_circuit(
        self, name: str, *, now: float, until: float, bucket_width: float, buckets: int
    ) -> float:
        raise NotImplementedError("the gateway shares only rate limits through this store")

    async def aclose(self) -> None:
        await self.store.aclose()


@functools.lru_cache(maxsize=4096)  # asked on every request, for a few distinct clients
def client_key(raw: str) -> str:
    """A key safe in a limiter's (and Redis key's) name: short ones as they are, else hashed."""
    if _SAFE_KEY.match(raw):
        return raw
    return "h-" + hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()


@functools.lru_cache(maxsize=4096)
def ip_limit_key(ip: str) -> str:
    """The rate-limit key of a client address: an IPv4 address as it is, an IPv6 one by
    its /64 (a host is given a /64 and may use a new address for every request, so a
    key per address would neither limit it nor bound the limiter table)."""
    if ":" in ip:
        try:
            address = ipaddress.IPv6Address(ip.partition("%")[0])
        except ValueError:
            pass
        else:
            mapped = address.ipv4_mapped
            if mapped is not None:
                return client_key(f"ip:{mapped}")
            network = ipaddress.IPv6Network((address, 64), strict=False)
            return client_key(f"ip:{network.network_address}/64")
    return client_key("ip:" + ip)


class RouteLimits:
    """The limiters of one route: one per client key (or one for ``per: route``)."""

    __slots__ = ("_clock", "_limiters", "_max_keys", "_route", "_store", "config")

    def __init__(
        self,
        route: str,
        config: RateLimitConfig,
        *,
        clock: Clock,
        store: SharedState | None,
        max_keys: int = 100_000,
    ) -> None:
        self._route = route
        self.config = config
        self._clock = clock
        self._store = store if config.shared else None
        self._max_keys = max_keys
        self._limiters: OrderedDict[str, RateLimiter] = OrderedDict()

    @property
    def store(self) -> SharedState | None:
        """The shared store its limiters use (``None`` for local limits)."""
        return self._store

    def _limiter(self, key: str) -> RateLimiter:
        limiters = self._limiters
        limiter = limiters.get(key)
        if limiter is not None:
            limiters.move_to_end(key)
            return limiter
        config = self.config
        limiter = RateLimiter(
            f"{self._route}:{key}",
            rate=config.rate,
            burst=config.burst,
            clock=self._clock,
            shared=self._store,
            shared_timeout=config.shared_timeout,
            degraded_rate=config.degraded_rate,
        )
        limiters[key] = limiter
        if len(limiters) > self._max_keys:
            limiters.popitem(last=False)
        return limiter

    async def check(self, key: str) -> Permit:
        """Take a permit for ``key`` now, or say when there will be one."""
        return await self._limiter(key).try_acquire()

    def check_local(self, key: str) -> Permit | None:
        """:meth:`check` without a coroutine when the limit is local; ``None`` if shared."""
        if self._store is not None:
            return None
        limiters = self._limiters
        limiter = limiters.get(key)
        if limiter is None:
            limiter = self._limiter(key)
        else:
            limiters.move_to_end(key)
        return limiter.try_acquire_local()

    @property
    def rejected_total(self) -> int:
        """Requests refused by the limiters still in the table."""
        return sum(limiter.rejected_total for limiter in self._limiters.values())

    @property
    def degraded_total(self) -> int:
        """Permits decided locally because the shared store was unavailable."""
        return sum(limiter.degraded_total for limiter in self._limiters.values())

    @property
    def keys(self) -> int:
        """Clients with a limiter in the table."""
        return len(self._limiters)


def gated(store: SharedState, clock: Clock) -> SharedState:
    """``store`` behind a gate that makes every limiter fall back at once when it fails."""
    return _GatedStore(store, clock)
