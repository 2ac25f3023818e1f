"""Redis as the shared state of breakers and rate limiters (needs the ``redis`` extra)."""

from atoll.resilience.redis._store import RedisSharedState

__all__ = ["RedisSharedState"]
