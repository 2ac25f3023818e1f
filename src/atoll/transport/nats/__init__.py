"""The NATS JetStream transport (``nats://``; needs ``atoll[nats]``)."""

from atoll.transport.nats._consumer import NatsConsumer
from atoll.transport.nats._dead_letters import NatsDeadLetters
from atoll.transport.nats._settings import NatsSettings
from atoll.transport.nats._transport import NatsTransport

__all__ = ["NatsConsumer", "NatsDeadLetters", "NatsSettings", "NatsTransport"]
