"""The RabbitMQ transport: ``amqp://user:pass@host:port/vhost?options`` (needs ``atoll[rabbitmq]``).

``docs/transports.md`` describes the topology, per-key ordering with competing
consumers, retries, dead letters and every URL option.
"""

from atoll.transport.rabbitmq._settings import RabbitMQSettings
from atoll.transport.rabbitmq._transport import RabbitMQTransport

__all__ = ["RabbitMQSettings", "RabbitMQTransport"]
