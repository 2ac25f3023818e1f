"""Loading ``atoll.toml`` with environment overrides, and saying exactly what is wrong."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from atoll._errors import AtollError
from atoll.config._model import AtollConfig, ServiceSection

T = TypeVar("T")
ENV_PREFIX = "ATOLL__"
_MAX_NICE = 19  # the lowest priority a Unix nice value gives
_MAX_INSTANCES = 64  # processes of one service on one machine: more is a mistake
_PORTS = 65536  # TCP ports are below this
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SCHEMES = {
    "sqlite",
    "memory",
    "postgresql",
    "postgres",
    "nats",
    "amqp",
    "amqps",
    "redis",
    "rediss",
}


class ConfigError(AtollError):
    """The configuration is invalid. ``key`` is a dotted path; ``source`` the file or variable."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")
        self.source = source
        self.key = key
        self.problem = problem


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated configuration and where it came from."""

    config: AtollConfig
    path: Path
    profile: str | None = None

    @property
    def base_dir(self) -> Path:
        """The folder of the file: relative paths in it are relative to this."""
        return self.path.parent

    @property
    def data_dir(self) -> Path:
        """Where embedded files live."""
        return (self.base_dir / self.config.system.data_dir).resolve()

    def service(self, name: str) -> ServiceSection:
        """The section of service ``name``."""
        try:
            return self.config.services[name]
        except KeyError:
            known = ", ".join(sorted(self.config.services)) or "none"
            raise ConfigError(
                str(self.path), f"services.{name}", f"no such service (known: {known})"
            ) from None

    def database_url(self, name: str) -> str:
        """The database URL of service ``name``, defaulted to a SQLite file in ``data_dir``."""
        url = self.service(name).database
        return url or f"sqlite:///{name}.db"


def _location(path: str) -> str:
    # msgspec says "$.services.orders.port" or "$.services.orders"; keep the dotted part.
    return path.removeprefix("$").removeprefix(".")


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``ATOLL__SYSTEM__TRANSPORT=...`` sets ``system.transport``.

    Keys are lowercased, except the names under an ``env`` table.

    Values are parsed as TOML values when they parse (numbers, booleans, arrays) and kept
    as strings otherwise.
    """
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        raw_parts = [p for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not raw_parts:
            continue
        parts = [p.lower() for p in raw_parts]
        if len(parts) >= 2 and parts[-2] == "env":
            parts[-1] = raw_parts[-1]  # environment variable names keep their case
        try:
            value: Any = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    name, ".".join(parts), "cannot set a key inside a non-table value"
                )
            node = child
        node[parts[-1]] = value


def _check_url(source: str, key: str, url: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in _SCHEMES:
        raise ConfigError(
            source, key, f"unsupported URL scheme {scheme!r} (expected one of {sorted(_SCHEMES)})"
        )


def _merge(base: dict[str, Any], overlay: dict[str, Any]) -> None:
    """Deep-merge ``overlay`` into ``base``: tables merge, other values replace."""
    for key, value in overlay.items():
        current = base.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            _merge(current, value)
        else:
            base[key] = value


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(source: str, key: str, value: Any, environ: Mapping[str, str]) -> Any:
    """Replace ``${NAME}`` in strings with environment variables (secrets stay out of files)."""
    if isinstance(value, dict):
        return {
            k: _expand(source, f"{key}.{k}" if key else k, v, environ) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_expand(source, key, v, environ) for v in value]
    if isinstance(value, str) and "${" in value:

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in environ:
                raise ConfigError(source, key, f"environment variable {name} is not set")
            return environ[name]

        return _VARIABLE.sub(lookup, value)
    return value


def load_config(
    path: str | Path = "atoll.toml",
    environ: Mapping[str, str] | None = None,
    *,
    profile: str | None = None,
) -> LoadedConfig:
    """Read, overlay a profile, override from the environment, and validate.

    ``profile`` (or ``$ATOLL_PROFILE``) names a ``[profiles.NAME]`` table whose keys are
    merged over the file's (``[profiles.production.system] transport = "nats://..."``).
    Then ``ATOLL__SECTION__KEY`` variables override, and ``${NAME}`` in string values is
    replaced by that environment variable. Every problem raises :class:`ConfigError`
    naming the file (or the environment variable) and the dotted key.
    """
    file = Path(path).resolve()
    source = str(path)
    environ = os.environ if environ is None else environ
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot be read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"is not valid TOML: {exc}") from None
    profiles = data.pop("profiles", {})
    profile = profile or environ.get("ATOLL_PROFILE") or None
    if not isinstance(profiles, dict):
        raise ConfigError(source, "profiles", "must be a table of profiles")
    if profile is not None:
        overlay = profiles.get(profile)
        if not isinstance(overlay, dict):
            known = ", ".join(sorted(profiles)) or "none"
            raise ConfigError(source, f"profiles.{profile}", f"no such profile (known: {known})")
        _merge(data, overlay)
    _apply_env(data, environ)
    data = _expand(source, "", data, environ)
    services = data.pop("services", {})
    if not isinstance(services, dict):
        raise ConfigError(source, "services", "must be a table of services")
    config = _convert(source, "", data, AtollConfig)
    for name, section in services.items():
        config.services[name] = _convert(source, f"services.{name}", section, ServiceSection)
    _validate(source, config)
    _validate_policies(source, config)
    return LoadedConfig(config, file, profile)


def _convert(source: str, prefix: str, data: object, kind: type[T]) -> T:
    """``msgspec.convert`` that names the dotted key of any problem."""
    try:
        return msgspec.convert(data, kind, strict=True)
    except msgspec.ValidationError as exc:
        message = str(exc)
        where = ""
        if " - at `" in message:
            message, _, at = message.rpartition(" - at `")
            where = _location(at.rstrip("`"))
        unknown = re.match(r"Object contains unknown field `([^`]+)`", message)
        if unknown:
            where = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
            message = "unknown key"
        key = ".".join(part for part in (prefix, where) if part)
        raise ConfigError(source, key, message[0].lower() + message[1:]) from None


def _validate_policies(source: str, config: AtollConfig) -> None:
    """Build every policy once, so a bad one is refused at start, naming its key."""
    from atoll.resilience import policy_from_config  # noqa: PLC0415 - config stays light

    shared = None
    if config.system.shared_state is not None:
        _check_url(source, "system.shared_state", config.system.shared_state)
        from atoll.resilience.redis import RedisSharedState  # noqa: PLC0415 - optional

        shared = RedisSharedState.from_url(config.system.shared_state)  # connects lazily
    for name, table in config.policies.items():
        if not isinstance(table, dict):
            raise ConfigError(source, f"policies.{name}", "must be a table")
        policy_from_config(table, source=source, name=name, shared=shared)


def _validate_collector(source: str, config: AtollConfig) -> None:
    collector = config.system.collector
    try:
        from atoll.observability.collector._query import parse_lookback  # noqa: PLC0415

        parse_lookback(collector.retention)
    except ValueError as exc:
        raise ConfigError(source, "system.collector.retention", str(exc)) from None
    if not 0 < collector.port < 65536:
        raise ConfigError(source, "system.collector.port", f"{collector.port} is not a TCP port")
    if not 0 <= collector.nice <= _MAX_NICE:
        raise ConfigError(
            source, "system.collector.nice", f"must be 0 to {_MAX_NICE}, not {collector.nice}"
        )


def _validate(source: str, config: AtollConfig) -> None:
    system = config.system
    _check_url(source, "system.transport", system.transport)
    _validate_collector(source, config)
    if system.drain_timeout < 0:
        raise ConfigError(source, "system.drain_timeout", "must be >= 0")
    if system.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(source, "system.sqlite_synchronous", "must be FULL, NORMAL or EXTRA")
    ports: dict[tuple[str, int], str] = {}
    for name, service in config.services.items():
        _validate_service(source, name, service, ports)
    _validate_gateway(source, config, ports)


def _validate_service(
    source: str, name: str, service: ServiceSection, ports: dict[tuple[str, int], str]
) -> None:
    """One ``[services.NAME]``; records its instances' ports in ``ports`` (to find clashes)."""
    key = f"services.{name}"
    if not _NAME.match(name):
        raise ConfigError(source, key, "a service name is letters, digits, '-' and '_'")
    if ":" not in service.app:
        raise ConfigError(source, f"{key}.app", "must look like 'package.module:attribute'")
    if not 0 < service.port < _PORTS:
        raise ConfigError(source, f"{key}.port", f"{service.port} is not a TCP port")
    if not 1 <= service.instances <= _MAX_INSTANCES:
        raise ConfigError(source, f"{key}.instances", f"must be between 1 and {_MAX_INSTANCES}")
    for port in service.ports:
        if port >= _PORTS:
            raise ConfigError(
                source, f"{key}.instances", f"the instances' ports run past {_PORTS - 1}"
            )
        other = ports.setdefault((service.host, port), name)
        if other != name:
            raise ConfigError(source, f"{key}.port", f"{port} is already used by {other}")
    if service.database is not None:
        _check_url(source, f"{key}.database", service.database)
    if service.max_batch < 1:
        raise ConfigError(source, f"{key}.max_batch", "must be >= 1")


def _validate_gateway(source: str, config: AtollConfig, ports: dict[tuple[str, int], str]) -> None:
    gateway = config.gateway
    if gateway is None:
        return
    for field in ("port", "admin_port"):
        port = getattr(gateway, field)
        if not 0 < port < 65536:
            raise ConfigError(source, f"gateway.{field}", f"{port} is not a TCP port")
        used_by = ports.get((gateway.host, port))
        if used_by is not None:
            raise ConfigError(source, f"gateway.{field}", f"{port} is already used by {used_by}")
    if not 1 <= gateway.workers <= 64:
        raise ConfigError(source, "gateway.workers", "must be between 1 and 64")
