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


def load_config(
    path: str | Path = "atoll.toml", environ: Mapping[str, str] | None = None
) -> LoadedConfig:
    """Read, override from the environment, and validate a configuration file.

    Every problem raises :class:`ConfigError` naming the file (or the environment
    variable) and the dotted key.
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
    _apply_env(data, environ)
    services = data.pop("services", {})
    if not isinstance(services, dict):
        raise ConfigError(source, "services", "must be a table of services")
    config = _convert(source, "", data, AtollConfig)
    for name, section in services.items():
        config.services[name] = _convert(source, f"services.{name}", section, ServiceSection)
    _validate(source, config)
    return LoadedConfig(config, file)


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


def _validate(source: str, config: AtollConfig) -> None:
    system = config.system
    _check_url(source, "system.transport", system.transport)
    if system.drain_timeout < 0:
        raise ConfigError(source, "system.drain_timeout", "must be >= 0")
    if system.sqlite_synchronous.upper() not in ("FULL", "NORMAL", "EXTRA"):
        raise ConfigError(source, "system.sqlite_synchronous", "must be FULL, NORMAL or EXTRA")
    ports: dict[tuple[str, int], str] = {}
    for name, service in config.services.items():
        key = f"services.{name}"
        if not _NAME.match(name):
            raise ConfigError(source, key, "a service name is letters, digits, '-' and '_'")
        if ":" not in service.app:
            raise ConfigError(source, f"{key}.app", "must look like 'package.module:attribute'")
        if not 0 < service.port < 65536:
            raise ConfigError(source, f"{key}.port", f"{service.port} is not a TCP port")
        other = ports.setdefault((service.host, service.port), name)
        if other != name:
            raise ConfigError(source, f"{key}.port", f"{service.port} is already used by {other}")
        if service.database is not None:
            _check_url(source, f"{key}.database", service.database)
        if service.max_batch < 1:
            raise ConfigError(source, f"{key}.max_batch", "must be >= 1")
