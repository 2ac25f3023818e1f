"""The RabbitMQ transport's configuration, read from its URL."""

from __future__ import annotations

import math
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import quote, unquote, urlencode, urlsplit

from atoll._urls import URLError, query_options, redact, reject_unknown, take_option

QueueType = Literal["quorum", "classic"]

#: Messages are routed to one of this many slots by a hash of their key; a group's
#: partition queues share the slots between them, so the count must divide it.
SLOTS = 16

#: Environment variables read when the URL carries no user or password.
USER_ENV = "ATOLL_RABBITMQ_USER"
PASSWORD_ENV = "ATOLL_RABBITMQ_PASSWORD"  # noqa: S105 - the name of a variable, not a secret


def _partitions(value: str) -> int:
    count = int(value)
    if count < 1 or SLOTS % count:
        raise ValueError(value)
    return count


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(value)
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(value)
    return number


def _queue_type(value: str) -> QueueType:
    if value == "quorum":
        return "quorum"
    if value == "classic":
        return "classic"
    raise ValueError(value)


def _name(value: str) -> str:
    if not value or len(value) > 64 or any(c.isspace() for c in value):
        raise ValueError(value)
    return value


@dataclass(frozen=True, slots=True)
class RabbitMQSettings:
    """Everything the transport needs to reach and use one RabbitMQ virtual host.

    Built by :meth:`from_url`; ``password`` never appears in ``repr`` or in messages.
    """

    url: str
    host: str
    port: int
    vhost: str
    user: str
    password: str = field(repr=False)
    tls: ssl.SSLContext | None = None
    #: Prefix of every exchange and queue: systems (and tests) with different
    #: namespaces share a broker without seeing each other.
    namespace: str = "atoll"
    #: Partition queues of a group created by this process (each consumed by one
    #: instance at a time; more partitions let more instances share a group's load).
    partitions: int = 4
    #: Unacknowledged deliveries per partition consumer; ``None``: twice the batch size.
    prefetch: int | None = None
    queue_type: QueueType = "quorum"
    #: Seconds of silence after which the broker drops a connection (and gives what it
    #: held to another instance); consumers stop handing out messages before that.
    heartbeat: int = 20
    connect_timeout: float = 10.0
    #: How long a publish waits for the broker's confirms (a memory or disk alarm
    #: blocks publishers) before it fails and the outbox tries again.
    publish_timeout: float = 30.0
    #: How long :meth:`RabbitMQTransport.connect` keeps retrying an unreachable broker.
    connect_retry: float = math.inf
    #: Seconds between checks of how many instances share a group.
    rebalance_interval: float = 2.0
    #: How long a dead-letter operation waits for another process's to finish.
    lock_timeout: float = 10.0

    @property
    def redacted(self) -> str:
        """The URL without its password: safe for logs and errors."""
        return redact(self.url)

    @property
    def address(self) -> str:
        """``host:port``: what a connection attempt tries."""
        return f"{self.host}:{self.port}"

    def amqp_url(self, connection_name: str) -> str:
        """The URL handed to aiormq (credentials included: never log it)."""
        path = "/" if self.vhost == "/" else "/" + quote(self.vhost, safe="")
        host = f"[{self.host}]" if ":" in self.host else self.host
        userinfo = f"{quote(self.user, safe='')}:{quote(self.password, safe='')}"
        query = urlencode({"heartbeat": str(self.heartbeat), "name": connection_name})
        scheme = "amqps" if self.tls is not None else "amqp"
        return f"{scheme}://{userinfo}@{host}:{self.port}{path}?{query}"

    @classmethod
    def from_url(cls, url: str, *, environ: Mapping[str, str] | None = None) -> RabbitMQSettings:
        """Parse ``amqp://user:pass@host:port/vhost?options`` (or ``amqps://``).

        Credentials come from the URL, else from the files named by ``user_file`` and
        ``password_file``, else from ``$ATOLL_RABBITMQ_USER`` and
        ``$ATOLL_RABBITMQ_PASSWORD``, else ``guest``. Every error names the URL without
        its password.
        """
        env = os.environ if environ is None else environ
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "amqps"):
            raise URLError(f"{redact(url)}: expected amqp:// or amqps://")
        try:
            port = parts.port
        except ValueError:
            raise URLError(f"{redact(url)}: the port is not a number") from None
        tls_scheme = parts.scheme == "amqps"
        options = query_options(url)
        user_file = take_option(options, "user_file", Path, None, url)
        password_file = take_option(options, "password_file", Path, None, url)
        tls_ca = take_option(options, "tls_ca", Path, None, url)
        tls_cert = take_option(options, "tls_cert", Path, None, url)
        tls_key = take_option(options, "tls_key", Path, None, url)
        settings = {
            "namespace": take_option(options, "namespace", _name, "atoll", url),
            "partitions": take_option(options, "partitions", _partitions, 4, url),
            "prefetch": take_option(options, "prefetch", _positive_int, None, url),
            "queue_type": take_option(options, "queue_type", _queue_type, "quorum", url),
            "heartbeat": take_option(options, "heartbeat", _positive_int, 20, url),
            "connect_timeout": take_option(options, "connect_timeout", _positive, 10.0, url),
            "publish_timeout": take_option(options, "publish_timeout", _positive, 30.0, url),
            "connect_retry": take_option(options, "connect_retry", _positive, math.inf, url),
            "rebalance_interval": take_option(options, "rebalance_interval", _positive, 2.0, url),
            "lock_timeout": take_option(options, "lock_timeout", _positive, 10.0, url),
        }
        reject_unknown(options, url)
        if not tls_scheme and (tls_ca or tls_cert or tls_key):
            raise URLError(f"{redact(url)}: tls_ca, tls_cert and tls_key need amqps://")
        if tls_key is not None and tls_cert is None:
            raise URLError(f"{redact(url)}: tls_key needs tls_cert")
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        if user_file is not None:
            if user is not None:
                raise URLError(f"{redact(url)}: give the user in the URL or in user_file, not both")
            user = _read_secret(user_file, "user_file", url)
        if password_file is not None:
            if password is not None:
                raise URLError(
                    f"{redact(url)}: give the password in the URL or in password_file, not both"
                )
            password = _read_secret(password_file, "password_file", url)
        user = user if user is not None else env.get(USER_ENV, "guest")
        password = password if password is not None else env.get(PASSWORD_ENV, "guest")
        path = parts.path
        vhost = "/" if path in ("", "/") else unquote(path[1:])
        tls = _tls_context(tls_ca, tls_cert, tls_key, url) if tls_scheme else None
        return cls(
            url=url,
            host=parts.hostname or "localhost",
            port=port or (5671 if tls_scheme else 5672),
            vhost=vhost,
            user=user,
            password=password,
            tls=tls,
            **settings,  # type: ignore[arg-type]
        )


def _read_secret(path: Path, option: str, url: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise URLError(f"{redact(url)}: cannot read {option} {path}: {exc.strerror}") from None


def _tls_context(ca: Path | None, cert: Path | None, key: Path | None, url: str) -> ssl.SSLContext:
    """Verify the server (against ``ca`` or the system's CAs); present ``cert`` if given."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    except FileNotFoundError as exc:
        raise URLError(f"{redact(url)}: TLS file not found: {exc.filename}") from None
    except (ssl.SSLError, OSError) as exc:
        raise URLError(f"{redact(url)}: cannot load the TLS files: {exc}") from None
    return context
