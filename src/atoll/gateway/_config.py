"""The gateway's configuration: a YAML file, or a TOML file (its ``[gateway]`` table or the
whole file), checked key by key.

Every problem raises :class:`atoll.config.ConfigError` naming the file and the dotted
key (``gateway.yaml: routes[2].rate_limit.rate: must be > 0, got -1``), so a bad new
configuration can be refused on reload with a precise log line while the old one keeps
serving. ``docs/gateway.md`` lists every key.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from atoll.config import ConfigError

_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"}
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kb|kib|mb|mib|gb|gib)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "b": 1,
    "kb": 1000,
    "kib": 1024,
    "mb": 1000**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "gib": 1024**3,
}
AUTH_KINDS = ("jwt", "api_key", "client_cert")
RATE_KEYS = ("client", "ip", "subject", "api_key", "route")
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "EdDSA", "PS256", "HS256")


# -- the model ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Headers to set (replace) and remove."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    remove: frozenset[bytes] = frozenset()
    #: True when the rules change nothing (a field, not a property: read per request).
    empty: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "empty", not self.set and not self.remove)


#: The fields of ``X-Forwarded-Client-Cert`` the gateway can send, in the order Envoy
#: writes them.
XFCC_FIELDS: Final = ("hash", "cert", "subject", "uri", "dns")


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """``server.tls``: TLS termination with a PEM certificate chain and its private key."""

    cert: Path
    key: Path
    #: The oldest protocol version accepted: ``"1.2"`` or ``"1.3"``.
    min_version: str = "1.2"
    #: CA certificates (PEM) a client certificate must chain to (mutual TLS); ``None``:
    #: clients are not asked for one.
    client_ca: Path | None = None
    #: ``"required"``: a handshake without a valid client certificate fails;
    #: ``"optional"``: a client may present one, and routes with ``client_cert`` auth
    #: need it. A certificate that does not verify fails the handshake either way.
    client_auth: str = "required"
    #: Certificate revocation lists (PEM) of the CAs that issue client certificates:
    #: a revoked certificate fails the handshake; ``None``: revocation is not checked.
    client_crl: Path | None = None
    #: What ``X-Forwarded-Client-Cert`` (Envoy's header) tells upstreams of a verified
    #: client certificate: some of ``hash``, ``cert``, ``subject``, ``uri``, ``dns``;
    #: empty: the header is not sent. A client's own copy is dropped either way.
    forward_client_cert: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """``server``: the public listener."""

    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    max_body: int = 10 * 1024 * 1024
    max_header_bytes: int = 16384
    max_url_bytes: int = 8192
    idle_timeout: float = 75.0
    #: Seconds between two reads of a request body before the request is refused (408).
    body_timeout: float = 60.0
    drain_timeout: float = 30.0
    request_id_header: str = "X-Request-ID"
    #: Keep a client's request id (when it looks sane) instead of always making one.
    trust_request_id: bool = True
    #: Adopt an incoming ``X-Atoll-Deadline`` (it can only shorten the route's timeout).
    trust_deadline: bool = True
    #: Continue an incoming W3C trace instead of starting a new one.
    trust_trace: bool = True
    access_log: bool = True
    #: Peers (load balancers, TLS terminators) whose ``X-Forwarded-For`` is believed.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: TLS on the public listener (``None``: plain HTTP).
    tls: TlsSettings | None = None
    #: HTTP/2 for clients that ask for it: ALPN ``h2`` with TLS, the h2c preface without.
    http2: bool = True
    #: Streams one HTTP/2 connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS).
    http2_max_streams: int = 100


@dataclass(frozen=True, slots=True)
class AdminSettings:
    """``admin``: the read-only admin listener (``port = 0``: none)."""

    host: str = "127.0.0.1"
    port: int = 9901


@dataclass(frozen=True, slots=True)
class PoolConfig:
    max_idle: int = 128
    idle_timeout: float = 4.0
    connect_timeout: float = 2.0
    #: Seconds between two reads of a response body before it is given up.
    read_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamTlsConfig:
    """``upstreams.NAME.tls``: HTTPS to the instances."""

    #: PEM file of the CAs that may sign the instances' certificates (``None``: the
    #: system's trust store).
    ca: Path | None = None
    #: The name the instances' certificates must carry, also sent as SNI (``None``: the
    #: target's host).
    server_name: str | None = None
    #: A client certificate and key (PEM) for instances that require one (mutual TLS).
    cert: Path | None = None
    key: Path | None = None
    #: ``False`` skips verifying the instances' certificates: for development only.
    verify: bool = True


@dataclass(frozen=True, slots=True)
class HealthConfig:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 1
    unhealthy_threshold: int = 2


@dataclass(frozen=True, slots=True)
class PassiveConfig:
    failures: int = 5
    ejection: float = 30.0


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """``upstreams.NAME``."""

    name: str
    targets: tuple[tuple[str, int], ...]
    #: Each target's share of the traffic (``()``: all equal). A weight of 0 drains a
    #: target: it gets requests only when no other is available.
    weights: tuple[int, ...] = ()
    balance: str = "round_robin"
    preserve_host: bool = False
    pool: PoolConfig = PoolConfig()
    health: HealthConfig | None = None
    passive: PassiveConfig = PassiveConfig()
    #: An ``atoll.resilience`` policy table (``policy_from_config``); ``None``: defaults.
    policy: Mapping[str, Any] | None = None
    #: HTTPS to the instances (``None``: plain HTTP).
    tls: UpstreamTlsConfig | None = None
    #: Where ``targets`` came from (``service:orders`` or ``static``), for the admin view.
    source: str = "static"


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    rate: float
    burst: int = 1
    per: str = "client"
    shared: bool = False
    degraded_rate: float | None = None
    #: Seconds a Redis round trip may take before this permit is decided locally.
    shared_timeout: float = 0.05


@dataclass(frozen=True, slots=True)
class PartConfig:
    """One upstream call of an aggregate route."""

    name: str
    upstream: str
    path: str
    mode: str  # "required", "optional" or "fallback"
    fallback: Any = None


@dataclass(frozen=True, slots=True)
class AggregateConfig:
    parts: tuple[PartConfig, ...]
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """``routes[i].mirror``: a copy of requests for another upstream (shadow traffic)."""

    upstream: str
    #: The share of the route's requests copied, 0 to 100.
    percent: float = 100.0
    #: Copies in flight at most; beyond it a request is not copied (the mirror lags).
    max_in_flight: int = 100


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """``routes[i]``."""

    name: str
    index: int
    path: str | None = None
    prefix: str | None = None
    methods: frozenset[bytes] | None = None
    host: str | None = None
    headers: tuple[tuple[bytes, bytes | None], ...] = ()
    upstream: str | None = None
    strip_prefix: str | None = None
    rewrite: str | None = None
    auth: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    rate_limit: RateLimitConfig | None = None
    timeout: float | None = None
    max_body: int | None = None
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    websocket: bool = False
    aggregate: AggregateConfig | None = None
    #: Client addresses (after ``server.trusted_proxies``) the route accepts (``()``:
    #: any), and those it refuses whatever ``allow_ips`` says.
    allow_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny_ips: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: Shadow traffic: copies of the route's requests to another upstream, answers dropped.
    mirror: MirrorConfig | None = None
    #: The subjects (a token's ``sub``, an API key's name, a client certificate's DN or
    #: SPIFFE id) the route accepts, ``*`` matching any run of characters (``()``: any
    #: that authenticates), and the same as one regular expression.
    allow_subjects: tuple[str, ...] = ()
    subjects: re.Pattern[str] | None = None


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    name: str
    sha256: bytes  # the digest of the key; keys are compared by digest
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class JwtConfig:
    issuer: tuple[str, ...] = ()
    audience: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")
    leeway: float = 30.0
    jwks_url: str | None = None
    jwks_file: str | None = None
    hs256_secret: bytes | None = None
    jwks_refresh_interval: float = 300.0
    jwks_min_refetch_interval: float = 30.0
    cache_size: int = 10000
    cache_ttl: float = 60.0
    scope_claim: str = "scope"
    #: Send the verified bearer token upstream too (by default only the identity goes).
    forward_token: bool = False


@dataclass(frozen=True, slots=True)
class AuthConfig:
    jwt: JwtConfig | None = None
    api_key_header: bytes = b"x-api-key"
    api_keys: tuple[ApiKeyConfig, ...] = ()
    #: Prefix of the identity headers sent upstream (and stripped from every request).
    identity_prefix: str = "X-Auth-"


@dataclass(frozen=True, slots=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = ()
    allow_methods: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
    allow_headers: tuple[str, ...] = ("authorization", "content-type", "x-request-id")
    expose_headers: tuple[str, ...] = ("x-request-id", "retry-after", "ratelimit-limit")
    allow_credentials: bool = False
    max_age: int = 600


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """A whole, checked gateway configuration."""

    source: str
    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    upstreams: Mapping[str, UpstreamConfig] = field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    auth: AuthConfig = AuthConfig()
    cors: CorsConfig | None = None
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    rate_limit_store: str | None = None
    rate_limit_prefix: str = "atoll-gateway"
    #: The files this configuration was read from (watched for changes).
    files: tuple[Path, ...] = ()


# -- reading -----------------------------------------------------------------------------


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key, problem)

    def table(self, key: str, value: object, known: tuple[str, ...]) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a table, not {_describe(value)}")
        for name in value:
            if name not in known:
                raise self.error(
                    _join(key, str(name)), f"unknown key (known: {', '.join(sorted(known))})"
                )
        return dict(value)

    def string(self, key: str, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, not {_describe(value)}")
        return value

    def strings(self, key: str, value: object) -> tuple[str, ...]:
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list):
            raise self.error(key, f"must be a string or a list of strings, not {_describe(value)}")
        return tuple(self.string(f"{key}[{i}]", v) for i, v in enumerate(value))

    def number(
        self, key: str, value: object, *, minimum: float = 0.0, positive: bool = False
    ) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, not {_describe(value)}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value}")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum:g}, got {value}")
        return float(value)

    def whole(
        self, key: str, value: object, *, minimum: int = 0, maximum: int | None = None
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, not {_describe(value)}")
        if value < minimum:
            raise self.error(key, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise self.error(key, f"must be <= {maximum}, got {value}")
        return value

    def flag(self, key: str, value: object) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {_describe(value)}")
        return value

    def size(self, key: str, value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 0:
                raise self.error(key, f"must be >= 0, got {value}")
            return value
        if isinstance(value, str):
            match = _SIZE.match(value)
            if match:
                unit = match.group(2).lower() if match.group(2) else None
                return int(match.group(1)) * _SIZE_UNITS[unit]
        raise self.error(key, f"must be a size in bytes (1048576 or '1 MiB'), not {value!r}")

    def port(self, key: str, value: object, *, allow_zero: bool = False) -> int:
        return self.whole(key, value, minimum=0 if allow_zero else 1, maximum=65535)

    def headers(self, key: str, value: object) -> HeaderRules:
        rules = self.table(key, value, ("set", "remove"))
        pairs: list[tuple[bytes, bytes]] = []
        for name, item in self.table(f"{key}.set", rules.get("set"), _ANY).items():
            pairs.append(
                (
                    self.header_name(f"{key}.set.{name}", name),
                    self.header_value(f"{key}.set.{name}", item),
                )
            )
        removed = frozenset(
            self.header_name(f"{key}.remove[{i}]", n)
            for i, n in enumerate(self.strings(f"{key}.remove", rules.get("remove", [])))
        )
        return HeaderRules(tuple(pairs), removed)

    def header_name(self, key: str, name: object) -> bytes:
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise self.error(key, f"{name!r} is not a valid header name")
        return name.lower().encode("ascii")

    def header_value(self, key: str, value: object) -> bytes:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(key, f"must be a string, not {_describe(value)}")
        text = str(value)
        if any(c in text for c in "\r\n\0"):
            raise self.error(key, "must not contain CR, LF or NUL")
        try:
            return text.encode("latin-1")
        except UnicodeEncodeError:
            raise self.error(key, "must be Latin-1 text") from None


class _AnyKeys(tuple[str, ...]):
    """A ``known`` argument that accepts every key."""

    __slots__ = ()

    def __contains__(self, item: object) -> bool:
        return True


_ANY = _AnyKeys()


def _describe(value: object) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nothing"
    return type(value).__name__


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


_TOP = (
    "server",
    "admin",
    "services_from",
    "upstreams",
    "routes",
    "auth",
    "cors",
    "headers",
    "rate_limits",
)


def read_gateway_file(path: str | Path) -> tuple[dict[str, Any], str]:
    """The raw table of a gateway file (YAML, or TOML with or without ``[gateway]``)."""
    file = Path(path)
    source = str(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot be read: {exc.strerror}") from None
    if file.suffix == ".toml":
        try:
            data: Any = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, "", f"is not valid TOML: {exc}") from None
        if "gateway" in data and isinstance(data["gateway"], dict) and "routes" in data["gateway"]:
            data = data["gateway"]
    else:
        import yaml  # noqa: PLC0415 - the gateway extra

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(source, "", f"is not valid YAML: {_yaml_problem(exc)}") from None
    if data is None:
        # Nothing but comments, or a file caught in the middle of a save: a gateway
        # without routes would answer 404 to everything.
        raise ConfigError(source, "", "is empty: it names no upstreams and no routes")
    if not isinstance(data, dict):
        raise ConfigError(source, "", "must hold a table of settings")
    return data, source


def load_gateway_config(
    path: str | Path,
    *,
    system: str | Path | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> GatewayConfig:
    """Read and check the gateway configuration in ``path``.

    ``system`` is an ``atoll.toml`` whose ``[services]`` give the addresses of
    upstreams declared as ``service: NAME`` (default: the file's ``services_from``).
    ``${NAME}`` in strings is replaced by environment variables.
    """
    import os  # noqa: PLC0415

    env = os.environ if environ is None else environ
    data, source = read_gateway_file(path)
    from atoll.config._load import _expand  # noqa: PLC0415 - the same ${NAME} rules

    data = _expand(source, "", data, env)
    reader = _Reader(source)
    top = reader.table("", data, _TOP)
    files = [Path(path).absolute()]
    services: dict[str, tuple[tuple[str, int], ...]] | None = None
    system_path: Path | None = Path(system) if system is not None else None
    if system_path is None and "services_from" in top:
        system_path = Path(path).parent / reader.string("services_from", top["services_from"])
    if system_path is not None:
        from atoll.config import load_config  # noqa: PLC0415

        loaded = load_config(system_path, env, profile=profile)
        files.append(loaded.path)
        services = {
            name: tuple((_connect_host(section.host), port) for port in section.ports)
            for name, section in loaded.config.services.items()
        }
    server = _server(reader, top.get("server"), Path(path).parent)
    if server.tls is not None:  # a renewed certificate is picked up like a changed config
        files += [server.tls.cert, server.tls.key]
        if server.tls.client_ca is not None:
            files.append(server.tls.client_ca)
        if server.tls.client_crl is not None:
            files.append(server.tls.client_crl)
    admin = _admin(reader, top.get("admin"))
    upstreams = _upstreams(reader, top.get("upstreams"), services, Path(path).parent)
    files += _upstream_tls_files(upstreams)
    auth = _auth(reader, top.get("auth"), Path(path).parent)
    client_certs = server.tls is not None and server.tls.client_ca is not None
    routes = _routes(reader, top.get("routes"), upstreams, auth, client_certs=client_certs)
    cors = _cors(reader, top["cors"]) if top.get("cors") is not None else None
    headers = reader.table("headers", top.get("headers"), ("request", "response"))
    limits = reader.table("rate_limits", top.get("rate_limits"), ("store", "prefix"))
    store = limits.get("store")
    if store is not None:
        store = reader.string("rate_limits.store", store)
        if not store.startswith(("redis://", "rediss://", "unix://")):
            raise reader.error("rate_limits.store", "must be a redis:// URL")
        from redis.connection import parse_url  # noqa: PLC0415 - only with a store

        try:
            parse_url(store)  # type: ignore[no-untyped-call] # as the client will, but now
        except ValueError as exc:  # its messages name the part, never the password
            raise reader.error("rate_limits.store", f"is not a valid URL: {exc}") from None
    if store is None and any(r.rate_limit and r.rate_limit.shared for r in routes):
        shared = next(r for r in routes if r.rate_limit and r.rate_limit.shared)
        raise reader.error(
            f"routes[{shared.index}].rate_limit.shared", "is true but rate_limits.store is not set"
        )
    return GatewayConfig(
        source=source,
        server=server,
        admin=admin,
        upstreams=upstreams,
        routes=routes,
        auth=auth,
        cors=cors,
        request_headers=reader.headers("headers.request", headers.get("request")),
        response_headers=reader.headers("headers.response", headers.get("response")),
        rate_limit_store=store,
        rate_limit_prefix=reader.string(
            "rate_limits.prefix", limits.get("prefix", "atoll-gateway")
        ),
        files=tuple(files),
    )


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - a bind-all address is reached on loopback


def _upstream_tls_files(upstreams: Mapping[str, UpstreamConfig]) -> list[Path]:
    """The upstreams' CA and client certificate files: a renewal is picked up like a
    changed configuration."""
    found = []
    for upstream in upstreams.values():
        if upstream.tls is not None:
            found += [f for f in (upstream.tls.ca, upstream.tls.cert, upstream.tls.key) if f]
    return found


def _tls_file(reader: _Reader, t: dict[str, Any], name: str, base: Path) -> Path | None:
    """``server.tls.NAME``, a file relative to the config's folder, or ``None`` if unset."""
    if t.get(name) is None:
        return None
    key = f"server.tls.{name}"
    # Absolute, not resolved: a renewal that re-points a symlink (certbot's live/ links)
    # is then a change of the watched path's file.
    file = (base / reader.string(key, t[name])).absolute()
    if not file.is_file():
        raise reader.error(key, f"no such file: {file}")
    return file


def _tls(reader: _Reader, value: object, base: Path) -> TlsSettings | None:
    if value is None:
        return None
    t = reader.table(
        "server.tls",
        value,
        (
            "cert",
            "key",
            "min_version",
            "client_ca",
            "client_auth",
            "client_crl",
            "forward_client_cert",
        ),
    )
    cert, key = _tls_file(reader, t, "cert", base), _tls_file(reader, t, "key", base)
    for name, file in (("cert", cert), ("key", key)):
        if file is None:
            raise reader.error(f"server.tls.{name}", "is required (a PEM file)")
    min_version = t.get("min_version", "1.2")
    if min_version not in ("1.2", "1.3"):
        raise reader.error("server.tls.min_version", f"must be '1.2' or '1.3', got {min_version!r}")
    client_ca = _tls_file(reader, t, "client_ca", base)
    client_auth = t.get("client_auth", "required")
    if client_auth not in ("required", "optional"):
        raise reader.error(
            "server.tls.client_auth", f"must be 'required' or 'optional', got {client_auth!r}"
        )
    for name, needs in (
        ("client_auth", "the CAs to verify against"),
        ("client_crl", "the CAs"),
        ("forward_client_cert", "client certificates to forward"),
    ):
        if t.get(name) is not None and client_ca is None:
            raise reader.error(f"server.tls.{name}", f"needs server.tls.client_ca ({needs})")
    forward = reader.strings("server.tls.forward_client_cert", t.get("forward_client_cert", []))
    unknown = [name for name in forward if name not in XFCC_FIELDS]
    if unknown:
        raise reader.error(
            "server.tls.forward_client_cert",
            f"unknown field {unknown[0]!r}; the fields are {', '.join(XFCC_FIELDS)}",
        )
    assert cert is not None
    assert key is not None
    return TlsSettings(
        cert=cert,
        key=key,
        min_version=min_version,
        client_ca=client_ca,
        client_auth=client_auth,
        client_crl=_tls_file(reader, t, "client_crl", base),
        forward_client_cert=tuple(name for name in XFCC_FIELDS if name in forward),
    )


def _server(reader: _Reader, value: object, base: Path) -> ServerSettings:
    t = reader.table("server", value, tuple(ServerSettings.__slots__))
    d = ServerSettings()
    return ServerSettings(
        tls=_tls(reader, t.get("tls"), base),
        host=reader.string("server.host", t.get("host", d.host)),
        port=reader.port("server.port", t.get("port", d.port)),
        workers=reader.whole("server.workers", t.get("workers", d.workers), minimum=1, maximum=64),
        max_body=reader.size("server.max_body", t.get("max_body", d.max_body)),
        max_header_bytes=reader.whole(
            "server.max_header_bytes", t.get("max_header_bytes", d.max_header_bytes), minimum=256
        ),
        max_url_bytes=reader.whole(
            "server.max_url_bytes", t.get("max_url_bytes", d.max_url_bytes), minimum=64
        ),
        idle_timeout=reader.number(
            "server.idle_timeout", t.get("idle_timeout", d.idle_timeout), positive=True
        ),
        body_timeout=reader.number(
            "server.body_timeout", t.get("body_timeout", d.body_timeout), positive=True
        ),
        drain_timeout=reader.number(
            "server.drain_timeout", t.get("drain_timeout", d.drain_timeout)
        ),
        request_id_header=reader.header_name(
            "server.request_id_header", t.get("request_id_header", d.request_id_header)
        ).decode(),
        trust_request_id=reader.flag(
            "server.trust_request_id", t.get("trust_request_id", d.trust_request_id)
        ),
        trust_deadline=reader.flag(
            "server.trust_deadline", t.get("trust_deadline", d.trust_deadline)
        ),
        trust_trace=reader.flag("server.trust_trace", t.get("trust_trace", d.trust_trace)),
        access_log=reader.flag("server.access_log", t.get("access_log", d.access_log)),
        http2=reader.flag("server.http2", t.get("http2", d.http2)),
        http2_max_streams=reader.whole(
            "server.http2_max_streams",
            t.get("http2_max_streams", d.http2_max_streams),
            minimum=1,
            maximum=10_000,
        ),
        trusted_proxies=_networks(
            reader, "server.trusted_proxies", t.get("trusted_proxies", d.trusted_proxies)
        ),
    )


def _subject_pattern(allowed: tuple[str, ...]) -> re.Pattern[str] | None:
    r"""One expression matching ``METHOD:SUBJECT`` (``jwt:alice``) whole when it is one
    of ``allowed``. An entry with a method prefix (``client_cert:CN=billing``) admits that
    method only, one without admits any; ``*`` is any run of characters, everything else
    literal (a DN's ``\,`` or ``+`` included)."""
    if not allowed:
        return None
    methods = tuple(f"{kind}:" for kind in AUTH_KINDS)
    alternatives = []
    for entry in allowed:
        method, subject = "(?:jwt|api_key|client_cert):", entry
        if entry.startswith(methods):
            kind, _, subject = entry.partition(":")
            method = re.escape(kind + ":")
        alternatives.append(method + ".*".join(re.escape(p) for p in subject.split("*")))
    return re.compile("|".join(alternatives), re.DOTALL)


def _networks(
    reader: _Reader, key: str, value: object
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """IP addresses and CIDR networks (``10.0.0.0/8``, ``::1``), one or a list."""
    if value == ():
        return ()
    texts = reader.strings(key, value)
    named = [key] if isinstance(value, str) else [f"{key}[{i}]" for i in range(len(texts))]
    out = []
    for name, text in zip(named, texts, strict=True):
        try:
            out.append(ipaddress.ip_network(text.strip()))
        except ValueError as exc:
            # Refused, not skipped: a typo here would put every client behind that
            # proxy in one rate-limit bucket without a word.
            raise reader.error(name, f"is not an IP address or CIDR network: {exc}") from None
    return tuple(out)


def _admin(reader: _Reader, value: object) -> AdminSettings:
    t = reader.table("admin", value, ("host", "port"))
    d = AdminSettings()
    return AdminSettings(
        host=reader.string("admin.host", t.get("host", d.host)),
        port=reader.port("admin.port", t.get("port", d.port), allow_zero=True),
    )


def _weighted_target(reader: _Reader, key: str, value: object) -> tuple[tuple[str, int], int]:
    """A ``targets`` entry: ``"host:port"``, or ``{address: "host:port", weight: N}``."""
    if isinstance(value, Mapping):
        t = reader.table(key, value, ("address", "weight"))
        if "address" not in t:
            raise reader.error(f"{key}.address", "is required ('host:port')")
        weight = reader.whole(f"{key}.weight", t.get("weight", 1), maximum=1000)
        return _target(reader, f"{key}.address", t["address"]), weight
    return _target(reader, key, value), 1


def _target(reader: _Reader, key: str, value: object) -> tuple[str, int]:
    text = reader.string(key, value)
    text = text.removeprefix("http://")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise reader.error(key, f"must be 'host:port', got {value!r}")
    if "://" in host or "/" in host or any(c.isspace() for c in host):
        hint = " (TLS to an upstream is its 'tls' setting)" if "https://" in text else ""
        raise reader.error(key, f"must be 'host:port', got {value!r}{hint}")
    return host.strip("[]"), int(port)


def _upstream_tls(reader: _Reader, key: str, value: object, base: Path) -> UpstreamTlsConfig:
    t = reader.table(key, value, ("ca", "server_name", "cert", "key", "verify"))
    files: dict[str, Path | None] = {}
    for name in ("ca", "cert", "key"):
        given = t.get(name)
        if given is None:
            files[name] = None
            continue
        file = (base / reader.string(f"{key}.{name}", given)).absolute()
        if not file.is_file():
            raise reader.error(f"{key}.{name}", f"no such file: {file}")
        files[name] = file
    if (files["cert"] is None) != (files["key"] is None):
        missing = "key" if files["key"] is None else "cert"
        raise reader.error(f"{key}.{missing}", "a client certificate needs both cert and key")
    server_name = t.get("server_name")
    if server_name is not None:
        server_name = reader.string(f"{key}.server_name", server_name)
    return UpstreamTlsConfig(
        ca=files["ca"],
        server_name=server_name,
        cert=files["cert"],
        key=files["key"],
        verify=reader.flag(f"{key}.verify", t.get("verify", True)),
    )


def _upstreams(  # noqa: C901 - a flat validator, one key after another
    reader: _Reader,
    value: object,
    services: dict[str, tuple[tuple[str, int], ...]] | None,
    base: Path,
) -> dict[str, UpstreamConfig]:
    table = reader.table("upstreams", value, _ANY)
    out: dict[str, UpstreamConfig] = {}
    known = (
        "service",
        "targets",
        "balance",
        "preserve_host",
        "pool",
        "health",
        "passive",
        "policy",
        "tls",
    )
    for name, raw in table.items():
        key = f"upstreams.{name}"
        t = reader.table(key, raw, known)
        if ("service" in t) == ("targets" in t):
            raise reader.error(key, "needs exactly one of 'service' (from atoll.toml) or 'targets'")
        if "service" in t:
            service = reader.string(f"{key}.service", t["service"])
            if services is None:
                raise reader.error(
                    f"{key}.service",
                    "names a service but no atoll.toml was given (services_from or --system)",
                )
            if service not in services:
                known_services = ", ".join(sorted(services)) or "none"
                raise reader.error(
                    f"{key}.service",
                    f"no service {service!r} in atoll.toml (known: {known_services})",
                )
            targets: tuple[tuple[str, int], ...] = services[service]  # every instance
            weights: tuple[int, ...] = (1,) * len(targets)
            origin = f"service:{service}"
        else:
            raw_targets = t["targets"]
            if not isinstance(raw_targets, list) or not raw_targets:
                raise reader.error(
                    f"{key}.targets",
                    "must be a non-empty list of 'host:port' (or {address, weight} tables)",
                )
            weighted = [
                _weighted_target(reader, f"{key}.targets[{i}]", v)
                for i, v in enumerate(raw_targets)
            ]
            targets = tuple(target for target, _ in weighted)
            weights = tuple(weight for _, weight in weighted)
            if not any(weights):
                raise reader.error(f"{key}.targets", "every weight is 0: nothing would get traffic")
            origin = "static"
        balance = t.get("balance", "round_robin")
        if balance not in ("round_robin", "least_outstanding"):
            raise reader.error(
                f"{key}.balance", f"must be 'round_robin' or 'least_outstanding', got {balance!r}"
            )
        pool_t = reader.table(
            f"{key}.pool",
            t.get("pool"),
            ("max_idle", "idle_timeout", "connect_timeout", "read_timeout"),
        )
        dp = PoolConfig()
        pool = PoolConfig(
            max_idle=reader.whole(f"{key}.pool.max_idle", pool_t.get("max_idle", dp.max_idle)),
            idle_timeout=reader.number(
                f"{key}.pool.idle_timeout",
                pool_t.get("idle_timeout", dp.idle_timeout),
                positive=True,
            ),
            connect_timeout=reader.number(
                f"{key}.pool.connect_timeout",
                pool_t.get("connect_timeout", dp.connect_timeout),
                positive=True,
            ),
            read_timeout=reader.number(
                f"{key}.pool.read_timeout",
                pool_t.get("read_timeout", dp.read_timeout),
                positive=True,
            ),
        )
        health = None
        if t.get("health") is not None:
            h = reader.table(f"{key}.health", t["health"], tuple(HealthConfig.__slots__))
            dh = HealthConfig()
            path = reader.string(f"{key}.health.path", h.get("path", dh.path))
            if not path.startswith("/"):
                raise reader.error(f"{key}.health.path", "must start with '/'")
            health = HealthConfig(
                path=path,
                interval=reader.number(
                    f"{key}.health.interval", h.get("interval", dh.interval), positive=True
                ),
                timeout=reader.number(
                    f"{key}.health.timeout", h.get("timeout", dh.timeout), positive=True
                ),
                healthy_threshold=reader.whole(
                    f"{key}.health.healthy_threshold",
                    h.get("healthy_threshold", dh.healthy_threshold),
                    minimum=1,
                ),
                unhealthy_threshold=reader.whole(
                    f"{key}.health.unhealthy_threshold",
                    h.get("unhealthy_threshold", dh.unhealthy_threshold),
                    minimum=1,
                ),
            )
        p = reader.table(f"{key}.passive", t.get("passive"), ("failures", "ejection"))
        dpas = PassiveConfig()
        passive = PassiveConfig(
            failures=reader.whole(
                f"{key}.passive.failures", p.get("failures", dpas.failures), minimum=1
            ),
            ejection=reader.number(f"{key}.passive.ejection", p.get("ejection", dpas.ejection)),
        )
        policy = t.get("policy")
        if policy is not None:
            policy = reader.table(f"{key}.policy", policy, _ANY)
            _check_policy(reader, f"{key}.policy", policy, name)
        out[str(name)] = UpstreamConfig(
            name=str(name),
            targets=targets,
            weights=weights if any(w != 1 for w in weights) else (),
            balance=balance,
            preserve_host=reader.flag(f"{key}.preserve_host", t.get("preserve_host", False)),
            pool=pool,
            health=health,
            passive=passive,
            policy=policy,
            tls=(
                _upstream_tls(reader, f"{key}.tls", t["tls"], base)
                if t.get("tls") is not None
                else None
            ),
            source=origin,
        )
    return out


def _check_policy(reader: _Reader, key: str, table: dict[str, Any], name: str) -> None:
    """Build the policy once so a bad one is refused now, under its full key."""
    from atoll.gateway._proxy import build_pipeline  # noqa: PLC0415 - registers the classifiers
    from atoll.resilience import Pipeline  # noqa: PLC0415

    if "rate_limit" in table:
        raise reader.error(f"{key}.rate_limit", "use the route's rate_limit in the gateway")
    for section in ("breaker", "rate_limit"):
        part = table.get(section)
        if isinstance(part, Mapping) and part.get("shared"):
            raise reader.error(f"{key}.{section}.shared", "is not supported for gateway upstreams")
    probe = UpstreamConfig(name=name, targets=(("127.0.0.1", 1),), policy=table)
    pipeline = build_pipeline(probe, source=reader.source, clock=None, random=None)
    assert isinstance(pipeline, Pipeline)


def _template_params(path: str) -> list[str]:
    return [m.group(1) for m in _PARAM.finditer(path)]


def _routes(  # noqa: C901, PLR0912, PLR0915 - a flat validator, one key after another
    reader: _Reader,
    value: object,
    upstreams: Mapping[str, UpstreamConfig],
    auth: AuthConfig,
    *,
    client_certs: bool = False,
) -> tuple[RouteConfig, ...]:
    from atoll.gateway._routing import template_problem  # noqa: PLC0415 - it imports this module

    if value is None:
        return ()
    if not isinstance(value, list):
        raise reader.error("routes", f"must be a list of routes, not {_describe(value)}")
    known = (
        "name",
        "match",
        "upstream",
        "strip_prefix",
        "rewrite",
        "auth",
        "scopes",
        "rate_limit",
        "timeout",
        "max_body",
        "request_headers",
        "response_headers",
        "websocket",
        "aggregate",
        "allow_ips",
        "deny_ips",
        "allow_subjects",
        "mirror",
    )
    routes = []
    names: set[str] = set()
    for i, raw in enumerate(value):
        key = f"routes[{i}]"
        t = reader.table(key, raw, known)
        name = reader.string(f"{key}.name", t.get("name", f"route-{i}"))
        if name in names:
            raise reader.error(f"{key}.name", f"{name!r} is already the name of another route")
        names.add(name)
        m = reader.table(
            f"{key}.match", t.get("match"), ("path", "prefix", "methods", "host", "headers")
        )
        path = prefix = None
        if "path" in m:
            path = reader.string(f"{key}.match.path", m["path"])
            if not path.startswith("/"):
                raise reader.error(f"{key}.match.path", "must start with '/'")
            problem = template_problem(path)
            if problem is not None:
                raise reader.error(f"{key}.match.path", problem)
        if "prefix" in m:
            prefix = reader.string(f"{key}.match.prefix", m["prefix"])
            if not prefix.startswith("/"):
                raise reader.error(f"{key}.match.prefix", "must start with '/'")
        if path is not None and prefix is not None:
            raise reader.error(f"{key}.match", "give 'path' or 'prefix', not both")
        if path is None and prefix is None:
            raise reader.error(f"{key}.match", "needs a 'path' or a 'prefix'")
        methods = None
        if "methods" in m:
            listed = reader.strings(f"{key}.match.methods", m["methods"])
            if not listed:
                raise reader.error(
                    f"{key}.match.methods", "lists no method: the route would never match"
                )
            for j, method in enumerate(listed):
                if method.upper() not in _METHODS:
                    raise reader.error(f"{key}.match.methods[{j}]", f"unknown method {method!r}")
            methods = frozenset(x.upper().encode() for x in listed)
        host = reader.string(f"{key}.match.host", m["host"]).lower() if "host" in m else None
        if host is not None and (
            not host or ("]:" in host if host.startswith("[") else ":" in host)
        ):
            raise reader.error(
                f"{key}.match.host", "must be a host name without a port (ports are not compared)"
            )
        match_headers = []
        for hname, hval in reader.table(f"{key}.match.headers", m.get("headers"), _ANY).items():
            hkey = f"{key}.match.headers.{hname}"
            match_headers.append(
                (
                    reader.header_name(hkey, hname),
                    None if hval == "*" else reader.header_value(hkey, hval),
                )
            )
        aggregate = None
        upstream = None
        if "aggregate" in t:
            if "upstream" in t:
                raise reader.error(key, "an aggregate route has no 'upstream' of its own")
            if t.get("mirror") is not None:
                raise reader.error(f"{key}.mirror", "an aggregate route is not mirrored")
            aggregate = _aggregate(
                reader, f"{key}.aggregate", t["aggregate"], upstreams, path or prefix or ""
            )
        else:
            upstream = reader.string(f"{key}.upstream", t.get("upstream"))
            if upstream not in upstreams:
                raise reader.error(
                    f"{key}.upstream",
                    f"no upstream {upstream!r} (known: {', '.join(sorted(upstreams)) or 'none'})",
                )
        strip = t.get("strip_prefix")
        strip_prefix = None
        if strip is True:
            if prefix is None:
                raise reader.error(f"{key}.strip_prefix", "true needs a match.prefix")
            strip_prefix = prefix.rstrip("/")
        elif strip not in (None, False):
            strip_prefix = reader.string(f"{key}.strip_prefix", strip).rstrip("/")
            literal = prefix if prefix is not None else (path or "").split("{", 1)[0]
            if strip_prefix and (
                not literal.startswith(strip_prefix) or not strip_prefix.startswith("/")
            ):
                raise reader.error(
                    f"{key}.strip_prefix",
                    f"{strip_prefix!r} does not begin every path the route matches ({literal!r})",
                )
        rewrite = None
        if "rewrite" in t:
            rewrite = reader.string(f"{key}.rewrite", t["rewrite"])
            if not rewrite.startswith("/"):
                raise reader.error(f"{key}.rewrite", "must start with '/'")
            problem = template_problem(rewrite.partition("?")[0])
            if problem is not None:
                raise reader.error(f"{key}.rewrite", problem)
            declared = set(_template_params(path or ""))
            for param in _template_params(rewrite):
                if param not in declared:
                    raise reader.error(
                        f"{key}.rewrite", f"uses {{{param}}}, which match.path does not declare"
                    )
        kinds = (
            reader.strings(f"{key}.auth", t.get("auth", []))
            if t.get("auth") not in (None, "none")
            else ()
        )
        for j, kind in enumerate(kinds):
            if kind not in AUTH_KINDS:
                raise reader.error(
                    f"{key}.auth", f"unknown kind {kind!r} (known: {', '.join(AUTH_KINDS)})"
                )
            if kind == "jwt" and auth.jwt is None:
                raise reader.error(f"{key}.auth", "jwt needs auth.jwt to be configured")
            if kind == "api_key" and not auth.api_keys:
                raise reader.error(f"{key}.auth", "api_key needs auth.api_keys")
            if kind == "client_cert" and not client_certs:
                raise reader.error(f"{key}.auth", "client_cert needs server.tls.client_ca")
            del j
        scopes = reader.strings(f"{key}.scopes", t.get("scopes", []))
        if scopes and not kinds:
            raise reader.error(f"{key}.scopes", "scopes need auth on the route")
        allowed = tuple(reader.strings(f"{key}.allow_subjects", t.get("allow_subjects", [])))
        if allowed and not kinds:
            raise reader.error(f"{key}.allow_subjects", "allow_subjects needs auth on the route")
        for j, subject in enumerate(allowed):
            if subject.startswith(tuple(f"{kind}:" for kind in AUTH_KINDS)):
                subject = subject.partition(":")[2]  # noqa: PLW2901 - the part after the method
            if not subject.strip("*"):
                raise reader.error(
                    f"{key}.allow_subjects[{j}]", "must name a subject (leave the list out for any)"
                )
        if scopes and "client_cert" in kinds:
            raise reader.error(
                f"{key}.scopes",
                "client certificates carry no scopes: a route that takes them cannot"
                " require scopes",
            )
        rate_limit = None
        if t.get("rate_limit") is not None:
            rl = reader.table(
                f"{key}.rate_limit",
                t["rate_limit"],
                ("rate", "burst", "per", "shared", "degraded_rate", "shared_timeout"),
            )
            if "rate" not in rl:
                raise reader.error(f"{key}.rate_limit.rate", "is required")
            per = rl.get("per", "client")
            if per not in RATE_KEYS:
                raise reader.error(
                    f"{key}.rate_limit.per", f"must be one of {', '.join(RATE_KEYS)}, got {per!r}"
                )
            rate_limit = RateLimitConfig(
                rate=reader.number(f"{key}.rate_limit.rate", rl["rate"], positive=True),
                burst=reader.whole(f"{key}.rate_limit.burst", rl.get("burst", 1), minimum=1),
                per=per,
                shared=reader.flag(f"{key}.rate_limit.shared", rl.get("shared", False)),
                shared_timeout=reader.number(
                    f"{key}.rate_limit.shared_timeout",
                    rl.get("shared_timeout", 0.05),
                    positive=True,
                ),
                degraded_rate=(
                    reader.number(
                        f"{key}.rate_limit.degraded_rate", rl["degraded_rate"], positive=True
                    )
                    if "degraded_rate" in rl
                    else None
                ),
            )
        routes.append(
            RouteConfig(
                name=name,
                index=i,
                path=path,
                prefix=prefix,
                methods=methods,
                host=host,
                headers=tuple(match_headers),
                upstream=upstream,
                strip_prefix=strip_prefix,
                rewrite=rewrite,
                auth=tuple(kinds),
                scopes=scopes,
                rate_limit=rate_limit,
                timeout=(
                    reader.number(f"{key}.timeout", t["timeout"], positive=True)
                    if "timeout" in t
                    else None
                ),
                max_body=reader.size(f"{key}.max_body", t["max_body"]) if "max_body" in t else None,
                request_headers=reader.headers(f"{key}.request_headers", t.get("request_headers")),
                response_headers=reader.headers(
                    f"{key}.response_headers", t.get("response_headers")
                ),
                websocket=reader.flag(f"{key}.websocket", t.get("websocket", False)),
                aggregate=aggregate,
                allow_ips=_networks(reader, f"{key}.allow_ips", t.get("allow_ips", ())),
                deny_ips=_networks(reader, f"{key}.deny_ips", t.get("deny_ips", ())),
                allow_subjects=allowed,
                subjects=_subject_pattern(allowed),
                mirror=(
                    _mirror(reader, f"{key}.mirror", t["mirror"], upstreams)
                    if t.get("mirror") is not None
                    else None
                ),
            )
        )
    return tuple(routes)


def _mirror(
    reader: _Reader, key: str, value: object, upstreams: Mapping[str, UpstreamConfig]
) -> MirrorConfig:
    t = reader.table(key, value, ("upstream", "percent", "max_in_flight"))
    upstream = reader.string(f"{key}.upstream", t.get("upstream"))
    if upstream not in upstreams:
        raise reader.error(
            f"{key}.upstream",
            f"no upstream {upstream!r} (known: {', '.join(sorted(upstreams)) or 'none'})",
        )
    percent = reader.number(f"{key}.percent", t.get("percent", 100))
    if percent > 100:
        raise reader.error(f"{key}.percent", f"must be <= 100, got {percent:g}")
    return MirrorConfig(
        upstream=upstream,
        percent=percent,
        max_in_flight=reader.whole(f"{key}.max_in_flight", t.get("max_in_flight", 100), minimum=1),
    )


def _aggregate(  # noqa: C901 - a flat validator
    reader: _Reader, key: str, value: object, upstreams: Mapping[str, UpstreamConfig], path: str
) -> AggregateConfig:
    t = reader.table(key, value, ("parts", "timeout"))
    parts_t = reader.table(f"{key}.parts", t.get("parts"), _ANY)
    if not parts_t:
        raise reader.error(f"{key}.parts", "needs at least one part")
    declared = set(_template_params(path))
    parts = []
    for name, raw in parts_t.items():
        pkey = f"{key}.parts.{name}"
        p = reader.table(pkey, raw, ("upstream", "path", "required", "optional", "fallback"))
        upstream = reader.string(f"{pkey}.upstream", p.get("upstream"))
        if upstream not in upstreams:
            raise reader.error(f"{pkey}.upstream", f"no upstream {upstream!r}")
        part_path = reader.string(f"{pkey}.path", p.get("path"))
        if not part_path.startswith("/"):
            raise reader.error(f"{pkey}.path", "must start with '/'")
        for param in _template_params(part_path):
            if param not in declared:
                raise reader.error(
                    f"{pkey}.path", f"uses {{{param}}}, which match.path does not declare"
                )
        modes = [m for m in ("required", "optional") if p.get(m) is True]
        if "fallback" in p:
            modes.append("fallback")
        if len(modes) > 1:
            raise reader.error(pkey, "is one of required, optional or fallback, not several")
        for flag in ("required", "optional"):
            if flag in p:
                reader.flag(f"{pkey}.{flag}", p[flag])
        mode = modes[0] if modes else "required"
        parts.append(PartConfig(str(name), upstream, part_path, mode, p.get("fallback")))
    return AggregateConfig(
        parts=tuple(parts),
        timeout=reader.number(f"{key}.timeout", t.get("timeout", 5.0), positive=True),
    )


def _auth(reader: _Reader, value: object, base: Path) -> AuthConfig:  # noqa: C901, PLR0912, PLR0915 - a flat validator
    t = reader.table("auth", value, ("jwt", "api_keys", "identity_prefix"))
    jwt = None
    if t.get("jwt") is not None:
        j = reader.table("auth.jwt", t["jwt"], tuple(JwtConfig.__slots__))
        d = JwtConfig()
        algorithms = reader.strings("auth.jwt.algorithms", j.get("algorithms", list(d.algorithms)))
        for i, alg in enumerate(algorithms):
            if alg not in JWT_ALGORITHMS:
                raise reader.error(
                    f"auth.jwt.algorithms[{i}]",
                    f"unsupported algorithm {alg!r} "
                    f"(known: {', '.join(JWT_ALGORITHMS)}; never 'none')",
                )
        secret = j.get("hs256_secret")
        secret_bytes = None
        if secret is not None:
            secret_bytes = reader.string("auth.jwt.hs256_secret", secret).encode()
            if len(secret_bytes) < 32:
                raise reader.error(
                    "auth.jwt.hs256_secret", "must be at least 32 bytes (RFC 7518 3.2)"
                )
        has_hs = "HS256" in algorithms
        if has_hs and secret_bytes is None:
            raise reader.error("auth.jwt.algorithms", "HS256 needs auth.jwt.hs256_secret")
        if secret_bytes is not None and not has_hs:
            raise reader.error("auth.jwt.hs256_secret", "is set but HS256 is not in algorithms")
        asymmetric = [a for a in algorithms if a != "HS256"]
        jwks_url = j.get("jwks_url")
        jwks_file = j.get("jwks_file")
        if jwks_url is not None:
            jwks_url = reader.string("auth.jwt.jwks_url", jwks_url)
            if not jwks_url.startswith(("http://", "https://")):
                raise reader.error("auth.jwt.jwks_url", "must be an http(s) URL")
        if jwks_file is not None:
            jwks_file = str(base / reader.string("auth.jwt.jwks_file", jwks_file))
        if asymmetric and jwks_url is None and jwks_file is None:
            raise reader.error(
                "auth.jwt", f"{', '.join(asymmetric)} need keys: jwks_url or jwks_file"
            )
        jwt = JwtConfig(
            issuer=reader.strings("auth.jwt.issuer", j.get("issuer", [])),
            audience=reader.strings("auth.jwt.audience", j.get("audience", [])),
            algorithms=algorithms,
            leeway=reader.number("auth.jwt.leeway", j.get("leeway", d.leeway)),
            jwks_url=jwks_url,
            jwks_file=jwks_file,
            hs256_secret=secret_bytes,
            jwks_refresh_interval=reader.number(
                "auth.jwt.jwks_refresh_interval",
                j.get("jwks_refresh_interval", d.jwks_refresh_interval),
                positive=True,
            ),
            jwks_min_refetch_interval=reader.number(
                "auth.jwt.jwks_min_refetch_interval",
                j.get("jwks_min_refetch_interval", d.jwks_min_refetch_interval),
            ),
            cache_size=reader.whole("auth.jwt.cache_size", j.get("cache_size", d.cache_size)),
            cache_ttl=reader.number("auth.jwt.cache_ttl", j.get("cache_ttl", d.cache_ttl)),
            scope_claim=reader.string("auth.jwt.scope_claim", j.get("scope_claim", d.scope_claim)),
            forward_token=reader.flag(
                "auth.jwt.forward_token", j.get("forward_token", d.forward_token)
            ),
        )
    keys: list[ApiKeyConfig] = []
    header = b"x-api-key"
    if t.get("api_keys") is not None:
        a = reader.table("auth.api_keys", t["api_keys"], ("header", "keys"))
        header = reader.header_name("auth.api_keys.header", a.get("header", "X-API-Key"))
        raw_keys = a.get("keys", [])
        if not isinstance(raw_keys, list):
            raise reader.error("auth.api_keys.keys", "must be a list")
        import hashlib  # noqa: PLC0415

        for i, raw in enumerate(raw_keys):
            k = f"auth.api_keys.keys[{i}]"
            kt = reader.table(k, raw, ("name", "key", "sha256", "scopes"))
            if ("key" in kt) == ("sha256" in kt):
                raise reader.error(k, "needs exactly one of 'key' or 'sha256'")
            if "key" in kt:
                secret_key = reader.string(f"{k}.key", kt["key"])
                if len(secret_key) < 16:
                    raise reader.error(f"{k}.key", "must be at least 16 characters")
                digest = hashlib.sha256(secret_key.encode()).digest()
            else:
                hexdigest = reader.string(f"{k}.sha256", kt["sha256"])
                try:
                    digest = bytes.fromhex(hexdigest)
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    raise reader.error(f"{k}.sha256", "must be 64 hex digits")
            keys.append(
                ApiKeyConfig(
                    name=reader.string(f"{k}.name", kt.get("name")),
                    sha256=digest,
                    scopes=reader.strings(f"{k}.scopes", kt.get("scopes", [])),
                )
            )
    prefix = reader.string("auth.identity_prefix", t.get("identity_prefix", "X-Auth-"))
    reader.header_name("auth.identity_prefix", prefix.rstrip("-") or "x")
    return AuthConfig(jwt=jwt, api_key_header=header, api_keys=tuple(keys), identity_prefix=prefix)


def _cors(reader: _Reader, value: object) -> CorsConfig:
    t = reader.table("cors", value, tuple(CorsConfig.__slots__))
    d = CorsConfig()
    origins = reader.strings("cors.allow_origins", t.get("allow_origins", []))
    credentials = reader.flag("cors.allow_credentials", t.get("allow_credentials", False))
    if credentials and "*" in origins:
        raise reader.error("cors.allow_origins", "'*' cannot be used with allow_credentials")
    return CorsConfig(
        allow_origins=origins,
        allow_methods=tuple(
            m.upper()
            for m in reader.strings(
                "cors.allow_methods", t.get("allow_methods", list(d.allow_methods))
            )
        ),
        allow_headers=tuple(
            h.lower()
            for h in reader.strings(
                "cors.allow_headers", t.get("allow_headers", list(d.allow_headers))
            )
        ),
        expose_headers=tuple(
            h.lower()
            for h in reader.strings(
                "cors.expose_headers", t.get("expose_headers", list(d.expose_headers))
            )
        ),
        allow_credentials=credentials,
        max_age=reader.whole("cors.max_age", t.get("max_age", d.max_age)),
    )


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's error on one line: where, and what."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if mark is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
