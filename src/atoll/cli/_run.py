"""Serving services in this process: used by ``atoll run`` and ``atoll up --single-process``."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Generator, Sequence
from pathlib import Path

import uvicorn

from atoll._errors import AtollError
from atoll._heap import freeze_startup_heap
from atoll.config import ConfigError, LoadedConfig
from atoll.determinism import RandomSource, SystemClock
from atoll.observability import otlp_endpoint
from atoll.persistence import database_from_url
from atoll.resilience import ServiceClient, policy_from_config
from atoll.service import Service, ServiceRuntime
from atoll.service._context import outgoing_trace_headers
from atoll.transport import transport_from_url

#: The instance of a service a process runs (0 to ``instances - 1``), set by ``atoll up``.
INSTANCE_VARIABLE = "ATOLL_INSTANCE"

log = logging.getLogger("atoll.run")


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: shutdown order matters."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def import_service(loaded: LoadedConfig, name: str) -> Service:
    """Import the :class:`Service` that ``services.NAME.app`` points at."""
    spec = loaded.service(name)
    for entry in reversed(loaded.config.system.python_path):
        path = str((loaded.base_dir / entry).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)
    module_name, _, attribute = spec.app.partition(":")
    key = f"services.{name}.app"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(str(loaded.path), key, f"cannot import {module_name!r}: {exc}") from None
    service = getattr(module, attribute, None)
    if not isinstance(service, Service):
        raise ConfigError(
            str(loaded.path), key, f"{spec.app!r} is {type(service).__name__}, not an atoll Service"
        )
    if service.name != name:
        raise ConfigError(
            str(loaded.path), key, f"{spec.app!r} is service {service.name!r}, not {name!r}"
        )
    return service


def bind_socket(host: str, port: int, what: str) -> socket.socket:
    """A listening socket, or an error naming who could not listen where."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AtollError(f"{what} cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def declare_subscriptions(loaded: LoadedConfig, names: Sequence[str]) -> None:
    """Declare every service's subscriptions, so no event published at start-up is lost
    for a service that has not started yet."""
    system = loaded.config.system
    transport = transport_from_url(
        system.transport, base_dir=loaded.data_dir, synchronous=system.sqlite_synchronous
    )
    await transport.connect()
    try:
        for name in names:
            service = import_service(loaded, name)
            await transport.declare(service.name, service.topics())
    finally:
        await transport.close()


class SystemProcess:
    """Some services of a system, served by this process, sharing one transport."""

    def __init__(self, loaded: LoadedConfig, names: Sequence[str], *, single_process: bool) -> None:
        system = loaded.config.system
        if system.transport.startswith("memory:") and not single_process:
            raise ConfigError(
                str(loaded.path),
                "system.transport",
                "memory:// lives in one process; use `atoll up --single-process` or the"
                " embedded sqlite:/// transport",
            )
        self.loaded = loaded
        self.clock = SystemClock()
        self.random = RandomSource(clock=self.clock)
        data_dir = loaded.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        services = [import_service(loaded, name) for name in names]
        self.transport = transport_from_url(
            system.transport,
            base_dir=data_dir,
            clock=self.clock,
            random=self.random,
            synchronous=system.sqlite_synchronous,
        )
        self.runtimes = [
            ServiceRuntime(
                service,
                database=database_from_url(
                    loaded.database_url(service.name),
                    base_dir=data_dir,
                    clock=self.clock,
                    synchronous=system.sqlite_synchronous,
                ),
                transport=self.transport,
                owns_transport=False,
                clock=self.clock,
                random=self.random,
                max_batch=loaded.service(service.name).max_batch,
                drain_timeout=system.drain_timeout,
                client=self._client(),
            )
            for service in services
        ]
        if len(self.runtimes) == 1:
            # One service per process: user code's trace.get_tracer() joins its traces.
            self.runtimes[0].tracing.make_global()
        self._started: list[ServiceRuntime] = []
        self._servers: list[tuple[_Server, asyncio.Task[None]]] = []
        self._sockets: list[socket.socket] = []

    def _client(self) -> ServiceClient:
        """A client for calls to the system's services, with the configured policies.

        A policy named like a service (``[policies.catalog]``) applies to calls to it.
        """
        loaded = self.loaded
        shared = None
        if loaded.config.system.shared_state is not None:
            from atoll.resilience.redis import RedisSharedState  # noqa: PLC0415 - optional

            shared = RedisSharedState.from_url(loaded.config.system.shared_state)
        addresses = {
            name: [f"http://{spec.host}:{port}" for port in spec.ports]
            for name, spec in loaded.config.services.items()
        }
        policies = {
            name: policy_from_config(
                table,
                source=str(loaded.path),
                name=name,
                clock=self.clock,
                random=self.random,
                shared=shared,
            )
            for name, table in loaded.config.policies.items()
            if name in addresses
        }
        return ServiceClient(
            addresses,
            policies=policies,
            clock=self.clock,
            random=self.random,
            trace_headers=outgoing_trace_headers,
        )

    async def start(self) -> None:
        """Bind every port first (a clear error if one is taken), then start services."""
        for runtime in self.runtimes:
            spec = self.loaded.service(runtime.service.name)
            port = self._port(runtime.service.name)
            self._sockets.append(bind_socket(spec.host, port, f"service {spec.app}"))
        await self.transport.connect()
        # Every subscription exists before any service can publish.
        for runtime in self.runtimes:
            await self.transport.declare(runtime.service.name, runtime.topics())
        for runtime in self.runtimes:
            await runtime.start()
            self._started.append(runtime)
        loop = asyncio.get_running_loop()
        for runtime, sock in zip(self.runtimes, self._sockets, strict=True):
            config = uvicorn.Config(
                runtime.service.http,
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=int(self.loaded.config.system.drain_timeout),
                server_header=False,
            )
            server = _Server(config)
            self._servers.append((server, loop.create_task(server.serve(sockets=[sock]))))
        for server, task in self._servers:
            # uvicorn exposes no start event; its flag flips within a few loop turns.
            while not server.started and not task.done():
                await self.clock.sleep(0.01)
            if task.done():
                task.result()
        for runtime in self.runtimes:
            spec = self.loaded.service(runtime.service.name)
            port = self._port(runtime.service.name)
            log.info("%s ready on http://%s:%d", runtime.service.name, spec.host, port)

    def _port(self, name: str) -> int:
        """The port of this process's instance of service ``name`` (``ATOLL_INSTANCE``,
        set by ``atoll up`` for services with ``instances`` > 1; 0 otherwise)."""
        spec = self.loaded.service(name)
        raw = os.environ.get(INSTANCE_VARIABLE, "0")
        try:
            index = int(raw)
        except ValueError:
            index = -1
        if not 0 <= index < spec.instances:
            raise ConfigError(
                str(self.loaded.path),
                f"services.{name}.instances",
                f"{INSTANCE_VARIABLE}={raw!r} names no instance (it has {spec.instances})",
            )
        return spec.port + index

    async def wait(self, stop: asyncio.Event) -> None:
        """Return when ``stop`` is set or an HTTP server ends."""
        waiter = asyncio.get_running_loop().create_task(stop.wait())
        await asyncio.wait(
            [waiter, *(task for _, task in self._servers)], return_when=asyncio.FIRST_COMPLETED
        )
        waiter.cancel()

    async def shutdown(self) -> None:
        """Stop consuming everywhere, finish HTTP requests, flush outboxes, close."""
        log.info("stopping: no new messages; finishing in-flight work")
        for runtime in self._started:
            await runtime.stop_consuming()
        for server, _ in self._servers:
            server.should_exit = True
        if self._servers:
            await asyncio.wait([task for _, task in self._servers])
        for runtime in self._started:
            await runtime.stop()
        await self.transport.close()
        for sock in self._sockets:
            sock.close()
        log.info("stopped")


async def serve(loaded: LoadedConfig, names: Sequence[str], *, single_process: bool) -> None:
    """Run ``names`` in this process until SIGINT or SIGTERM, then stop gracefully.

    Shutdown order: every service reports not ready and stops consuming (finishing the
    batch in hand); HTTP servers stop accepting and finish in-flight requests; outboxes
    are flushed; then databases and the transport close.
    """
    collector_task: asyncio.Task[None] | None = None
    collector = loaded.config.system.collector
    if single_process and collector.enabled and otlp_endpoint() is None:
        from atoll.observability.collector import serve_collector  # noqa: PLC0415 - optional

        started = asyncio.Event()
        collector_task = asyncio.get_running_loop().create_task(
            serve_collector(
                collector.host,
                collector.port,
                loaded.data_dir / "traces.db",
                log_level="warning",
                started=started,
            )
        )
        await asyncio.wait(
            [collector_task, asyncio.ensure_future(started.wait())],
            return_when=asyncio.FIRST_COMPLETED,
        )
        if collector_task.done():
            collector_task.result()
        url = f"http://{collector.host}:{collector.port}"
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = url
        log.info("traces: %s/", url)
    process = SystemProcess(loaded, names, single_process=single_process)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await process.start()
        freeze_startup_heap()  # see atoll._heap: no full collections of start-up objects
        await process.wait(stop)
    finally:
        await process.shutdown()
        if collector_task is not None:
            collector_task.cancel()
            await asyncio.wait([collector_task])
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(loaded: LoadedConfig, names: Sequence[str], *, single_process: bool) -> None:
    """Run :func:`serve` on uvloop when available."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        asyncio.run(serve(loaded, names, single_process=single_process))
    else:
        uvloop.run(serve(loaded, names, single_process=single_process))


def data_path(loaded: LoadedConfig) -> Path:
    """The data directory, created if needed."""
    loaded.data_dir.mkdir(parents=True, exist_ok=True)
    return loaded.data_dir
