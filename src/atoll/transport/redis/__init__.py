"""The Redis Streams transport: topics are streams, groups are consumer groups.

``redis://[user[:password]@]host[:port][/db]?namespace=atoll`` (``rediss://`` for TLS);
needs the ``atoll[redis]`` extra. See ``docs/transports.md`` for the design and what it
needs of the Redis server.
"""

from atoll.transport.redis._settings import RedisSettings
from atoll.transport.redis._transport import RedisTransport

__all__ = ["RedisSettings", "RedisTransport"]
