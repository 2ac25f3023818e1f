"""One connection to NATS: connecting with clear errors, JetStream requests, confirmed publishes."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from atoll.determinism import Clock
from atoll.transport._base import TransportError, TransportUnavailableError
from atoll.transport.nats._settings import NatsSettings

log = logging.getLogger("atoll.transport.nats")

#: JetStream API error codes this package reacts to.
ERR_WRONG_LAST_SEQUENCE = 10071
ERR_NO_MESSAGE = 10037
ERR_STORE_EOF = 10057
ERR_STREAM_EXISTS = 10058
#: What a create answers instead of ERR_STREAM_EXISTS when another client is creating
#: the same stream at that moment (its subjects are taken, its name not yet visible).
ERR_SUBJECTS_OVERLAP = 10065
ERR_STREAM_NOT_FOUND = 10059
ERR_CONSUMER_NOT_FOUND = 10014


class NatsApiError(TransportError):
    """JetStream refused a request; ``code`` is its ``err_code``."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class AuthenticationError(TransportError):
    """The server refused the credentials."""


class TlsError(TransportError):
    """The TLS handshake failed (an unknown CA, a wrong certificate or key)."""


def _is_auth_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, nats.errors.AuthorizationError) or "authorization" in text


def describe(exc: BaseException) -> str:
    """A one-line description of a connection failure, without secrets."""
    if isinstance(exc, nats.errors.NoServersError):
        return "no server answered"
    if isinstance(exc, TimeoutError | nats.errors.TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"


def _drop_failed_socket(client: Client) -> None:
    """Close the socket of a failed connection attempt.

    nats-py opens a new socket for each attempt and drops the old one unclosed when an
    attempt fails after connecting (the server closed it at once, as a refusing proxy
    or a restarting server does); closing it here avoids leaking it.
    """
    transport = getattr(client, "_transport", None)
    if transport is not None:
        try:
            transport.close()
        except Exception as exc:
            log.debug("closing a failed connection attempt: %s", exc)


class Link:
    """A nats-py client with atoll's error mapping.

    ``reconnect=False`` gives a connection that closes on the first failure and never
    resends what it buffered: the publishing connection needs that, because nats-py
    replays its buffer after a reconnect, which could store a later message of a key
    while an earlier one was lost with the old socket.
    """

    def __init__(
        self,
        settings: NatsSettings,
        *,
        name: str,
        reconnect: bool,
        clock: Clock,
        on_reconnect: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        self._reconnect = reconnect
        self._clock = clock
        self._on_reconnect = on_reconnect
        self.nc: Client | None = None
        self._ack_inbox = ""
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._ack_ids = itertools.count(1)
        self._logged: str | None = None
        self._last_error: BaseException | None = None
        #: Resolved when the connection drops: requests waiting on it fail at once.
        self._lost: asyncio.Future[Any] | None = None
        self._connecting: Client | None = None

    @property
    def connected(self) -> bool:
        """Whether the connection is up now."""
        return self.nc is not None and self.nc.is_connected

    @property
    def closed(self) -> bool:
        """Whether the connection is gone for good (a non-reconnecting link after a failure)."""
        return self.nc is None or self.nc.is_closed

    def client(self) -> Client:
        """The nats-py client; raises if the link is not open."""
        if self.nc is None or self.nc.is_closed:
            raise TransportUnavailableError(f"not connected to NATS at {self.settings.display}")
        return self.nc

    # -- connecting -----------------------------------------------------------------------

    async def open_once(self, timeout: float) -> None:
        """Connect once, or raise :class:`TransportUnavailableError` (or an auth error)."""
        s = self.settings
        attempt_timeout = max(0.5, min(timeout, 5.0))
        options: dict[str, Any] = {
            "servers": [s.server],
            "name": self.name,
            "connect_timeout": attempt_timeout,
            # One attempt: the caller retries with its own backoff and one log line.
            # Reconnecting is switched on below, once connected, for a reconnecting link.
            "allow_reconnect": False,
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.05,
            "ping_interval": 5,
            "max_outstanding_pings": 3,
            "error_cb": self._error,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "closed_cb": self._closed,
            **s.credentials(),
        }
        tls = s.ssl_context()
        if tls is not None:
            options["tls"] = tls
        self._last_error = None
        nc = Client()
        self._connecting = nc
        try:
            # nats-py can hang in a failed TLS handshake: bound the whole attempt.
            async with asyncio.timeout(attempt_timeout * 2 + 1):
                await nc.connect(**options)
        except Exception as exc:
            _drop_failed_socket(nc)
            raise self._connect_error(self._cause(exc)) from None
        finally:
            self._connecting = None
        if self._reconnect:
            nc.options["allow_reconnect"] = True
            nc.options["max_reconnect_attempts"] = -1
            nc.options["reconnect_time_wait"] = 0.25
        self.nc = nc
        self._ack_inbox = nc.new_inbox()
        await nc.subscribe(f"{self._ack_inbox}.*", cb=self._on_ack)
        self._logged = None

    def _connect_error(self, cause: BaseException) -> TransportError:
        s = self.settings
        if _is_auth_error(cause):
            return AuthenticationError(
                f"NATS at {s.display} refused the connection: authorization failed"
                f" (authenticated with {s.auth_method()}); check the user and password,"
                " token or credentials file"
            )
        if isinstance(cause, ssl.SSLError):
            return TlsError(
                f"TLS with NATS at {s.display} failed: {describe(cause)}; check tls_ca"
                " (the CA that signed the server's certificate), tls_cert and tls_key"
            )
        if isinstance(cause, TransportError):
            return cause
        return TransportUnavailableError(
            f"cannot reach NATS at {s.display} (tried {s.server}: {describe(cause)})"
        )

    def _cause(self, exc: BaseException) -> BaseException:
        # nats-py reports "no servers" at the end; the error callback saw the real cause.
        if isinstance(exc, nats.errors.NoServersError) and self._last_error is not None:
            return self._last_error
        return exc

    async def open(self, timeout: float, *, what: str = "start") -> None:
        """Connect, retrying with backoff for up to ``timeout`` seconds.

        The first failure is logged once, naming the URL (without its password) and what
        was tried; authorization failures are not retried.
        """
        deadline = self._clock.monotonic() + timeout
        attempt = 0
        while True:
            remaining = deadline - self._clock.monotonic()
            try:
                await self.open_once(max(0.5, remaining))
            except (AuthenticationError, TlsError):
                raise  # retrying cannot help
            except TransportUnavailableError as exc:
                attempt += 1
                if self._clock.monotonic() >= deadline:
                    raise TransportUnavailableError(
                        f"{exc}; gave up after {attempt} attempts in {timeout:g}s"
                    ) from None
                if attempt == 1:
                    log.warning("%s at %s; retrying with backoff for up to %gs", exc, what, timeout)
                delay = min(2.0, 0.1 * 2 ** min(attempt, 5), max(0.0, remaining))
                await self._clock.sleep(delay)
            else:
                if attempt:
                    log.info("connected to NATS at %s", self.settings.display)
                return

    async def close(self) -> None:
        """Flush what is buffered (acks) and close."""
        nc, self.nc = self.nc, None
        self._connection_lost()
        self._fail_acks(TransportUnavailableError("the connection was closed"))
        if nc is None or nc.is_closed:
            return
        try:
            if nc.is_connected:
                await nc.flush(timeout=2)
        except Exception as exc:
            log.debug("flush before close failed: %s", exc)
        try:
            await nc.close()
        except Exception as exc:
            log.debug("close failed: %s", exc)

    async def _error(self, exc: Exception) -> None:
        self._last_error = exc
        client = self.nc or self._connecting
        if client is not None and (client.is_connecting or client.is_reconnecting):
            _drop_failed_socket(client)
        if self.nc is None:
            return  # connecting: open() reports the failure once
        text = describe(exc)
        if text != self._logged:
            self._logged = text
            log.warning("NATS connection %s to %s: %s", self.name, self.settings.display, text)

    def _connection_lost(self) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def _disconnected(self) -> None:
        self._connection_lost()
        self._fail_acks(
            TransportUnavailableError(f"lost the connection to {self.settings.display}")
        )
        if self.nc is not None and not self.nc.is_closed and self._reconnect:
            log.warning(
                "lost the connection %s to NATS at %s; reconnecting",
                self.name,
                self.settings.display,
            )

    async def _reconnected(self) -> None:
        self._logged = None
        log.info("reconnected %s to NATS at %s", self.name, self.settings.display)
        if self._on_reconnect is not None:
            await self._on_reconnect()

    async def _closed(self) -> None:
        self._connection_lost()
        self._fail_acks(
            TransportUnavailableError(f"the connection to {self.settings.display} closed")
        )

    # -- requests -------------------------------------------------------------------------

    async def request(self, subject: str, data: bytes, what: str, *, idempotent: bool) -> Msg:
        """A request that fails fast when the connection drops.

        nats-py keeps waiting for the reply of a request that was lost with the old
        socket; here the request fails as soon as the connection is lost and, when
        ``idempotent``, is sent again once it is back (within about ten seconds).
        """
        clock = self._clock
        deadline = clock.monotonic() + (10.0 if idempotent else 5.0)
        while True:
            nc = self.client()
            remaining = deadline - clock.monotonic()
            if not nc.is_connected:
                if remaining <= 0:
                    raise TransportUnavailableError(
                        f"NATS at {self.settings.display}: {what}: not connected"
                    )
                await clock.sleep(0.02)
                continue
            result = await self._request_once(nc, subject, data, max(0.5, min(5.0, remaining)))
            if isinstance(result, Msg):
                return result
            if isinstance(result, nats.errors.NoRespondersError):
                raise TransportUnavailableError(
                    f"NATS at {self.settings.display}: {what}: nothing answers on {subject}"
                    " (is JetStream enabled, with -js, and does the stream exist?)"
                )
            if not idempotent or clock.monotonic() >= deadline:
                raise TransportUnavailableError(
                    f"NATS at {self.settings.display}: {what} failed ({describe(result)})"
                ) from None

    async def _request_once(
        self, nc: Client, subject: str, data: bytes, timeout: float
    ) -> Msg | BaseException:
        """The reply, or what went wrong (the connection dropping ends the wait)."""
        loop = asyncio.get_running_loop()
        if self._lost is None or self._lost.done():
            self._lost = loop.create_future()
        lost = self._lost
        task: asyncio.Future[Any] = loop.create_task(nc.request(subject, data, timeout=timeout))
        try:
            await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if not task.done() or task.cancelled():
            return ConnectionError("the connection was lost")
        try:
            reply: Msg = task.result()
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            return exc
        return reply

    async def api(
        self, subject: str, payload: dict[str, Any] | None = None, *, idempotent: bool = True
    ) -> dict[str, Any]:
        """Call the JetStream API (``$JS.API.<subject>``); raise on an error response.

        Requests are retried after a lost connection unless ``idempotent`` is false.
        """
        data = b"" if payload is None else json.dumps(payload).encode()
        what = subject.split(".", 2)[0].lower() + " request"
        msg = await self.request(f"$JS.API.{subject}", data, what, idempotent=idempotent)
        response: dict[str, Any] = json.loads(msg.data)
        error = response.get("error")
        if error is not None:
            raise NatsApiError(
                f"NATS at {self.settings.display}: {error.get('description', error)}",
                int(error.get("err_code", 0)),
            )
        return response

    async def direct_get(self, stream: str, request: dict[str, Any] | str) -> Msg | None:
        """A stored message by sequence (``{"seq": n}``, ``next_by_subj``) or last by subject.

        ``request`` as a string is a subject: its last message. ``None`` if there is none.
        """
        if isinstance(request, str):
            subject, data = f"$JS.API.DIRECT.GET.{stream}.{request}", b""
        else:
            subject, data = f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode()
        msg = await self.request(subject, data, f"reading {stream}", idempotent=True)
        status = (msg.headers or {}).get("Status")
        if status == "404":
            return None
        if status is not None:
            raise TransportError(f"NATS at {self.settings.display}: reading {stream}: {status}")
        return msg

    # -- confirmed publishing -------------------------------------------------------------

    async def send(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> asyncio.Future[Msg]:
        """Publish to a stream subject; the future resolves with the server's PubAck."""
        nc = self.client()
        if not nc.is_connected:
            raise TransportUnavailableError(f"not connected to NATS at {self.settings.display}")
        reply = f"{self._ack_inbox}.{next(self._ack_ids)}"
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._acks[reply] = future
        try:
            await nc.publish(subject, body, reply=reply, headers=headers)
        except Exception as exc:
            self._acks.pop(reply, None)
            raise TransportUnavailableError(
                f"publishing to NATS at {self.settings.display} failed ({describe(exc)})"
            ) from None
        return future

    async def store(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """Publish to a stream and wait for its PubAck; raise if it was refused."""
        future = await self.send(subject, body, headers)
        try:
            async with asyncio.timeout(self.settings.publish_timeout):
                reply = await future
        except TimeoutError:
            self._acks = {k: f for k, f in self._acks.items() if f is not future}
            raise TransportUnavailableError(
                f"NATS at {self.settings.display} did not confirm a message on {subject}"
                f" within {self.settings.publish_timeout:g}s"
            ) from None
        return self.pub_ack(reply, subject)

    def pub_ack(self, reply: Msg, subject: str) -> dict[str, Any]:
        """The PubAck in ``reply``; raise :class:`NatsApiError` if the stream refused it."""
        status = (reply.headers or {}).get("Status")
        if status == "503":
            raise TransportUnavailableError(
                f"NATS at {self.settings.display}: no stream takes {subject}"
            )
        response: dict[str, Any] = json.loads(reply.data)
        error = response.get("error")
        if error is not None:
            raise NatsApiError(
                f"NATS at {self.settings.display} refused a message on {subject}:"
                f" {error.get('description', error)}",
                int(error.get("err_code", 0)),
            )
        return response

    def forget(self, futures: list[asyncio.Future[Msg]]) -> None:
        """Stop waiting for these PubAcks (after a timeout)."""
        gone = set(map(id, futures))
        self._acks = {k: f for k, f in self._acks.items() if id(f) not in gone}

    async def _on_ack(self, msg: Msg) -> None:
        future = self._acks.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _fail_acks(self, exc: Exception) -> None:
        acks, self._acks = self._acks, {}
        for future in acks.values():
            if not future.done():
                future.set_exception(exc)
                # Retrieved here so that an abandoned publish leaves no "never retrieved".
                future.exception()
