"""Helpers for the RabbitMQ transport tests: the server's URL, namespaces, clean-up."""

import os
from urllib.parse import urlsplit, urlunsplit

import aiormq

from atoll.determinism import RandomSource
from atoll.transport.rabbitmq._settings import SLOTS
from atoll.transport.rabbitmq._topology import Names

BASE_URL = os.environ.get("ATOLL_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/")
_random = RandomSource()


def new_namespace() -> str:
    """A namespace no other test uses."""
    return f"atoll-test-{_random.new_id()[-12:]}"


def url(namespace: str, *, host: str | None = None, port: int | None = None, **options) -> str:
    """The test server's URL (or a proxy's) for ``namespace`` with extra options."""
    parts = urlsplit(BASE_URL)
    netloc = parts.netloc
    if host is not None:
        userinfo = netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""
        netloc = f"{userinfo}{host}:{port}"
    query = "&".join(f"{k}={v}" for k, v in {"namespace": namespace, **options}.items())
    return urlunsplit((parts.scheme, netloc, parts.path or "/", query, ""))


def server_address() -> tuple[str, int]:
    parts = urlsplit(BASE_URL)
    return parts.hostname or "127.0.0.1", parts.port or 5672


async def delete_namespace(namespace: str, groups) -> None:
    """Delete every exchange and queue the transport declares in ``namespace`` for ``groups``."""
    names = Names(namespace)
    queues = [names.dead_queue, names.dead_lock]
    for group in groups:
        queues.extend(names.partition(group, i) for i in range(SLOTS))
        queues.append(names.members(group))
    connection = await aiormq.connect(BASE_URL)
    try:
        channel = await connection.channel()
        for queue in queues:
            await channel.queue_delete(queue)
        for exchange in (names.exchange, names.dead_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


async def queue_exists(queue: str) -> bool:
    connection = await aiormq.connect(BASE_URL)
    try:
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        return True
    finally:
        await connection.close()
