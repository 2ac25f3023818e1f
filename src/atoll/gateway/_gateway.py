"""The gateway: configuration generations, the request path, listeners and reloads.

A *generation* is everything one configuration builds (router, upstreams with their
pools and breakers, authenticator, rate limiters). A request takes the current
generation once, at its start, and uses it to the end; a reload builds the next
generation beside it and swaps one reference, so in-flight requests finish on the old
one and nothing is dropped. Upstreams whose configuration did not change are carried
over (their pools, health and breaker state included). A configuration that fails its
checks is refused with one log line naming the file and the key; the old generation
keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import socket
import ssl
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

import msgspec
import structlog

from atoll.config import ConfigError
from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.gateway._aggregate import aggregate
from atoll.gateway._auth import Authenticator, AuthError, Identity
from atoll.gateway._config import (
    GatewayConfig,
    MirrorConfig,
    RouteConfig,
    UpstreamConfig,
    load_gateway_config,
)
from atoll.gateway._forwarded import AddressFilter, TrustedProxies
from atoll.gateway._limits import RouteLimits, client_key, gated, ip_limit_key
from atoll.gateway._metrics import GatewayMetrics
from atoll.gateway._proxy import IDEMPOTENT, BodyTooLargeError, Call, UpstreamRuntime
from atoll.gateway._routing import Router, fill_template
from atoll.gateway._server import (
    Connection,
    Request,
    RequestError,
    ServerState,
    problem_bytes,
    status_line,
)
from atoll.gateway._tls import (
    CrlInfo,
    ListenerTls,
    check_crls,
    forwarded_client_cert,
    server_context,
)
from atoll.gateway._tls import not_after as tls_not_after
from atoll.gateway._upstream import Response, UpstreamError, connection_options
from atoll.resilience import (
    BreakerOpenError,
    BulkheadFullError,
    CallTimeoutError,
    Deadline,
    DeadlineExceededError,
    Permit,
    RateLimitedError,
    ResilienceRegistry,
    SharedState,
    deadline_scope,
)

log = logging.getLogger("atoll.gateway")
access_log = structlog.get_logger("atoll.gateway.access")

#: Request headers never forwarded as they came (hop-by-hop, or set by the gateway).
_DROP_REQUEST = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
        b"x-atoll-deadline",
        b"traceparent",
        b"tracestate",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        # Only the gateway speaks for a client certificate (Envoy's SANITIZE default).
        b"x-forwarded-client-cert",
        b"expect",
        # Only the gateway marks a copy for a mirror: a client's mark would make the
        # real request look like one to an upstream that skips side effects for copies.
        b"x-atoll-mirror",
    }
)
#: With the gateway's tracing off, a client's trace context goes on as it came (as
#: nginx's or Envoy's without tracing): dropping it would break the trace here.
_DROP_REQUEST_UNTRACED = _DROP_REQUEST - {b"traceparent", b"tracestate"}
#: Headers the gateway sets itself besides those it drops (``x-forwarded-for`` is
#: rebuilt, the request id header is added per configuration).
_SET_REQUEST = frozenset({b"x-forwarded-for"})
#: Response headers not passed back as they came.
#: How a route's auth kinds are named in the 401 (or 403) that says one is missing.
_CREDENTIALS = {
    "jwt": "a bearer token",
    "api_key": "an API key",
    "client_cert": "a client certificate (TLS)",
}
#: What the gateway's CORS answers carry: an upstream's own copies are dropped when the
#: gateway adds them (a second Access-Control-Allow-Origin makes browsers refuse both).
_CORS_RESPONSE = frozenset(
    {
        b"access-control-allow-origin",
        b"access-control-allow-credentials",
        b"access-control-expose-headers",
        b"access-control-allow-methods",
        b"access-control-allow-headers",
        b"access-control-max-age",
    }
)
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"content-length",
        b"trailer",
        b"upgrade",
        b"te",
    }
)
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}\Z")
_BUFFER_BODY = 64 * 1024  # bodies up to this are read whole first, so they can be retried
_MIRROR_BODY = 1 << 20  # a mirror's answer is read up to this, then its connection dropped
_JSON = msgspec.json.Encoder()
_NO_SCOPE = contextlib.nullcontext()


class Generation:
    """Everything one configuration builds."""

    def __init__(
        self,
        config: GatewayConfig,
        upstreams: dict[str, UpstreamRuntime],
        *,
        clock: Clock,
        store: SharedState | None,
        previous: Generation | None = None,
    ) -> None:
        self.config = config
        self.router = Router(config.routes)
        self.upstreams = upstreams
        self.auth = Authenticator(config.auth, clock, source=config.source)
        if previous is not None:
            # Prometheus counters only go up in one process: refusals go on counting.
            self.auth.failures = previous.auth.failures
        self.limits: dict[str, RouteLimits] = {}
        for route in config.routes:
            if route.rate_limit is None:
                continue
            kept = previous.limits.get(route.name) if previous is not None else None
            shared = store if route.rate_limit.shared else None
            if kept is not None and kept.config == route.rate_limit and kept.store is shared:
                # A reload for something else must not give every client a fresh burst.
                self.limits[route.name] = kept
            else:
                self.limits[route.name] = RouteLimits(
                    route.name, route.rate_limit, clock=clock, store=store
                )
        self.registry = ResilienceRegistry([u.pipeline for u in upstreams.values()])
        # Folded (``_`` as ``-``) as WSGI/CGI servers fold names: a client's
        # ``X_Auth_Subject`` reaches those upstreams as the gateway's ``X-Auth-Subject``.
        self.identity_prefix = config.auth.identity_prefix.lower().replace("_", "-").encode()
        self.request_id_header = config.server.request_id_header.lower().encode()
        # Underscore spellings of what the gateway drops or sets (X_Forwarded_For,
        # X_Request_ID...) are folded into the real ones by WSGI/CGI upstreams.
        self.owned_folded = (
            _DROP_REQUEST | _SET_REQUEST | {self.request_id_header.replace(b"_", b"-")}
        )
        self.trusted_proxies = (
            TrustedProxies(config.server.trusted_proxies) if config.server.trusted_proxies else None
        )
        #: The routes' ``allow_ips``/``deny_ips``, by route name (only routes with some).
        self.address_filters = {
            route.name: AddressFilter(route.allow_ips, route.deny_ips)
            for route in config.routes
            if route.allow_ips or route.deny_ips
        }
        self.trust_request_id = config.server.trust_request_id
        self.forward_token = config.auth.jwt is not None and config.auth.jwt.forward_token
        self.trust_deadline = config.server.trust_deadline
        self.trust_trace = config.server.trust_trace
        self.max_body = config.server.max_body
        cors = config.cors
        self.cors = cors
        self.cors_any = cors is not None and "*" in cors.allow_origins
        self.cors_origins = (
            frozenset(o.encode() for o in cors.allow_origins) if cors is not None else frozenset()
        )
        self.global_request_rules = config.request_headers
        self.global_response_rules = config.response_headers
        #: :meth:`header_kind`'s answers, by field name.
        self.header_kinds: dict[bytes, int] = {}
        tls = config.server.tls
        #: The ``X-Forwarded-Client-Cert`` fields sent, if any.
        self.forward_client_cert = () if tls is None else tls.forward_client_cert

    def forged(self, name: bytes) -> bool:
        """Whether ``name`` (holding ``_``) folds into a header only the gateway sets."""
        folded = name.replace(b"_", b"-")
        return folded.startswith(self.identity_prefix) or folded in self.owned_folded

    def header_kind(self, name: bytes, drop: frozenset[bytes]) -> int:
        """What the gateway does with a request field ``name`` (lower case): one of the
        ``_FIELD_*`` kinds, remembered for the next request (field names repeat: a
        dictionary lookup instead of eight tests a field). ``drop``: the gateway's own
        set of dropped fields, which tracing changes."""
        if name in drop:
            kind = _FIELD_DROP
        elif name == self.request_id_header:
            kind = _FIELD_REQUEST_ID
        elif name.startswith(self.identity_prefix) or (b"_" in name and self.forged(name)):
            kind = _FIELD_OWNED  # only the gateway says who the caller is
        elif name == b"authorization":
            kind = _FIELD_AUTHORIZATION
        elif name == self.auth.api_key_header:
            kind = _FIELD_API_KEY
        elif name == b"origin":
            kind = _FIELD_ORIGIN
        elif name == b"x-forwarded-for":
            kind = _FIELD_FORWARDED_FOR
        else:
            kind = _FIELD_FORWARD
        kinds = self.header_kinds
        if len(kinds) < _MAX_FIELD_KINDS:  # a client's made-up names must not grow it
            kinds[name] = kind
        return kind


# What the gateway does with a request field (Generation.header_kind).
_FIELD_FORWARD: Final = 0  # passed on as it came
_FIELD_DROP: Final = 1  # hop-by-hop, or the gateway's own (Host, traceparent...): read, not sent
_FIELD_REQUEST_ID: Final = 2
_FIELD_OWNED: Final = 3  # an identity field (or one folding into it): dropped
_FIELD_AUTHORIZATION: Final = 4
_FIELD_API_KEY: Final = 5
_FIELD_ORIGIN: Final = 6  # read, and passed on
_FIELD_FORWARDED_FOR: Final = 7
#: Field names whose kind a generation remembers, at most.
_MAX_FIELD_KINDS: Final = 1024

#: Rate-limit keys ``per: subject``, by how the caller was identified.
_SUBJECT_PREFIX: Final = {"client_cert": "cert:", "api_key": "key:"}


#: A file as the watch compares it: modification time (ns), size and inode.
FileState = tuple[int, int, int]


def _snapshot(files: Iterable[Path]) -> dict[Path, FileState]:
    """The state of each of ``files`` that exists, by absolute path (not resolved: stat
    follows a symlink, so one re-pointed to a renewed file reads as changed)."""
    out: dict[Path, FileState] = {}
    for file in files:
        with contextlib.suppress(OSError):
            found = file.stat()
            out[file.absolute()] = (found.st_mtime_ns, found.st_size, found.st_ino)
    return out


def _tls_files(config: UpstreamConfig) -> tuple[FileState | None, ...]:
    """The state of an upstream's TLS files: a renewed CA or client certificate under
    the same name makes a new upstream (its TLS context is built once)."""
    tls = config.tls
    if tls is None:
        return ()
    found = _snapshot(f for f in (tls.ca, tls.cert, tls.key) if f is not None)
    return tuple(found.get(f.absolute()) for f in (tls.ca, tls.cert, tls.key) if f is not None)


def _store_key(config: GatewayConfig) -> tuple[str, str] | None:
    url = config.rate_limit_store
    return None if url is None else (url, config.rate_limit_prefix)


def _forwarded_cert(gen: Generation, conn: Connection) -> bytes:
    """The connection's ``X-Forwarded-Client-Cert`` value, made once per connection
    (and again after a reload that changes the fields)."""
    fields = gen.forward_client_cert
    made = conn.forwarded_cert
    if made is None or made[0] != fields:
        assert conn.client_cert is not None
        peercert, sha256 = conn.client_cert
        made = conn.forwarded_cert = (
            fields,
            forwarded_client_cert(fields, peercert, sha256, conn.client_der),
        )
    return made[1]


def _checked_path(path: bytes) -> bytes | None:
    """``path`` as routes see it (:func:`_normalized_path`; the same object when nothing
    changes), or ``None`` if it is refused: not from the root, a NUL, a backslash or a
    dot segment, also percent-encoded."""
    if not path or path[0] != 0x2F:  # an int compare: no buffer taken
        return None
    if _UNUSUAL.search(path) is None:
        return path  # the common case, in one C call (bytes-in-bytes tests cost ~0.1 µs each)
    if not _valid_path(path):
        return None
    normal = _normalized_path(path)
    return path if normal == path else normal


def _valid_path(path: bytes) -> bool:
    if not path.startswith(b"/"):
        return False
    if b"%" in path:
        lowered = path.lower().replace(b"%2e", b".").replace(b"%2f", b"/").replace(b"%5c", b"\\")
        if b"%00" in lowered:
            return False
        path = lowered
    if b"\\" in path:
        return False
    if b"/." in path:
        for segment in path.split(b"/"):
            if segment in (b".", b".."):
                return False
    return True


#: Percent-encoded unreserved characters (RFC 3986 2.3): the same URI as the character.
_ENCODED_UNRESERVED: Final = re.compile(
    rb"%(?:[46][1-9A-Fa-f]|[57][0-9Aa]|3[0-9]|2[Dd]|2[Ee]|5[Ff]|7[Ee])"
)
_SLASHES: Final = re.compile(rb"//+")
#: What a path must hold to be refused or normalised: a percent sign, a backslash, two
#: slashes or a segment starting with a dot. A path with none is taken as it is.
_UNUSUAL: Final = re.compile(rb"[%\\]|//|/\.")


def _normalized_path(path: bytes) -> bytes:
    """``path`` as routes are matched on and upstreams get it: percent-encoded unreserved
    characters decoded (RFC 3986 6.2.2.2) and runs of slashes merged, as nginx does. An
    upstream would read ``/%61dmin`` and ``//admin`` as ``/admin``: matched raw, they would
    reach it through a route meant for other paths, past ``/admin``'s auth."""
    if b"%" in path:
        path = _ENCODED_UNRESERVED.sub(lambda m: bytes([int(m.group()[1:], 16)]), path)
    if b"//" in path:
        path = _SLASHES.sub(b"/", path)
    return path


class Gateway:
    """An API gateway serving one configuration file (reloaded when it changes).

    ``config_path`` (a YAML or TOML file) and ``system`` (an ``atoll.toml`` for
    ``service:`` upstreams) are re-read on :meth:`reload`. ``port`` and ``admin_port``
    override the file's (``0``: a free port, for tests); ``admin=False`` opens no admin
    listener, whatever the file says.
    """

    def __init__(  # noqa: PLR0915 - one attribute after another
        self,
        config_path: str | Path,
        *,
        system: str | Path | None = None,
        profile: str | None = None,
        host: str | None = None,
        port: int | None = None,
        admin_port: int | None = None,
        admin: bool = True,
        clock: Clock | None = None,
        random: RandomSource | None = None,
        tracing: Any = None,
        reuse_port: bool = False,
        watch_interval: float | None = 1.0,
        shared_store: SharedState | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self.system = system
        self.profile = profile
        self.clock: Clock = clock or SystemClock()
        self.random = random or RandomSource(clock=self.clock)
        self.tracing = tracing
        self._lean = getattr(tracing, "lean", None)
        self._drop_request = _DROP_REQUEST if self._lean is not None else _DROP_REQUEST_UNTRACED
        self.reuse_port = reuse_port
        self.watch_interval = watch_interval
        self._host_override = host
        self._port_override = port
        self._admin_override = admin_port
        self._admin_enabled = admin
        config = load_gateway_config(self.config_path, system=system, profile=profile)
        self._store_given = shared_store
        #: Each upstream's TLS files as they were when it was built (see _tls_files).
        self._upstream_tls: weakref.WeakKeyDictionary[
            UpstreamRuntime, tuple[FileState | None, ...]
        ] = weakref.WeakKeyDictionary()
        self.store: SharedState | None = None
        #: The shared store's URL and key prefix: a reload that changes either makes a new one.
        self.store_key: tuple[str, str] | None = None
        self.store = self._store_for(config)
        self.store_key = _store_key(config)
        self.gen = self._build(config, {}, self.store)
        self._tls: ListenerTls | None = None
        #: Failed TLS handshakes by reason, with TLS on (shared with the listener).
        self.tls_failures: dict[str, int] = {}
        #: When the listener's certificate expires (Unix time), with TLS on.
        self.tls_not_after: float | None = None
        #: The client certificate revocation lists in use, with ``server.tls.client_crl``.
        self.tls_crl: CrlInfo | None = None
        if config.server.tls is not None:
            self.tls_crl = self._crl(config)
            self._tls = ListenerTls(
                config.server.tls, config.source, clock=self.clock, http2=config.server.http2
            )
            self.tls_failures = self._tls.failures
            self.tls_not_after = tls_not_after(config.server.tls)
        #: What X-Forwarded-Proto says upstream: how clients reach this listener.
        self._proto = b"https" if self._tls is not None else b"http"
        self.metrics = GatewayMetrics(self)
        self.state = ServerState(
            self.handle,
            self._bad_request,
            max_header_bytes=config.server.max_header_bytes,
            max_url_bytes=config.server.max_url_bytes,
            idle_timeout=config.server.idle_timeout,
            body_timeout=config.server.body_timeout,
            clock=self.clock,
        )
        self.state.client_certs = self._tls is not None
        self.state.http2 = config.server.http2
        self.state.http2_max_streams = config.server.http2_max_streams
        if self._tls is not None:
            self.state.on_handshake = self._tls.record
        self.admin_state = ServerState(self._admin, self._bad_request)
        self._servers: list[asyncio.Server] = []
        self._watch: asyncio.Task[None] | None = None
        self._sweepers: list[asyncio.Task[None]] = []
        #: What the configuration's files were when last read: (mtime, size, inode).
        self._mtimes: dict[Path, FileState] = _snapshot(config.files)
        self.reloads = 0
        self.reload_failures = 0
        self.last_reload_error: str | None = None
        self.in_flight = 0
        #: Mirror copies in flight, by route (their tasks, kept until they end).
        self._mirroring: dict[str, set[asyncio.Task[None]]] = {}
        self._drained: asyncio.Future[None] | None = None
        self.port = 0
        self.admin_port = 0
        self._admin_server: asyncio.Server | None = None

    # -- generations -----------------------------------------------------------------

    def _store_for(self, config: GatewayConfig) -> SharedState | None:
        """The shared store ``config`` asks for: the current one unless its URL changed.

        Nothing is changed here: a reload adopts the store only once its whole
        generation is built.
        """
        url = config.rate_limit_store
        if self._store_given is not None:
            return gated(self._store_given, self.clock)
        if url is not None and _store_key(config) != self.store_key:
            from atoll.resilience.redis import RedisSharedState  # noqa: PLC0415 - optional

            return gated(
                RedisSharedState.from_url(url, prefix=config.rate_limit_prefix), self.clock
            )
        return self.store

    def _build(
        self,
        config: GatewayConfig,
        old: dict[str, UpstreamRuntime],
        store: SharedState | None,
        current: Generation | None = None,
    ) -> Generation:
        upstreams: dict[str, UpstreamRuntime] = {}
        for name, upstream_config in config.upstreams.items():
            previous = old.get(name)
            tls_files = _tls_files(upstream_config)
            if (
                previous is not None
                and previous.config == upstream_config
                and self._upstream_tls.get(previous) == tls_files
            ):
                upstreams[name] = previous
            else:
                upstream = UpstreamRuntime(
                    upstream_config, source=config.source, clock=self.clock, random=self.random
                )
                upstream.tracer = self._lean
                if previous is not None:
                    upstream.carry_counts(previous)
                if self._lean is not None and upstream.breaker is not None:
                    from atoll.observability._tracing import (  # noqa: PLC0415 - tracing on
                        trace_breaker_changes,
                    )

                    trace_breaker_changes(upstream.breaker)
                upstreams[name] = upstream
                self._upstream_tls[upstream] = tls_files
        return Generation(config, upstreams, clock=self.clock, store=store, previous=current)

    async def reload(self) -> bool:
        """Load the configuration again; keep the current one if the new one is bad.

        Any failure to build the new generation refuses it, not only a
        :class:`ConfigError`: some values only their library refuses (a Redis URL's
        port, say), and an exception escaping here would end the file watch.
        """
        config: GatewayConfig | None = None
        store = self.store
        generation: Generation | None = None
        # Before reading: a save made while this reload runs shows as a change next time.
        seen = _snapshot({*self._mtimes, self.config_path})
        try:
            config = load_gateway_config(self.config_path, system=self.system, profile=self.profile)
            store = self._store_for(config)
            generation = self._build(config, self.gen.upstreams, store, self.gen)
            tls = config.server.tls
            if self._tls is not None and tls is not None:
                server_context(tls, config.source)  # the new files load, or the reload fails
            crl = self._crl(config)
            await generation.auth.start()
        except Exception as exc:
            await self._refuse(exc, config, store, generation, seen)
            return False
        if (self._tls is None) != (config.server.tls is None):
            log.warning("gateway: turning server.tls on or off takes a restart")
        elif self._tls is not None and config.server.tls is not None:
            try:  # loaded once above already: only a file changed in between fails here
                required = self._tls.listener.verify_mode == ssl.CERT_REQUIRED
                if self._tls.replace(config.server.tls, config.source):
                    self.state.trust_changed()
                if not required and self._tls.listener.verify_mode == ssl.CERT_REQUIRED:
                    self.state.retire_anonymous()
                self.tls_not_after = tls_not_after(config.server.tls)
                self.tls_crl = crl
            except ConfigError as exc:
                log.error("gateway: the certificate was not renewed: %s", exc)  # noqa: TRY400 - the message says it all
        if self._tls is not None and config.server.http2 != self._tls.http2:
            log.warning("gateway: turning server.http2 on or off with TLS takes a restart")
        self._apply_listener_settings(config)
        self.state.http2 = config.server.http2  # h2c on a plain listener: from now on
        self.state.http2_max_streams = config.server.http2_max_streams  # new connections
        old = self.gen
        old_store = self.store if self.store is not store and self._store_given is None else None
        self.gen = generation
        self.store = store
        self.store_key = _store_key(config)
        self._mtimes = seen | _snapshot(f for f in config.files if f.absolute() not in seen)
        for upstream in generation.upstreams.values():
            upstream.start()
        self.reloads += 1
        self.last_reload_error = None
        log.info("gateway configuration reloaded from %s", self.config_path)
        asyncio.get_running_loop().create_task(self._retire(old, old_store))
        return True

    def _apply_listener_settings(self, config: GatewayConfig) -> None:
        """What a reload can change on the listening side; the rest takes a restart."""
        server, state = config.server, self.state
        state.max_header_bytes = server.max_header_bytes
        state.max_url_bytes = server.max_url_bytes
        state.idle_timeout = server.idle_timeout
        state.body_timeout = server.body_timeout
        before = self.gen.config
        for key, old, new in (
            ("server.host", before.server.host, server.host),
            ("server.port", before.server.port, server.port),
            ("server.workers", before.server.workers, server.workers),
            ("admin", before.admin, config.admin),
        ):
            if old != new:
                log.warning("gateway: a change of %s takes a restart; not applied", key)

    def _crl(self, config: GatewayConfig) -> CrlInfo | None:
        """``server.tls.client_crl`` checked now (a list past its next update refuses the
        configuration), with a warning for CAs that have no list in it."""
        tls = config.server.tls
        if tls is None or tls.client_crl is None:
            return None
        info = check_crls(tls, config.source, now=self.clock.time())
        if info.uncovered:
            log.warning(
                "gateway: %s has no revocation list of %s: a client certificate one of"
                " them issued directly fails the handshake",
                tls.client_crl,
                "; ".join(info.uncovered),
            )
        return info

    async def _refuse(
        self,
        exc: Exception,
        config: GatewayConfig | None,
        store: SharedState | None,
        generation: Generation | None,
        seen: dict[Path, FileState],
    ) -> None:
        """Count and log a refused reload, and undo what it had started."""
        self.reload_failures += 1
        if isinstance(exc, ConfigError):
            self.last_reload_error = str(exc)
            log.error(  # the message says it all; no traceback for a typo
                "gateway configuration refused, the previous one keeps serving: %s",
                exc,
                extra={"file": exc.source, "key": exc.key},
            )
            watched = [Path(exc.source)]
        else:
            self.last_reload_error = f"{self.config_path}: {type(exc).__name__}: {exc}"
            # Not one of the checks' findings: the traceback shows what refused it.
            log.error(
                "gateway configuration refused, the previous one keeps serving: %s",
                self.last_reload_error,
                exc_info=exc,
                extra={"file": str(self.config_path)},
            )
            watched = list(config.files) if config is not None else [self.config_path]
        self._mtimes = seen | _snapshot(f for f in watched if f.absolute() not in seen)
        if generation is not None:
            with contextlib.suppress(Exception):
                await generation.auth.stop()
        if store is not self.store and self._store_given is None and store is not None:
            with contextlib.suppress(Exception):
                await store.aclose()

    async def _retire(self, old: Generation, old_store: SharedState | None = None) -> None:
        """Stop what the old generation had alone (upstreams, a shared store another
        URL or prefix replaced), once its requests are done."""
        await old.auth.stop()
        current = set(map(id, self.gen.upstreams.values()))
        gone = [u for u in old.upstreams.values() if id(u) not in current]
        # Requests that started on the old generation may still be using these.
        deadline = self.clock.monotonic() + self.gen.config.server.drain_timeout
        while any(i.outstanding for u in gone for i in u.instances):
            if self.clock.monotonic() > deadline:
                break
            await self.clock.sleep(0.05)
        for upstream in gone:
            await upstream.stop()
        if old_store is not None:
            # A limit check still under way on it fails, and that request decides locally.
            with contextlib.suppress(Exception):
                await old_store.aclose()

    async def _watch_files(self) -> None:
        assert self.watch_interval is not None
        config_file = self.config_path.absolute()
        pending: dict[Path, FileState] | None = None
        while True:
            await self.clock.sleep(self.watch_interval)
            current = _snapshot({*self._mtimes, config_file})
            if current == self._mtimes:
                pending = None
                continue
            if current != pending:
                # Changed since the last look: read it once it holds still for an
                # interval, not half-written by an editor that saves in place.
                pending = current
                continue
            pending = None
            try:
                await self.reload()
            except Exception:
                # reload() refuses bad configurations itself; this is for a fault after
                # the swap, which must not end the watch either.
                log.exception("gateway configuration reload failed")

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (public and admin ports), start health checks, JWKS and the file watch."""
        loop = asyncio.get_running_loop()
        config = self.gen.config
        await self.gen.auth.start()
        for upstream in self.gen.upstreams.values():
            upstream.start()
        host = self._host_override or config.server.host
        port = config.server.port if self._port_override is None else self._port_override
        server = await loop.create_server(
            lambda: Connection(self.state),
            sock=_listen(host, port, reuse_port=self.reuse_port),
            ssl=None if self._tls is None else self._tls.listener,
            # asyncio holds a silent handshake 60 s by default, before idle_timeout applies.
            ssl_handshake_timeout=(
                None if self._tls is None else min(10.0, config.server.idle_timeout)
            ),
        )
        self._servers.append(server)
        self.port = server.sockets[0].getsockname()[1]
        admin_port = config.admin.port if self._admin_override is None else self._admin_override
        if self._admin_enabled and (admin_port or self._admin_override == 0):
            admin = await loop.create_server(
                lambda: Connection(self.admin_state),
                sock=_listen(config.admin.host, admin_port, reuse_port=False),
            )
            self._servers.append(admin)
            self._admin_server = admin
            self.admin_port = admin.sockets[0].getsockname()[1]
        if self.watch_interval is not None:
            self._watch = loop.create_task(self._watch_files())
        self._sweepers = [
            loop.create_task(self.state.sweep_idle()),
            loop.create_task(self.admin_state.sweep_idle()),
        ]

    async def stop(self, drain_timeout: float | None = None) -> None:  # noqa: C901 - in order
        """Stop accepting, let in-flight requests finish (up to the drain timeout), close."""
        for task in (self._watch, *self._sweepers):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # The admin listener stays open through the drain: /readyz answers 503 there
        # (what a load balancer's probe must see) and /metrics can still be scraped.
        for server in self._servers:
            if server is not self._admin_server:
                server.close()
        self.state.closing = True
        self.admin_state.closing = True  # its connections close after each answer
        for conn in list(self.state.connections) + list(self.admin_state.connections):
            conn.close_if_idle()
        await self._drain(
            self.gen.config.server.drain_timeout if drain_timeout is None else drain_timeout
        )
        if self._admin_server is not None:
            self._admin_server.close()
        for conn in list(self.state.connections) + list(self.admin_state.connections):
            conn.abort()
        await self._stop_mirrors()
        for upstream in self.gen.upstreams.values():
            await upstream.stop()
        await self.gen.auth.stop()
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.aclose()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def _drain(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the requests in flight to finish."""
        if self.in_flight:
            self._drained = asyncio.get_running_loop().create_future()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._drained

    # -- the request path ----------------------------------------------------------------

    def _bad_request(self, conn: Connection, exc: RequestError) -> None:
        public = conn.state is self.state
        if public:  # a scan of the admin port is not the public listener's bad requests
            self.metrics.bad_requests += 1
        conn.write(problem_bytes(exc.status, exc.detail, close=True))
        conn.close()
        if public and self.gen.config.server.access_log:
            # No Request was made (the head did not parse): what is known of it.
            method, path = conn.request_line()
            access_log.info(
                "request",
                method=_loggable(method),
                path=_loggable(path),
                status=exc.status,
                duration_ms=None,
                route=None,
                upstream=None,
                request_id=None,
                client=conn.peer,
                subject=None,
                detail=exc.detail,
            )

    async def handle(self, request: Request) -> None:
        """Answer one request (the server calls this; it never raises)."""
        self.in_flight += 1
        try:
            await self._handle(request)
        except Exception:
            log.exception("gateway: unexpected error on %s", request.path[:200])
            if request.conn.responding is request and not request.conn.closed:
                self._send_problem(request, None, 500, "internal error", b"-", close=True)
                # Logged here: _handle's own line never came (its started time is gone).
                self._log(request, None, 500, self.clock.monotonic(), b"-", None, None)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._drained is not None and not self._drained.done():
                self._drained.set_result(None)
            request.conn.finish(request)

    async def _handle(  # noqa: C901, PLR0911, PLR0912, PLR0915 - the hot path, kept flat
        self, request: Request
    ) -> None:
        gen = self.gen
        started = self.clock.monotonic()
        # One pass over the headers: pick what the gateway reads, keep what it forwards.
        rid: bytes | None = None
        host = authorization = api_key = origin = traceparent = tracestate = None
        deadline_value: bytes | None = None
        forwarded: list[tuple[bytes, bytes]] = []
        xff: bytes | None = None
        rid_name = gen.request_id_header
        drop = self._drop_request
        kinds = gen.header_kinds
        repeated: str | None = None  # a header that must appear once, seen twice
        hop_by_hop: frozenset[bytes] | None = None  # what the client's Connection names
        for pair in request.headers:
            name, value = pair
            kind = kinds.get(name)
            if kind is None:
                kind = gen.header_kind(name, drop)
            if kind == _FIELD_FORWARD:
                forwarded.append(pair)
                continue
            if kind == _FIELD_DROP:
                if name == b"host":
                    if host is not None:
                        repeated = "Host"
                    host = value
                elif name == b"traceparent":
                    traceparent = value
                elif name == b"tracestate":
                    # Several fields are one list (W3C Trace Context 3.3.1.1).
                    tracestate = value if tracestate is None else tracestate + b"," + value
                elif name == b"x-atoll-deadline":
                    deadline_value = value
                elif name == b"connection":
                    options = connection_options(value)
                    if options is not None:
                        hop_by_hop = options if hop_by_hop is None else hop_by_hop | options
                continue
            if kind == _FIELD_REQUEST_ID:
                rid = value
            elif kind == _FIELD_AUTHORIZATION:
                if authorization is not None:
                    repeated = "Authorization"
                authorization = value  # forwarded below, unless verified (forward_token)
            elif kind == _FIELD_API_KEY:
                api_key = value  # the key is a secret of the gateway's; never forwarded
            elif kind == _FIELD_ORIGIN:
                origin = value
                forwarded.append(pair)
            elif kind == _FIELD_FORWARDED_FOR:
                # Repeated fields are one list (RFC 9110 5.3): keep every hop.
                xff = value if xff is None else xff + b", " + value
            # _FIELD_OWNED: only the gateway says who the caller is, and what it forwards.
        if hop_by_hop is not None and b"x-forwarded-for" in hop_by_hop:
            xff = None  # the client's chain was for this hop only
        if xff is not None and gen.trusted_proxies is not None:
            # The client behind the proxies, for limits, logs, spans and X-Forwarded-For.
            request.client = gen.trusted_proxies.client(request.client, xff)
        if rid is None or not gen.trust_request_id or not _REQUEST_ID.match(rid):
            rid = b"%032x" % self.random.getrandbits(128)
        method = request.method
        path = _checked_path(request.path)  # normalised (no new local: see below)
        if path is None:
            self._send_problem(request, None, 400, "the request path is not valid", rid)
            self._log(request, None, 400, started, rid, None, None)
            return
        if path is not request.path:
            request.path = path
            request.raw_path = path + b"?" + request.query if request.query else path
        if repeated is not None:
            # Which one to route (or authenticate) by would be a guess, and a proxy in front
            # or the upstream may guess the other way (nginx refuses a repeated Host too).
            self._send_problem(request, None, 400, f"more than one {repeated} header", rid)
            self._log(request, None, 400, started, rid, None, None)
            return
        match, allowed = gen.router.match(path, method, host, request.headers)
        cors_headers: list[tuple[bytes, bytes]] | None = None
        if origin is not None and gen.cors is not None:
            cors_headers = self._cors_headers(gen, origin)
            if method == b"OPTIONS" and request.header(b"access-control-request-method"):
                status = self._preflight(request, gen, cors_headers, rid)
                self._log(request, None, status, started, rid, None, None)
                return
        if match is None:
            if allowed is not None:
                self._send_problem(
                    request,
                    None,
                    405,
                    f"{method.decode()} is not allowed here",
                    rid,
                    headers=[(b"allow", b", ".join(sorted(allowed)))],
                    cors=cors_headers,
                )
            else:
                self._send_problem(
                    request, None, 404, "no route matches this request", rid, cors=cors_headers
                )
            self._log(request, None, 405 if allowed is not None else 404, started, rid, None, None)
            return
        route = match.route
        stats = self.metrics.route(route.name)
        if gen.address_filters and not self._address_permitted(gen, route, request.client):
            self._refuse_routed(
                request,
                route,
                stats,
                started,
                rid,
                403,
                "this route does not take requests from here",
                cors=cors_headers,
            )
            return
        limit = route.max_body if route.max_body is not None else gen.max_body
        if request.content_length is not None and request.content_length > limit:
            self._refuse_routed(
                request,
                route,
                stats,
                started,
                rid,
                413,
                f"the request body is larger than {limit} bytes",
                close=True,
                cors=cors_headers,
            )
            return
        # Who is calling.
        identity: Identity | None = None
        if route.auth:
            try:
                found = self._identify(gen, route, authorization, api_key, request.conn)
                if isinstance(found, str):  # a bearer token not verified recently
                    token = found
                    found = await gen.auth.bearer(token)
                    assert authorization is not None  # a token came in it
                    gen.auth.remember_header(authorization, token)
                    self._check_scopes(route, found)
                identity = found
            except AuthError as exc:
                scheme = "Bearer" if "jwt" in route.auth else "ApiKey"
                # Client certificates have no HTTP scheme to challenge with.
                challenge = (
                    []
                    if route.auth == ("client_cert",)
                    else [(b"www-authenticate", exc.www_authenticate(scheme))]
                )
                self._refuse_routed(
                    request,
                    route,
                    stats,
                    started,
                    rid,
                    exc.status,
                    exc.detail,
                    headers=challenge,
                    cors=cors_headers,
                    identity=identity,
                )
                return
        # How often.
        permit: Permit | None = None
        limits = gen.limits.get(route.name) if route.rate_limit is not None else None
        if limits is not None:
            key = self._limit_key(route, identity, request.client)
            permit = limits.check_local(key) or await limits.check(key)
            if not permit.granted:
                stats.rate_limited += 1
                retry_after = max(1, math.ceil(permit.wait))
                self._refuse_routed(
                    request,
                    route,
                    stats,
                    started,
                    rid,
                    429,
                    "too many requests; try again later",
                    headers=[
                        (b"retry-after", str(retry_after).encode()),
                        *_ratelimit_headers(permit),
                    ],
                    cors=cors_headers,
                    identity=identity,
                )
                return
        # Forwarded headers. A bearer token the gateway verified stays here (as Envoy's
        # jwt_authn does): upstreams get the identity headers, not a credential to replay.
        if authorization is not None and (
            identity is None or identity.method != "jwt" or gen.forward_token
        ):
            forwarded.append((b"authorization", authorization))
        if hop_by_hop is not None:
            # Fields the client's Connection names are for this hop only (RFC 9110 7.6.1).
            forwarded = [pair for pair in forwarded if pair[0] not in hop_by_hop]
        # A plain proxied route without header rules takes the
        # identity's headers joined once, with the identity (not formatted per request).
        identity_block = b""
        if identity is not None:
            if (
                route.aggregate is None
                and not request.upgrade
                and gen.global_request_rules.empty
                and route.request_headers.empty
            ):
                identity_block = identity.header_block
            else:
                forwarded += identity.headers
        client_ip = request.client.encode()
        forwarded.append((b"x-forwarded-for", xff + b", " + client_ip if xff else client_ip))
        forwarded.append((b"x-forwarded-proto", self._proto))
        if host is not None:
            forwarded.append((b"x-forwarded-host", host))
        if gen.forward_client_cert and request.conn.client_cert is not None:
            forwarded.append((b"x-forwarded-client-cert", _forwarded_cert(gen, request.conn)))
        forwarded.append((rid_name, rid))
        for rules in (gen.global_request_rules, route.request_headers):
            if not rules.empty:
                forwarded = _apply_rules(forwarded, rules)
        # The deadline: the route's timeout, shortened by the caller's.
        deadline: Deadline | None = None
        if route.timeout is not None:
            deadline = Deadline.after(route.timeout, clock=self.clock)
        elif route.aggregate is not None:
            deadline = Deadline.after(route.aggregate.timeout, clock=self.clock)
        if deadline_value is not None and gen.trust_deadline:
            incoming = Deadline.from_header(deadline_value.decode("latin-1"), clock=self.clock)
            if incoming is not None:
                if incoming.expired:
                    self._refuse_routed(
                        request,
                        route,
                        stats,
                        started,
                        rid,
                        504,
                        "the caller's deadline had already passed",
                        cors=cors_headers,
                        identity=identity,
                    )
                    return
                deadline = incoming.earliest(deadline)
        span = None
        lean = self._lean
        if lean is not None:
            span = self._server_span(lean, request, route, traceparent, tracestate, gen.trust_trace)
            span.__enter__()
        status = 502
        scope = deadline_scope(deadline) if deadline is not None else _NO_SCOPE
        try:
            with scope:
                if route.aggregate is not None:
                    extra = _extra_headers(permit, cors_headers)
                    status = await aggregate(
                        self, gen, request, route, match.params, forwarded, rid, extra, span
                    )
                elif request.upgrade:
                    from atoll.gateway._websocket import pass_through  # noqa: PLC0415 - rare

                    status = await pass_through(
                        self, gen, request, route, match.params, forwarded, rid, span
                    )
                else:
                    status = await self._proxy(
                        gen,
                        request,
                        route,
                        match.params,
                        forwarded,
                        rid,
                        permit,
                        cors_headers,
                        span,
                        identity_block,
                    )
        except Exception:
            # A defect: answered here, so that the request has one access log line and its
            # route counts the 500 the client gets (handle() answers those raised earlier).
            status = 500
            log.exception("gateway: unexpected error on %s", request.path[:200])
            if request.conn.responding is request and not request.conn.closed:
                self._send_problem(request, route, 500, "internal error", rid, close=True)
        finally:
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

                    span.set_status(Status(StatusCode.ERROR))
                if identity is not None:
                    span.set_attribute("enduser.id", identity.subject)
            stats.record(status, self.clock.monotonic() - started)
            self._log(request, route, status, started, rid, route.upstream, identity)
            if span is not None:
                span.__exit__(None, None, None)

    def _refuse_routed(  # noqa: PLR0917 - one early answer's parts
        self,
        request: Request,
        route: RouteConfig,
        stats: Any,
        started: float,
        rid: bytes,
        status: int,
        detail: str,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
        cors: list[tuple[bytes, bytes]] | None = None,
        identity: Identity | None = None,
    ) -> None:
        """Answer a routed request before it goes upstream: the problem, the route's
        metrics and the access log line."""
        self._send_problem(
            request, route, status, detail, rid, headers=headers, close=close, cors=cors
        )
        stats.record(status, self.clock.monotonic() - started)
        self._log(request, route, status, started, rid, None, identity)

    @staticmethod
    def _address_permitted(gen: Generation, route: RouteConfig, client: str) -> bool:
        address_filter = gen.address_filters.get(route.name)
        return address_filter is None or address_filter.permits(client)

    def _server_span(  # noqa: PLR0917 - private, called once
        self,
        lean: Any,
        request: Request,
        route: RouteConfig,
        traceparent: bytes | None,
        tracestate: bytes | None,
        trust: bool,
    ) -> Any:
        from opentelemetry.trace import SpanKind  # noqa: PLC0415 - only with tracing on

        from atoll.observability._lean import parse_traceparent  # noqa: PLC0415

        parent = None
        if trust and traceparent is not None:
            carrier = {"traceparent": traceparent.decode("latin-1")}
            if tracestate is not None:
                carrier["tracestate"] = tracestate.decode("latin-1")
            parent = parse_traceparent(carrier)
        target = route.path or route.prefix or "/"
        return lean.span(
            f"{request.method.decode()} {target}",
            parent=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": request.method.decode(),
                "url.path": request.path.decode("latin-1"),
                "http.route": target,
                "atoll.gateway.route": route.name,
                "client.address": request.client,
            },
        )

    def _identify(  # noqa: C901 - each credential in turn, the cached token first
        self,
        gen: Generation,
        route: RouteConfig,
        authorization: bytes | None,
        api_key: bytes | None,
        conn: Connection,
    ) -> Identity | str:
        """The caller's identity, or the bearer token still to be verified.

        Synchronous, so that a token verified recently (every request of a client after
        its first) costs no coroutine. The caller verifies a returned token with
        ``gen.auth.bearer`` and then checks its scopes with :meth:`_check_scopes`.
        """
        token = None
        if authorization is not None and "jwt" in route.auth:
            identity = gen.auth.cached_header(authorization)
            if identity is not None:
                self._check_scopes(route, identity)
                return identity
            scheme, _, token = authorization.partition(b" ")
            if scheme.lower() != b"bearer" or not token.strip():
                if api_key is None or "api_key" not in route.auth:
                    raise AuthError(401, "the Authorization header must be 'Bearer <token>'")
                # Not a bearer token (Basic for the upstream, say): the API key decides.
                token = None
        if token is not None:
            try:
                text = token.strip().decode("ascii")
            except UnicodeDecodeError:
                raise AuthError(401, "the bearer token is not ASCII") from None
            identity = gen.auth.cached(text)
            if identity is None:
                return text
            assert authorization is not None  # the token came in it
            gen.auth.remember_header(authorization, text)
        elif api_key is not None and "api_key" in route.auth:
            identity = gen.auth.api_key(api_key.strip())
        elif "client_cert" in route.auth and conn.client_cert is not None:
            identity = self._certificate_identity(gen, conn)
        else:
            wanted = " or ".join(_CREDENTIALS[kind] for kind in route.auth)
            if route.auth == ("client_cert",):  # no HTTP scheme to challenge with
                raise AuthError(403, f"this route needs {wanted}", error="missing")
            raise AuthError(401, f"this route needs {wanted}", error="missing")
        self._check_scopes(route, identity)
        return identity

    @staticmethod
    def _certificate_identity(gen: Generation, conn: Connection) -> Identity:
        """The identity of the connection's verified client certificate, made once per
        connection (and again after a reload changes the authenticator)."""
        made = conn.client_identity
        if made is not None and made[0] is gen.auth:
            return made[1]  # type: ignore[return-value]
        assert conn.client_cert is not None
        identity = gen.auth.client_certificate(*conn.client_cert)
        conn.client_identity = (gen.auth, identity)
        return identity

    @staticmethod
    def _check_scopes(route: RouteConfig, identity: Identity) -> None:
        """The route's ``allow_subjects`` and ``scopes`` hold for ``identity``, or 403."""
        subjects = route.subjects
        if (
            subjects is not None
            and subjects.fullmatch(f"{identity.method}:{identity.subject}") is None
        ):
            raise AuthError(
                403, f"the subject {identity.subject!r} may not use this route", error=""
            )
        if identity.scopes.issuperset(route.scopes):
            return
        missing = [scope for scope in route.scopes if scope not in identity.scopes]
        raise AuthError(
            403,
            f"the credentials lack the scope(s) {', '.join(missing)}",
            error="insufficient_scope",
            scope=" ".join(route.scopes),
        )

    @staticmethod
    def _limit_key(route: RouteConfig, identity: Identity | None, ip: str) -> str:
        assert route.rate_limit is not None
        per = route.rate_limit.per
        if per == "route":
            return "*"
        if per == "ip" or identity is None:
            return ip_limit_key(ip)
        if per == "subject":
            # A certificate's subject is a DN, an API key's a name, a token's sub any
            # string: apart, so that a token whose sub is "CN=x" or "partner-a" does not
            # share the bucket of the certificate CN=x or of the API key partner-a.
            prefix = _SUBJECT_PREFIX.get(identity.method, "sub:")
            return client_key(prefix + identity.subject)
        if per == "api_key" and identity.method != "api_key":
            return ip_limit_key(ip)
        return client_key(f"{identity.method}:{identity.client}")

    def _target(self, route: RouteConfig, request: Request, params: dict[str, bytes]) -> bytes:
        if route.rewrite is not None:
            path = fill_template(route.rewrite, params)
        elif route.strip_prefix is not None:
            path = request.path[len(route.strip_prefix) :] or b"/"
            if not path.startswith(b"/"):
                path = b"/" + path
        else:
            return request.raw_path
        if not request.query:
            return path
        # A rewrite may carry a query of its own: the client's joins it.
        return path + (b"&" if b"?" in path else b"?") + request.query

    async def _proxy(  # noqa: C901, PLR0911, PLR0912, PLR0917 - one flat path for speed
        self,
        gen: Generation,
        request: Request,
        route: RouteConfig,
        params: dict[str, bytes],
        forwarded: list[tuple[bytes, bytes]],
        rid: bytes,
        permit: Permit | None,
        cors: list[tuple[bytes, bytes]] | None,
        span: Any,
        identity_block: bytes = b"",
    ) -> int:
        assert route.upstream is not None
        upstream = gen.upstreams[route.upstream]
        method = request.method
        target = self._target(route, request, params)
        body: bytes | None = None
        stream = None
        limit = route.max_body if route.max_body is not None else gen.max_body
        if not request.body.complete and request.header(b"expect") == b"100-continue":
            # Only now, past auth and limits, does the client get to send its body.
            request.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if request.body.complete:
            body = request.body.buffered()
            if body is not None and len(body) > limit:
                # A chunked (or HTTP/2) body that arrived whole with its head: no
                # Content-Length was there to refuse it by, and no stream will count it.
                return self._too_large(request, route, limit, rid, _extra_headers(permit, cors))
        elif request.content_length is not None and request.content_length <= _BUFFER_BODY:
            try:
                body = await request.body.read()
            except ConnectionError:
                return 499
            except RequestError as exc:
                return self._body_refused(request, route, exc, rid, _extra_headers(permit, cors))
        else:
            stream = request.body
        lines = [b"%b: %b\r\n" % pair for pair in forwarded]
        if identity_block:
            lines.append(identity_block)
        common = b"".join(lines)
        call = Call(
            b"%b %b HTTP/1.1\r\n" % (method, target),
            common,
            body,
            stream,
            head_only=method == b"HEAD",
            stream_limit=limit,
        )
        if span is not None:
            call.parent = span
        if route.mirror is not None:
            self._mirror(gen, route, route.mirror, call, method)
        idempotent = method in IDEMPOTENT or request.header(b"idempotency-key") is not None
        try:
            response = await upstream.exchange(call, method, idempotent)
        except BreakerOpenError as exc:
            retry = max(1, math.ceil(exc.retry_after if exc.retry_after is not None else 1))
            self._send_problem(
                request,
                route,
                503,
                f"upstream {upstream.name} is failing; its circuit breaker is open",
                rid,
                headers=[(b"retry-after", str(retry).encode())],
                cors=_extra_headers(permit, cors),
            )
            return 503
        except BulkheadFullError:
            self._send_problem(
                request,
                route,
                503,
                f"upstream {upstream.name} is at capacity",
                rid,
                headers=[(b"retry-after", b"1")],
                cors=_extra_headers(permit, cors),
            )
            return 503
        except RateLimitedError as exc:
            retry = max(1, math.ceil(exc.retry_after or 1))
            self._send_problem(
                request,
                route,
                503,
                f"upstream {upstream.name} is at its rate limit",
                rid,
                headers=[(b"retry-after", str(retry).encode())],
                cors=_extra_headers(permit, cors),
            )
            return 503
        except (CallTimeoutError, DeadlineExceededError, TimeoutError):
            self._send_problem(
                request,
                route,
                504,
                f"upstream {upstream.name} did not answer in time",
                rid,
                cors=_extra_headers(permit, cors),
            )
            return 504
        except BodyTooLargeError:
            return self._too_large(request, route, limit, rid, _extra_headers(permit, cors))
        except UpstreamError as exc:
            log.warning("upstream %s: %s", upstream.name, exc)
            self._send_problem(
                request,
                route,
                502,
                f"upstream {upstream.name} could not be reached",
                rid,
                cors=_extra_headers(permit, cors),
            )
            return 502
        except RequestError as exc:  # the streamed body turned out malformed
            return self._body_refused(request, route, exc, rid, _extra_headers(permit, cors))
        except ConnectionError:
            return 499  # the client went away while its body was streaming
        await self._relay(request, route, gen, response, rid, permit, cors)
        return response.status

    def _mirror(
        self, gen: Generation, route: RouteConfig, mirror: MirrorConfig, call: Call, method: bytes
    ) -> None:
        """Send a copy of ``call`` to the route's mirror, if this request is one of its
        share; its answer is dropped and nothing about it reaches the client."""
        counts = self.metrics.mirrored
        if mirror.percent < 100 and self.random.random() * 100 >= mirror.percent:
            return
        if (
            call.stream is not None
            or len(self._mirroring.get(route.name, ())) >= mirror.max_in_flight
        ):
            # A streamed body is not held for a copy; a mirror that lags is not waited for.
            counts[route.name, "skipped"] = counts.get((route.name, "skipped"), 0) + 1
            return
        copy = Call(
            call.request_line,
            call.common + b"x-atoll-mirror: true\r\n",
            call.body,
            None,
            head_only=call.head_only,
        )
        upstream = gen.upstreams[mirror.upstream]
        tasks = self._mirroring.setdefault(route.name, set())
        task = asyncio.get_running_loop().create_task(
            self._send_mirror(upstream, copy, method, route.name)
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _stop_mirrors(self) -> None:
        mirrors = [task for tasks in self._mirroring.values() for task in tasks]
        for task in mirrors:
            task.cancel()
        await asyncio.gather(*mirrors, return_exceptions=True)

    async def _send_mirror(
        self, upstream: UpstreamRuntime, call: Call, method: bytes, route: str
    ) -> None:
        outcome = "failed"
        try:
            response = await upstream.exchange(call, method, False)  # never retried
            await response.body.read(limit=_MIRROR_BODY)  # read, so the connection is reused
            outcome = "sent" if response.status < 500 else "failed"
        except Exception as exc:
            log.debug("mirror of route %s to %s failed: %s", route, upstream.name, exc)
        finally:
            counts = self.metrics.mirrored
            counts[route, outcome] = counts.get((route, outcome), 0) + 1

    async def _relay(  # noqa: C901, PLR0912, PLR0915, PLR0917 - one flat path for speed
        self,
        request: Request,
        route: RouteConfig,
        gen: Generation,
        response: Response,
        rid: bytes,
        permit: Permit | None = None,
        cors: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send an upstream response to the client: whole if it is all here, else streamed.

        ``permit``: the rate limiter's, told in ``RateLimit-*`` fields; ``cors``: the
        gateway's CORS fields, which replace the upstream's.
        """
        conn = request.conn
        head = [status_line(response.status)]
        hop_by_hop = response.hop_by_hop  # named by the instance's Connection: this hop's
        drop = _DROP_RESPONSE if hop_by_hop is None else _DROP_RESPONSE | hop_by_hop
        if cors:
            drop = drop | _CORS_RESPONSE
        headers = response.headers
        for rules in (gen.global_response_rules, route.response_headers):
            if not rules.empty:
                headers = _apply_rules(headers, rules)
        rid_name = gen.request_id_header
        for name, value in headers:
            if name not in drop and name != rid_name:  # the gateway's id, not a second one
                head += [name, b": ", value, b"\r\n"]
        head += [rid_name, b": ", rid, b"\r\n"]
        if permit is not None:
            head.append(_ratelimit_block(permit))
        if cors:
            for name, value in cors:
                head += [name, b": ", value, b"\r\n"]
        close = not request.keep_alive or self.state.closing
        if close:
            head.append(b"connection: close\r\n")
        elif request.version == "1.0":
            head.append(b"connection: keep-alive\r\n")  # 1.0 closes unless told otherwise
        if request.method == b"HEAD" or response.status in (204, 304):
            length = response.header(b"content-length")
            if length is not None and response.status != 204:
                head += [b"content-length: ", length, b"\r\n"]
            head.append(b"\r\n")
            conn.write(b"".join(head))
            return
        body = response.body.buffered()
        if body is not None:
            head += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body]
            conn.write(b"".join(head))
            return
        # Streamed: never held whole. Reading from the instance pauses while the client lags.
        chunked = response.content_length is None and request.version == "1.1"
        if response.content_length is not None:
            head += [b"content-length: ", str(response.content_length).encode(), b"\r\n\r\n"]
        elif chunked:
            head.append(b"transfer-encoding: chunked\r\n\r\n")
        else:
            head.append(b"connection: close\r\n\r\n")
            request.keep_alive = False
        conn.write(b"".join(head))
        # The client going (a closed tab on an event stream) ends the upstream's stream at
        # once, not at its next chunk, which may be minutes away: nobody reads what it
        # sends, and its connection must not be held for nobody. Discarded, not aborted:
        # a body already whole has put its connection back, maybe under another request.
        lost = conn.when_lost()
        lost.add_done_callback(response.discard_on)
        try:
            while (chunk := await response.body.chunk()) is not None:
                if chunked:
                    if chunk:
                        conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                else:
                    conn.write(chunk)
                if conn.closed:
                    response.discard()  # the client went: writes go nowhere
                    return
                writable = conn.writable
                if writable is not None:
                    await writable
        except (UpstreamError, ConnectionError) as exc:
            response.discard()
            if conn.closed:
                return  # the client went first, and the upstream was let go for it
            # Mid-body there is no status left to change: cut the client off so it knows.
            log.warning("response from upstream %s broken off: %s", route.upstream, exc)
            conn.abort()
            return
        finally:
            lost.remove_done_callback(response.discard_on)
        if chunked:
            conn.write(b"0\r\n\r\n")

    # -- answers made by the gateway ---------------------------------------------------------

    def _body_refused(
        self,
        request: Request,
        route: RouteConfig,
        exc: RequestError,
        rid: bytes,
        cors: list[tuple[bytes, bytes]],
    ) -> int:
        """The answer to a request body that broke its framing or a limit as it came;
        the connection closes after it (where the next request starts is unknown)."""
        self._send_problem(request, route, exc.status, exc.detail, rid, close=True, cors=cors)
        return exc.status

    def _too_large(
        self,
        request: Request,
        route: RouteConfig,
        limit: int,
        rid: bytes,
        cors: list[tuple[bytes, bytes]],
    ) -> int:
        """The 413 for a body past ``limit``; the connection closes after it."""
        detail = f"the request body is larger than {limit} bytes"
        self._send_problem(request, route, 413, detail, rid, close=True, cors=cors)
        return 413

    def _send_problem(
        self,
        request: Request,
        route: RouteConfig | None,
        status: int,
        detail: str,
        rid: bytes,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        close: bool = False,
        cors: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        extra = [(self.gen.request_id_header, rid), *(headers or ()), *(cors or ())]
        close = close or not request.keep_alive or not request.body.complete
        fields: dict[str, Any] = {"instance": request.path.decode("latin-1")[:500]}
        if route is not None:
            fields["route"] = route.name
        fields["request_id"] = rid.decode()
        request.conn.write(
            problem_bytes(
                status,
                detail,
                extra_headers=extra,
                close=close,
                head_only=request.method == b"HEAD",
                **fields,
            )
        )
        if close:
            request.keep_alive = False
            if route is None:
                self.metrics.unrouted += 1

    def send_json(  # noqa: PLR0917 - the parts of one response
        self,
        request: Request,
        status: int,
        payload: Any,
        rid: bytes,
        extra: list[tuple[bytes, bytes]],
        route: RouteConfig | None = None,
    ) -> None:
        """A JSON response made by the gateway (aggregates)."""
        body = _JSON.encode(payload)
        head = [
            status_line(status),
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\n",
            self.gen.request_id_header,
            b": ",
            rid,
            b"\r\n",
        ]
        for name, value in extra:
            head += [name, b": ", value, b"\r\n"]
        if route is not None:
            for name, value in route.response_headers.set:
                head += [name, b": ", value, b"\r\n"]
        if not request.keep_alive:
            head.append(b"connection: close\r\n")
        elif request.version == "1.0":
            head.append(b"connection: keep-alive\r\n")
        head.append(b"\r\n")
        if request.method != b"HEAD":  # a HEAD's answer ends at its head (RFC 9110)
            head.append(body)
        request.conn.write(b"".join(head))

    def _cors_headers(self, gen: Generation, origin: bytes) -> list[tuple[bytes, bytes]]:
        cors = gen.cors
        assert cors is not None
        if not (gen.cors_any or origin in gen.cors_origins):
            return []
        allowed = b"*" if gen.cors_any and not cors.allow_credentials else origin
        out = [(b"access-control-allow-origin", allowed), (b"vary", b"Origin")]
        if cors.allow_credentials:
            out.append((b"access-control-allow-credentials", b"true"))
        if cors.expose_headers:
            out.append((b"access-control-expose-headers", ", ".join(cors.expose_headers).encode()))
        return out

    def _preflight(
        self, request: Request, gen: Generation, cors: list[tuple[bytes, bytes]], rid: bytes
    ) -> int:
        """Answer a CORS preflight; returns the status sent."""
        config = gen.cors
        assert config is not None
        if not cors:
            self._send_problem(request, None, 403, "this origin may not call this API", rid)
            return 403
        head = [status_line(204), gen.request_id_header, b": ", rid, b"\r\n"]
        for name, value in [
            *cors,
            (b"access-control-allow-methods", ", ".join(config.allow_methods).encode()),
            (b"access-control-allow-headers", ", ".join(config.allow_headers).encode()),
            (b"access-control-max-age", str(config.max_age).encode()),
        ]:
            head += [name, b": ", value, b"\r\n"]
        head.append(b"\r\n")
        request.conn.write(b"".join(head))
        return 204

    def _log(  # noqa: PLR0917 - the fields of one access log line
        self,
        request: Request,
        route: RouteConfig | None,
        status: int,
        started: float,
        rid: bytes,
        upstream: str | None,
        identity: Identity | None,
    ) -> None:
        if not self.gen.config.server.access_log:
            return
        access_log.info(
            "request",
            method=_loggable(request.method.decode("latin-1")),
            path=_loggable(request.path.decode("latin-1")[:500]),
            protocol=getattr(request.conn, "protocol", None) or f"HTTP/{request.version}",
            status=status,
            duration_ms=round((self.clock.monotonic() - started) * 1000, 3),
            route=route.name if route is not None else None,
            upstream=upstream,
            request_id=rid.decode(),
            client=request.client,
            subject=_loggable(identity.subject) if identity is not None else None,
        )

    # -- admin ---------------------------------------------------------------------------------

    async def _admin(self, request: Request) -> None:
        from atoll.gateway._admin import handle_admin  # noqa: PLC0415 - admin is off the hot path

        try:
            await handle_admin(self, request)
        finally:
            request.conn.finish(request)


#: What a client may send that a terminal would act on: C0 and C1 controls, DEL.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _loggable(text: str | None) -> str | None:
    """``text`` from a client with its control characters escaped (ESC as ``\\x1b``): the
    console log is read on terminals, where ESC sequences clear, retitle or rewrite."""
    if text is None or _CONTROL.search(text) is None:
        return text
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def _ratelimit_headers(permit: Permit) -> list[tuple[bytes, bytes]]:
    _, _, limit, remaining, reset, _ = permit
    headers = [(b"ratelimit-limit", b"%d" % limit)]
    if remaining is not None:
        headers.append((b"ratelimit-remaining", b"%d" % remaining))
    if reset is not None:
        headers.append((b"ratelimit-reset", b"%d" % math.ceil(reset)))
    return headers


#: The three RateLimit fields a local limiter's permit always has, formatted at once.
_RATELIMIT_BLOCK: Final = (
    b"ratelimit-limit: %d\r\nratelimit-remaining: %d\r\nratelimit-reset: %d\r\n"
)


def _ratelimit_block(permit: Permit) -> bytes:
    """:func:`_ratelimit_headers` as they go on the wire (a gateway's every limited answer)."""
    _, _, limit, remaining, reset, _ = permit
    if remaining is None or reset is None:
        return b"".join(b"%b: %b\r\n" % field for field in _ratelimit_headers(permit))
    return _RATELIMIT_BLOCK % (limit, remaining, math.ceil(reset))


def _extra_headers(
    permit: Permit | None, cors: list[tuple[bytes, bytes]] | None
) -> list[tuple[bytes, bytes]]:
    """The fields the gateway adds to an answer: the rate limit's, then CORS."""
    extra = _ratelimit_headers(permit) if permit is not None else []
    if cors:
        extra += cors
    return extra


def _apply_rules(headers: list[tuple[bytes, bytes]], rules: Any) -> list[tuple[bytes, bytes]]:
    replaced = {name for name, _ in rules.set}
    kept = [(n, v) for n, v in headers if n not in rules.remove and n not in replaced]
    kept.extend(rules.set)
    return kept


def _listen(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


OnReady = Callable[[Gateway], None]
