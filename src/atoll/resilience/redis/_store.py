"""Breaker windows and GCRA rate limits in Redis, each step one atomic Lua script."""

from __future__ import annotations

import math
from typing import Any, Self

from redis.asyncio import Redis

from atoll.resilience._shared import SharedState, SharedWindow

# KEYS[1]: the window hash, KEYS[2]: the state hash.
# ARGV: now (ms), bucket width (ms), buckets, calls, failures, slow, window ttl (ms).
# The window is a ring of `buckets` slots; slot i holds e<i> (its bucket number) and
# c<i>, f<i>, s<i> (counts), so the hash never grows and needs no cleaning.
_SYNC = """
local now = tonumber(ARGV[1])
local width = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local dc, df, ds = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cur = math.floor(now / width)
local floor = tonumber(redis.call('HGET', KEYS[2], 'floor') or '-1')
local open_until = redis.call('HGET', KEYS[2], 'until') or '0'
if dc > 0 and cur >= floor then
  local slot = cur % n
  local epoch = tonumber(redis.call('HGET', KEYS[1], 'e' .. slot) or '-1')
  if epoch ~= cur then
    redis.call('HSET', KEYS[1], 'e' .. slot, cur, 'c' .. slot, dc, 'f' .. slot, df, 's' .. slot, ds)
  else
    redis.call('HINCRBY', KEYS[1], 'c' .. slot, dc)
    if df > 0 then redis.call('HINCRBY', KEYS[1], 'f' .. slot, df) end
    if ds > 0 then redis.call('HINCRBY', KEYS[1], 's' .. slot, ds) end
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
end
local calls, failures, slow = 0, 0, 0
for slot = 0, n - 1 do
  local v = redis.call('HMGET', KEYS[1], 'e' .. slot, 'c' .. slot, 'f' .. slot, 's' .. slot)
  local epoch = tonumber(v[1])
  if epoch and epoch > cur - n and epoch <= cur and epoch >= floor then
    calls = calls + tonumber(v[2])
    failures = failures + tonumber(v[3])
    slow = slow + tonumber(v[4])
  end
end
return {calls, failures, slow, open_until}
"""

# KEYS[1]: the state hash. ARGV: now (ms), open until (ms), bucket width (ms), ttl (ms).
_OPEN = """
local now = tonumber(ARGV[1])
local until_ms = tonumber(ARGV[2])
local existing = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
if until_ms > existing then
  redis.call('HSET', KEYS[1], 'until', ARGV[2])
else
  until_ms = existing
end
local floor = math.floor(now / tonumber(ARGV[3])) + 1
local old_floor = tonumber(redis.call('HGET', KEYS[1], 'floor') or '-1')
if floor > old_floor then
  redis.call('HSET', KEYS[1], 'floor', floor)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return tostring(until_ms)
"""

# KEYS[1]: the limiter's theoretical arrival time. ARGV: now, interval, tolerance,
# max wait (all ms); now '' for the Redis server's clock (TIME). Returns {granted (0/1),
# wait or retry-after (ms, as a string), the stored tat minus now afterwards (ms, as a
# string)}.
# Numbers are written with '%.3f': Lua's tostring keeps 14 significant digits, which at
# epoch milliseconds (13 digits) would leave 0.1 ms steps and spurious refusals; the
# comparison tolerates 1 microsecond of float dust for the same reason.
_GCRA = """
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
end
local interval = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tolerance - now
if wait > max_wait + 0.001 then
  return {0, string.format('%.3f', wait), string.format('%.3f', tat - now)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(new_tat - now) + 1000)
if wait < 0.001 then wait = 0 end
return {1, string.format('%.3f', wait), string.format('%.3f', new_tat - now)}
"""


def _ms(seconds: float) -> int:
    return math.floor(seconds * 1000)


class RedisSharedState(SharedState):
    """A :class:`~atoll.resilience.SharedState` in Redis (redis-py's asyncio client).

    Keys are ``{prefix}:{<name>}:...`` (the braces are a hash tag, so a breaker's keys
    live in one Redis Cluster slot) and expire on their own. Give ``client`` short socket
    timeouts: the policies bound every operation anyway, but a client that gives up
    early frees its connection sooner. :meth:`from_url` does that.

    ``server_time``: rate limits read the Redis server's clock (``TIME``), not the
    ``now`` each caller passes. Instances on several hosts then share one clock: with
    their own, a host whose clock is ahead finds every limiter's theoretical arrival
    time in its past and is granted a fresh burst, and one whose clock is behind is
    refused for its skew. Pass ``False`` to use the callers' clocks, as a simulation on
    a :class:`~atoll.determinism.VirtualClock` must. Breakers' windows keep the callers'
    clocks either way: a skew shifts when a bucket starts, not what a limit grants.
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "atoll",
        owns_client: bool = False,
        server_time: bool = True,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._owns = owns_client
        self.server_time = server_time
        self._sync = client.register_script(_SYNC)
        self._open = client.register_script(_OPEN)
        self._gcra = client.register_script(_GCRA)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "atoll",
        socket_timeout: float = 0.25,
        server_time: bool = True,
    ) -> Self:
        """A store with its own client for ``url`` (closed by :meth:`aclose`)."""
        client = Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry_on_timeout=False,
        )
        return cls(client, prefix=prefix, owns_client=True, server_time=server_time)

    def _now(self, now: float) -> str:
        """The GCRA script's ``now`` argument: empty for the server's clock."""
        return "" if self.server_time else repr(now * 1000)

    def _key(self, kind: str, name: str, part: str) -> str:
        return f"{self._prefix}:{kind}:{{{name}}}:{part}"

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
        width = max(1, _ms(bucket_width))
        reply: list[Any] = await self._sync(
            keys=[self._key("breaker", name, "window"), self._key("breaker", name, "state")],
            args=[_ms(now), width, buckets, calls, failures, slow, width * (buckets + 1)],
        )
        return SharedWindow(
            calls=int(reply[0]),
            failures=int(reply[1]),
            slow=int(reply[2]),
            open_until=float(reply[3]) / 1000,
        )

    async def open_circuit(
        self, name: str, *, now: float, until: float, bucket_width: float, buckets: int
    ) -> float:
        width = max(1, _ms(bucket_width))
        ttl = max(_ms(until - now), width * buckets) + width
        reply: Any = await self._open(
            keys=[self._key("breaker", name, "state")],
            args=[_ms(now), _ms(until), width, ttl],
        )
        return float(reply) / 1000

    async def reserve_permit(
        self, name: str, *, now: float, interval: float, tolerance: float, max_wait: float
    ) -> tuple[bool, float]:
        reply: list[Any] = await self._gcra(
            keys=[self._key("limiter", name, "tat")],
            args=[
                self._now(now),
                repr(interval * 1000),
                repr(tolerance * 1000),
                repr(max_wait * 1000),
            ],
        )
        return bool(int(reply[0])), max(0.0, float(reply[1]) / 1000)

    async def take_permit(
        self, name: str, *, now: float, interval: float, tolerance: float
    ) -> tuple[bool, float, float]:
        reply: list[Any] = await self._gcra(
            keys=[self._key("limiter", name, "tat")],
            args=[self._now(now), repr(interval * 1000), repr(tolerance * 1000), "0"],
        )
        return bool(int(reply[0])), max(0.0, float(reply[1]) / 1000), float(reply[2]) / 1000

    async def aclose(self) -> None:
        if self._owns:
            await self._client.aclose()

    def __repr__(self) -> str:
        return f"RedisSharedState(prefix={self._prefix!r})"
