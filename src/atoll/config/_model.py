"""The shape of ``atoll.toml``."""

from __future__ import annotations

from typing import Any

import msgspec


class CollectorSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[system.collector]``: the embedded OTLP collector and trace view of ``atoll up``.

    It starts unless ``enabled = false`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (then
    services export to that collector instead).
    """

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 4318
    #: How long spans are kept, e.g. ``24h`` or ``30m``.
    retention: str = "24h"
    #: The collector's CPU niceness, 0 (the normal priority, the default) to 19. A
    #: higher value yields the CPU to the services under contention, at the price of
    #: spans dropped when the load stays high (``docs/collector.md``, "CPU priority").
    nice: int = 0


class SystemSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[system]``: what all services share."""

    name: str = "atoll"
    #: Where embedded databases, the embedded bus and logs live (relative to the file).
    data_dir: str = ".atoll"
    #: The transport every service uses: ``sqlite:///path``, ``memory://`` (single process
    #: only), or a broker URL.
    transport: str = "sqlite:///bus.db"
    #: Folders added to ``sys.path`` to import services (relative to the file).
    python_path: list[str] = msgspec.field(default_factory=lambda: ["."])
    #: Seconds a stopping service waits for in-flight handlers.
    drain_timeout: float = 30.0
    #: Default durability of embedded SQLite files: ``FULL`` or ``NORMAL``.
    sqlite_synchronous: str = "FULL"
    #: A Redis URL through which breakers and rate limiters with ``shared = true`` share
    #: their windows across instances (decisions stay local when it is slow or down).
    shared_state: str | None = None
    collector: CollectorSection = msgspec.field(default_factory=CollectorSection)


class ServiceSection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[services.NAME]``: one service."""

    #: ``package.module:attribute`` of the :class:`atoll.Service`.
    app: str
    host: str = "127.0.0.1"
    port: int
    #: The service's own database. Default: ``sqlite:///<data_dir>/<name>.db``.
    database: str | None = None
    #: Largest batch of messages handled in one transaction.
    max_batch: int = 100
    #: Extra environment variables for the service's process.
    env: dict[str, str] = msgspec.field(default_factory=dict)
    #: Processes ``atoll up`` runs for this service, on ports ``port`` to
    #: ``port + instances - 1``. They share the service's database and its subscription:
    #: messages go to one of them (competing consumers), one relays the outbox at a time
    #: (a lease), and a gateway ``service:`` upstream balances over all of them.
    instances: int = 1

    @property
    def ports(self) -> range:
        """The ports of the service's instances."""
        return range(self.port, self.port + self.instances)


class GatewaySection(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``[gateway]``: the API gateway ``atoll up`` starts in front of the services.

    Its routes live in ``config`` (a YAML file, relative to ``atoll.toml``; see
    ``docs/gateway.md``); ``service:`` upstreams there resolve to the services' addresses
    here. ``host``/``port``/``admin_port``/``workers`` override the file's ``server``
    and ``admin`` settings.
    """

    config: str
    host: str = "127.0.0.1"
    port: int = 8080
    admin_port: int = 9901
    workers: int = 1
    #: Extra environment variables for the gateway's processes.
    env: dict[str, str] = msgspec.field(default_factory=dict)


class AtollConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole ``atoll.toml``."""

    system: SystemSection = msgspec.field(default_factory=SystemSection)
    services: dict[str, ServiceSection] = msgspec.field(default_factory=dict)
    #: Resilience policies by name (``[policies.NAME]``, see ``docs/resilience.md``). A
    #: policy named like a service applies to every call the services make to it (the
    #: gateway's upstreams have their own ``policy``).
    policies: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    #: The API gateway, if the system has one (``[gateway]``).
    gateway: GatewaySection | None = None
