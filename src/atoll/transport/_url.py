"""Choosing a transport by URL."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from atoll._urls import URLError, query_options, redact, reject_unknown, take_option
from atoll.determinism import Clock, RandomSource
from atoll.persistence._url import _synchronous, sqlite_path
from atoll.transport._base import Transport

#: Broker backends by scheme: each module exposes a class with ``from_url``.
_BROKERS = {
    "nats": ("atoll.transport.nats", "NatsTransport", "nats"),
    "amqp": ("atoll.transport.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "amqps": ("atoll.transport.rabbitmq", "RabbitMQTransport", "rabbitmq"),
    "redis": ("atoll.transport.redis", "RedisTransport", "redis"),
    "rediss": ("atoll.transport.redis", "RedisTransport", "redis"),
}


def transport_from_url(
    url: str,
    *,
    base_dir: Path,
    clock: Clock | None = None,
    random: RandomSource | None = None,
    synchronous: str = "FULL",
) -> Transport:
    """A :class:`Transport` for ``url``.

    ``sqlite:///bus.db`` is the embedded durable transport; ``memory://`` lives in one
    process; ``nats://``, ``amqp://`` and ``redis://`` need their extras.
    """
    scheme = urlsplit(url).scheme
    options = query_options(url)
    if scheme == "memory":
        reject_unknown(options, url)
        from atoll.transport.memory import InMemoryTransport  # noqa: PLC0415 - light import

        return InMemoryTransport(clock=clock, random=random)
    if scheme == "sqlite":
        from atoll.transport.sqlite import SQLiteTransport  # noqa: PLC0415 - light import

        kwargs: dict[str, Any] = {
            "synchronous": take_option(
                options, "synchronous", _synchronous, _synchronous(synchronous), url
            ),
            "lease": take_option(options, "lease", float, 30.0, url),
            "poll_interval": take_option(options, "poll_interval", float, 0.5, url),
        }
        reject_unknown(options, url)
        return SQLiteTransport(sqlite_path(url, base_dir), clock=clock, random=random, **kwargs)
    if scheme in _BROKERS:
        module_name, class_name, extra = _BROKERS[scheme]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise URLError(
                f"{redact(url)}: this transport is not available ({exc}); install atoll[{extra}]"
            ) from None
        transport: Transport = getattr(module, class_name).from_url(url, clock=clock, random=random)
        return transport
    raise URLError(f"{redact(url)}: no transport for scheme {scheme!r}")
