"""Connection settings of the Redis transport, from a URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from atoll._urls import URLError, query_options, redact, reject_unknown, take_option


def _seconds(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError(raw)
    return value


def _positive(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError(raw)
    return value


def _namespace(raw: str) -> str:
    # The namespace is a key prefix; "|" separates stream keys from entry ids inside
    # the scripts, and whitespace in key names only causes grief in redis-cli.
    if not raw or any(c in raw for c in "|{} \t\n"):
        raise ValueError(raw)
    return raw


def _password(shown: str, inline: str | None, file: str | None, env: str | None) -> str | None:
    """The password from exactly one of: the URL, a file, an environment variable."""
    if sum(source is not None for source in (inline, file, env)) > 1:
        raise URLError(
            f"{shown}: give the password one way: in the URL, password_file or password_env"
        )
    if file is not None:
        try:
            return Path(file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise URLError(f"{shown}: cannot read password_file {file}: {exc.strerror}") from None
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise URLError(f"{shown}: environment variable {env} is not set")
        return value
    return inline


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Where the Redis server is, how to reach it, and the transport's own options."""

    #: The URL without its password: the only form that may appear in logs and errors.
    display_url: str
    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    namespace: str = "atoll"
    lease: float = 30.0
    poll_interval: float = 1.0
    trim_interval: float = 5.0
    connect_timeout: float = 60.0
    socket_timeout: float = 10.0

    @classmethod
    def from_url(cls, url: str) -> RedisSettings:
        """Parse ``redis://[user[:password]@]host[:port][/db][?options]`` (or ``rediss://``).

        Options: ``namespace`` (key prefix, default ``atoll``), ``lease`` (seconds a
        delivery stays with a consumer that stopped renewing it, default 30),
        ``poll_interval`` (1), ``trim_interval`` (5), ``connect_timeout`` (seconds to keep
        retrying an unreachable server at start, default 60), ``socket_timeout`` (10);
        ``password_file`` (a file holding the password) or ``password_env`` (the name of
        an environment variable holding it) instead of a password in the URL; with
        ``rediss://``, ``tls_ca``, ``tls_cert`` and ``tls_key`` (PEM file paths).
        """
        shown = redact(url)
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise URLError(f"{shown}: expected a redis:// or rediss:// URL")
        options = query_options(url)
        namespace = take_option(options, "namespace", _namespace, "atoll", url)
        lease = take_option(options, "lease", _positive, 30.0, url)
        poll_interval = take_option(options, "poll_interval", _positive, 1.0, url)
        trim_interval = take_option(options, "trim_interval", _positive, 5.0, url)
        connect_timeout = take_option(options, "connect_timeout", _seconds, 60.0, url)
        socket_timeout = take_option(options, "socket_timeout", _positive, 10.0, url)
        password_file = take_option(options, "password_file", str, None, url)
        password_env = take_option(options, "password_env", str, None, url)
        tls_ca = take_option(options, "tls_ca", str, None, url)
        tls_cert = take_option(options, "tls_cert", str, None, url)
        tls_key = take_option(options, "tls_key", str, None, url)
        reject_unknown(options, url)
        tls = parts.scheme == "rediss"
        if not tls and (tls_ca or tls_cert or tls_key):
            raise URLError(f"{shown}: tls_ca, tls_cert and tls_key need a rediss:// URL")
        if (tls_cert is None) != (tls_key is None):
            raise URLError(f"{shown}: tls_cert and tls_key go together")
        try:
            port = parts.port or 6379
        except ValueError:
            raise URLError(f"{shown}: the port is not a number") from None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise URLError(f"{shown}: the path must be a database number, like /0")
        password = _password(
            shown,
            None if parts.password is None else unquote(parts.password),
            password_file,
            password_env,
        )
        return cls(
            display_url=shown,
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=int(path) if path else 0,
            username=None if parts.username is None else unquote(parts.username) or None,
            password=password,
            tls=tls,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            namespace=namespace,
            lease=lease,
            poll_interval=poll_interval,
            trim_interval=trim_interval,
            connect_timeout=connect_timeout,
            socket_timeout=socket_timeout,
        )
