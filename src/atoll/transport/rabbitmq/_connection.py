"""Opening AMQP connections: error mapping, backoff and one log line per outage."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl

import aiormq
from aiormq.abc import AbstractConnection

from atoll.determinism import Clock, RandomSource
from atoll.transport._base import TransportError, TransportUnavailableError
from atoll.transport.rabbitmq._settings import RabbitMQSettings

log = logging.getLogger("atoll.transport.rabbitmq")


class _QuietConnectFailures(logging.Filter):
    """Drops aiormq's lines about failed and lost connections.

    aiormq logs an error for every failed connection attempt and a traceback for every
    lost connection; the transport reports outages itself, once, naming the URL
    (without its password) and what it tried. Other aiormq records pass.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("error when creating transport"):
            return False
        if message.startswith("Cancelling cause reader exited abnormally"):
            failure = record.exc_info[1] if record.exc_info else None
            return not isinstance(failure, ConnectionError)
        return True


logging.getLogger("aiormq.connection").addFilter(_QuietConnectFailures())


def describe(exc: BaseException, secret: str) -> str:
    """A short reason for a failed operation, never containing ``secret``."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], int) and len(args) > 1:
        text = os.strerror(args[0]).lower()
    elif isinstance(exc, TimeoutError):
        text = "timed out"
    else:
        text = str(exc) or type(exc).__name__
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return text


async def open_connection(settings: RabbitMQSettings, purpose: str) -> AbstractConnection:
    """One connection attempt.

    Raises :class:`TransportUnavailableError` if the broker cannot be reached (worth
    retrying) and :class:`TransportError` if it refused us (wrong credentials, unknown
    virtual host, TLS verification): retrying would not help.
    """
    where = settings.redacted
    try:
        async with asyncio.timeout(settings.connect_timeout):
            connection = aiormq.Connection(
                settings.amqp_url(f"atoll {purpose} pid {os.getpid()}"), context=settings.tls
            )
            try:
                await connection.connect()
            except BaseException:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
    except (aiormq.exceptions.ProbableAuthenticationError, aiormq.exceptions.AuthenticationError):
        raise TransportError(
            f"RabbitMQ at {where} refused the login of user {settings.user!r}"
            " (ACCESS_REFUSED): check the user name and password"
        ) from None
    except aiormq.exceptions.InvalidFrameError as exc:
        if "Connection.Close" not in str(exc):
            reason = describe(exc, settings.password)
            raise TransportUnavailableError(
                f"RabbitMQ at {where} spoke an unexpected protocol: {reason}"
            ) from None
        raise TransportError(
            f"RabbitMQ at {where} would not open virtual host {settings.vhost!r}: it does not"
            f" exist or user {settings.user!r} has no access to it"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        raise TransportError(
            f"RabbitMQ at {where}: the server's TLS certificate was not accepted"
            f" ({exc.verify_message}); check tls_ca"
        ) from None
    except ssl.SSLError as exc:
        raise TransportError(
            f"RabbitMQ at {where}: TLS handshake with {settings.address} failed ({exc.reason})"
        ) from None
    except (TimeoutError, OSError, aiormq.exceptions.AMQPError) as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ssl.SSLError) else None
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise TransportError(
                f"RabbitMQ at {where}: the server's TLS certificate was not accepted"
                f" ({cause.verify_message}); check tls_ca"
            ) from None
        raise TransportUnavailableError(
            f"RabbitMQ at {where} is unreachable: tried {settings.address}"
            f" ({describe(exc, settings.password)})"
        ) from None
    version = str(connection.server_properties.get("version", "?"))
    log.debug("connected to RabbitMQ %s at %s for %s", version, where, purpose)
    return connection


class Link:
    """A connection for one purpose, reopened when it is lost.

    :meth:`get` opens it at most once per call (for callers that retry themselves, like
    the outbox relay); :meth:`wait` retries with full-jitter backoff and logs an outage
    once (and again only if the reason changes), then once more when it is over.
    """

    def __init__(
        self, settings: RabbitMQSettings, purpose: str, clock: Clock, random: RandomSource
    ) -> None:
        self.settings = settings
        self.purpose = purpose
        self._clock = clock
        self._random = random
        self._connection: AbstractConnection | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._reported: str | None = None

    @property
    def connection(self) -> AbstractConnection | None:
        """The open connection, if any."""
        connection = self._connection
        if connection is None or connection.is_closed:
            return None
        return connection

    async def get(self) -> AbstractConnection:
        """The open connection, opening it if needed (one attempt)."""
        connection = self.connection
        if connection is not None:
            return connection
        async with self._lock:
            connection = self.connection
            if connection is not None:
                return connection
            try:
                connection = await open_connection(self.settings, self.purpose)
            except TransportUnavailableError as exc:
                self._report(exc)
                raise
            self._recovered()
            self._connection = connection
            return connection

    async def wait(self, *, give_up_after: float | None = None) -> AbstractConnection:
        """The open connection, retrying with backoff until it opens.

        Gives up (re-raising the last error) after ``give_up_after`` seconds; a refusal
        (credentials, virtual host, TLS) is raised at once.
        """
        limit = self.settings.connect_retry if give_up_after is None else give_up_after
        deadline = self._clock.monotonic() + limit
        attempt = 0
        while True:
            try:
                return await self.get()
            except TransportUnavailableError:
                attempt += 1
                if self._clock.monotonic() >= deadline:
                    raise
                cap = min(5.0, 0.1 * 2 ** min(attempt, 10))
                await self._clock.sleep(self._random.uniform(cap / 2, cap))

    def _report(self, exc: TransportUnavailableError) -> None:
        self._failures += 1
        text = str(exc)
        if text != self._reported:
            self._reported = text
            log.warning("%s (%s); retrying with backoff", text, self.purpose)
        else:
            log.debug("%s (%s, attempt %d)", text, self.purpose, self._failures)

    def _recovered(self) -> None:
        if self._failures:
            log.info(
                "RabbitMQ at %s is reachable again (%s) after %d failed attempts",
                self.settings.redacted,
                self.purpose,
                self._failures,
            )
        self._failures = 0
        self._reported = None

    def lost(self, reason: str) -> None:
        """Note that the connection was lost (logged once per outage)."""
        if self._reported is None:
            self._reported = f"lost: {reason}"
            self._failures = max(self._failures, 1)
            log.warning(
                "lost the connection to RabbitMQ at %s (%s): %s; reconnecting",
                self.settings.redacted,
                self.purpose,
                reason,
            )

    async def close(self) -> None:
        """Close the connection (if open)."""
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception):
                await connection.close()
