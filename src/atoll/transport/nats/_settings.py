"""``nats://`` URLs: where the server is, how to authenticate, and the transport's options."""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from atoll._urls import URLError, query_options, redact, reject_unknown, take_option
from atoll.transport._base import TransportError

_NAMESPACE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")

#: Environment variables read when the URL carries no credentials of that kind.
ENV_USER = "ATOLL_NATS_USER"
ENV_PASSWORD = "ATOLL_NATS_PASSWORD"  # noqa: S105 - the name of a variable, not a secret
ENV_TOKEN = "ATOLL_NATS_TOKEN"  # noqa: S105 - same
ENV_CREDS = "ATOLL_NATS_CREDS"

Storage = Literal["file", "memory"]
T = TypeVar("T")


def display_url(url: str) -> str:
    """``url`` safe to show: the password and a bare token in the user part are masked.

    NATS reads ``nats://TOKEN@host`` (a user without a password) as a token, which
    :func:`atoll._urls.redact` would leave visible.
    """
    shown = redact(url)
    parts = urlsplit(shown)
    if parts.username and parts.password is None and "@" in parts.netloc:
        host = parts.netloc.rsplit("@", 1)[1]
        shown = urlunsplit(parts._replace(netloc=f"***@{host}"))
    return shown


def _positive(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError(value)
    return number


def _count(low: int, high: int) -> Callable[[str], int]:
    def convert(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(value)
        return number

    return convert


def _optional(convert: Callable[[str], T]) -> Callable[[str], T | None]:
    return convert


def _flag(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def _storage(value: str) -> Storage:
    if value not in ("file", "memory"):
        raise ValueError(value)
    return value  # type: ignore[return-value]


def _namespace(value: str) -> str:
    if not _NAMESPACE.match(value):
        raise ValueError(value)
    return value


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """Everything a :class:`NatsTransport` reads from its URL and environment.

    Secrets are held here only; ``repr`` and :attr:`display` never show them.
    """

    display: str
    server: str
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds: str | None = None
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    namespace: str = "atoll"
    #: ``None``: what the namespace was created with (16 for a new one).
    partitions: int | None = None
    ack_wait: float = 30.0
    #: ``None``: what the namespace was created with (10 s for a new one).
    lease: float | None = None
    max_ack_pending: int = 512
    replicas: int = 1
    storage: Storage = "file"
    duplicate_window: float = 120.0
    connect_timeout: float = 60.0
    publish_timeout: float = 10.0

    @classmethod
    def from_url(cls, url: str, *, environ: Mapping[str, str] | None = None) -> NatsSettings:
        """Parse ``nats://[user:pass@]host[:port][?option=value&...]``.

        Credentials come from the URL, else from files named by options (``creds``,
        ``password_file``, ``token_file``), else from ``ATOLL_NATS_*`` variables.
        """
        env = os.environ if environ is None else environ
        shown = display_url(url)
        parts = urlsplit(url)
        if parts.scheme != "nats":
            raise URLError(f"{shown}: expected nats://host:port")
        try:
            host = parts.hostname or "127.0.0.1"
            port = parts.port or 4222
        except ValueError:
            raise URLError(f"{shown}: the port is not a number") from None
        if ":" in host:
            host = f"[{host}]"
        options = query_options(url)
        user, password, token, creds = _credentials(parts, options, env, shown)
        tls_ca = take_option(options, "tls_ca", str, "", shown) or None
        tls_cert = take_option(options, "tls_cert", str, "", shown) or None
        tls_key = take_option(options, "tls_key", str, "", shown) or None
        tls = take_option(options, "tls", _flag, False, shown) or bool(tls_ca or tls_cert)
        if bool(tls_cert) != bool(tls_key):
            raise URLError(f"{shown}: tls_cert and tls_key go together")
        for name, path in (("creds", creds), ("tls_ca", tls_ca), ("tls_cert", tls_cert)):
            _must_exist(name, path, shown)
        _must_exist("tls_key", tls_key, shown)
        settings = cls(
            display=shown,
            server=f"{'tls' if tls else 'nats'}://{host}:{port}",
            user=user,
            password=password,
            token=token,
            creds=creds,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            namespace=take_option(options, "namespace", _namespace, "atoll", shown),
            partitions=take_option(options, "partitions", _optional(_count(1, 1024)), None, shown),
            ack_wait=take_option(options, "ack_wait", _positive, 30.0, shown),
            lease=take_option(options, "lease", _optional(_positive), None, shown),
            max_ack_pending=take_option(
                options, "max_ack_pending", _count(1, 1_000_000), 512, shown
            ),
            replicas=take_option(options, "replicas", _count(1, 5), 1, shown),
            storage=take_option(options, "storage", _storage, "file", shown),
            duplicate_window=take_option(options, "duplicate_window", _positive, 120.0, shown),
            connect_timeout=take_option(options, "connect_timeout", _positive, 60.0, shown),
            publish_timeout=take_option(options, "publish_timeout", _positive, 10.0, shown),
        )
        reject_unknown(options, shown)
        return settings

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for the connection, or ``None`` without TLS."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise TransportError(f"{self.display}: cannot load the TLS files: {exc}") from None
        return context

    def credentials(self) -> dict[str, str]:
        """Keyword arguments of ``nats.connect`` that authenticate."""
        found: dict[str, str] = {}
        if self.user is not None:
            found["user"] = self.user
            found["password"] = self.password or ""
        if self.token is not None:
            found["token"] = self.token
        if self.creds is not None:
            found["user_credentials"] = self.creds
        return found

    def auth_method(self) -> str:
        """How this connection authenticates, for error messages (never the secret)."""
        if self.creds is not None:
            return f"credentials file {self.creds}"
        if self.token is not None:
            return "a token"
        if self.user is not None:
            return f"user {self.user!r} with a password"
        return "no credentials"


def _credentials(
    parts: SplitResult, options: dict[str, str], env: Mapping[str, str], shown: str
) -> tuple[str | None, str | None, str | None, str | None]:
    """(user, password, token, creds file) from the URL, files it names, or the environment."""
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    password_file = take_option(options, "password_file", str, "", shown)
    token_file = take_option(options, "token_file", str, "", shown)
    creds = take_option(options, "creds", str, "", shown) or env.get(ENV_CREDS) or None
    if user is not None and password is None:
        if password_file:
            password = _read_secret(password_file, "password_file", shown)
        elif env.get(ENV_PASSWORD):
            password = env[ENV_PASSWORD]
    token: str | None = None
    if user is not None and password is None:
        token, user = user, None  # NATS convention: a user part alone is a token
    if token is None and token_file:
        token = _read_secret(token_file, "token_file", shown)
    if user is None and token is None and creds is None:
        user = env.get(ENV_USER) or None
        if user is not None:
            password = env.get(ENV_PASSWORD)
        else:
            token = env.get(ENV_TOKEN) or None
    return user, password, token, creds


def _must_exist(option: str, path: str | None, shown: str) -> None:
    if path is not None and not Path(path).is_file():
        raise URLError(f"{shown}: {option} file {path} does not exist")


def _read_secret(path: str, option: str, shown: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise URLError(f"{shown}: cannot read {option} {path}: {exc.strerror}") from None
