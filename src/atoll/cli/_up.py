"""``atoll up``: every service of a system as its own process, supervised."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table
from rich.text import Text

from atoll.cli._run import INSTANCE_VARIABLE, declare_subscriptions
from atoll.config import ConfigError, LoadedConfig
from atoll.config._model import GatewaySection
from atoll.determinism import SystemClock
from atoll.observability import otlp_endpoint, tracing_disabled

_COLORS = [
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "bright_red",
    "bright_cyan",
    "bright_magenta",
]


@dataclass
class _Child:
    name: str
    color: str
    url: str
    argv: list[str]
    env: dict[str, str]
    ready_path: str = "/readyz"
    #: The service it runs (its name is ``service.N`` for one of several instances).
    service: str = ""
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    started_at: float = 0.0
    ready: bool = False
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class Supervisor:
    """Starts each service as ``python -m atoll run NAME``, prefixes its output, restarts
    it with backoff if it dies, and stops all of them gracefully on Ctrl-C or SIGTERM.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        names: list[str],
        *,
        console: Console,
        restart: bool = True,
        ready_timeout: float = 60.0,
    ) -> None:
        self.loaded = loaded
        self.console = console
        self.restart = restart
        self.ready_timeout = ready_timeout
        self.clock = SystemClock()
        self.children: list[_Child] = []
        self.collector: _Child | None = None
        service_env: dict[str, str] = {}
        collector = loaded.config.system.collector
        if collector.enabled and otlp_endpoint() is None and not tracing_disabled():
            # The embedded collector by default; a user's own OTLP endpoint wins, and
            # traces turned off by the standard variables need no collector.
            url = f"http://{collector.host}:{collector.port}"
            self.collector = _Child(
                "traces",
                "bright_white",
                url,
                [
                    "-m",
                    "atoll.observability.collector",
                    "--host",
                    collector.host,
                    "--port",
                    str(collector.port),
                    "--db",
                    str(loaded.data_dir / "traces.db"),
                    "--max-age",
                    collector.retention,
                    "--nice",
                    str(collector.nice),
                    "--log-level",
                    "warning",
                ],
                {},
                ready_path="/api/stats",
            )
            self.children.append(self.collector)
            service_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = url
            if "OTEL_METRIC_EXPORT_INTERVAL" not in os.environ:
                # The collector is a page away on this machine: a metrics push every 10 s
                # (the standard's default is 60) keeps its Metrics page current.
                service_env["OTEL_METRIC_EXPORT_INTERVAL"] = "10000"
        profile = ("--profile", loaded.profile) if loaded.profile else ()
        config = ("--config", str(loaded.path))
        for i, name in enumerate(names):
            spec = loaded.service(name)
            for index, port in enumerate(spec.ports):
                self.children.append(
                    _Child(
                        name if spec.instances == 1 else f"{name}.{index + 1}",
                        _COLORS[i % len(_COLORS)],
                        f"http://{spec.host}:{port}",
                        ["-m", "atoll", "run", name, *config, *profile],
                        {**service_env, **spec.env, INSTANCE_VARIABLE: str(index)},
                        service=name,
                    )
                )
        self.gateway: _Child | None = None
        gateway = loaded.config.gateway
        if gateway is not None:
            # `python -m atoll.gateway`; ready when its admin port answers /readyz.
            self.gateway = _Child(
                "gateway",
                "bright_blue",
                f"http://{_admin_address(loaded, gateway)}:{gateway.admin_port}",
                [
                    "-m",
                    "atoll.gateway",
                    "--config",
                    str(loaded.base_dir / gateway.config),
                    "--system",
                    str(loaded.path),
                    *profile,
                    "--host",
                    gateway.host,
                    "--port",
                    str(gateway.port),
                    "--admin-port",
                    str(gateway.admin_port),
                    "--workers",
                    str(gateway.workers),
                ],
                {**service_env, **gateway.env},
            )
            self.children.append(self.gateway)
        self._width = max(len(c.name) for c in self.children)
        self._stopping = False

    def services(self) -> list[_Child]:
        """The service processes (not the collector, not the gateway)."""
        return [c for c in self.children if c is not self.collector and c is not self.gateway]

    def stopping(self) -> bool:
        """Whether the supervisor is shutting down."""
        return self._stopping

    def _say(self, child: _Child | None, line: str, style: str = "") -> None:
        prefix = Text(
            f"{(child.name if child else 'atoll'):<{self._width}} | ",
            style=child.color if child else "bold",
        )
        self.console.print(
            prefix + Text.from_ansi(line, style=style), soft_wrap=True, highlight=False
        )

    async def _pump(self, child: _Child, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self._say(child, line.decode(errors="replace").rstrip())

    async def _spawn(self, child: _Child) -> None:
        env = dict(os.environ)
        env.update(child.env)
        env.setdefault("ATOLL_LOG_FORMAT", "console")
        env.setdefault("ATOLL_LOG_COLOR", "1" if self.console.is_terminal else "0")
        env["PYTHONUNBUFFERED"] = "1"
        child.started_at = self.clock.monotonic()
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            *child.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop children in order
            preexec_fn=_die_with_parent(),
        )
        assert child.process.stdout is not None
        child.pumps = [
            asyncio.get_running_loop().create_task(self._pump(child, child.process.stdout))
        ]

    async def _await_ready(self, client: httpx.AsyncClient, child: _Child) -> bool:
        deadline = self.clock.monotonic() + self.ready_timeout
        while self.clock.monotonic() < deadline and not self._stopping:
            if child.process is not None and child.process.returncode is not None:
                return False
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"{child.url}{child.ready_path}", timeout=1.0)
                if response.status_code == 200:
                    child.ready = True
                    return True
            await self.clock.sleep(0.1)
        return False

    async def _watch(self, child: _Child) -> None:
        """Restart a child that exits while we are not stopping, with backoff."""
        while not self._stopping:
            assert child.process is not None
            code = await child.process.wait()
            for pump in child.pumps:
                with contextlib.suppress(Exception):
                    await pump
            if self.stopping():  # run() may have set it while we awaited
                return
            child.ready = False
            self._say(None, f"{child.name} exited with code {code}", style="bold red")
            if not self.restart:
                return
            if self.clock.monotonic() - child.started_at > 30.0:
                child.restarts = 0  # it ran well for a while: back to a quick restart
            child.restarts += 1
            delay = min(10.0, 0.25 * 2 ** min(child.restarts, 6))
            self._say(None, f"restarting {child.name} in {delay:.1f}s", style="yellow")
            await self.clock.sleep(delay)
            if not self._stopping:
                await self._spawn(child)

    def _summary(self) -> None:
        table = Table(title=f"{self.loaded.config.system.name} is up", title_justify="left")
        table.add_column("service")
        table.add_column("url")
        table.add_column("ready")
        for child in self.services():
            table.add_row(
                Text(child.name, style=child.color),
                child.url,
                Text("yes", style="green") if child.ready else Text("no", style="red"),
            )
        self.console.print(table)
        if self.collector is not None:
            self.console.print(
                f"Traces: {self.collector.url}/ (every service exports there)", highlight=False
            )
        gateway = self.loaded.config.gateway
        if gateway is not None:
            admin = self.gateway.url if self.gateway is not None else ""
            self.console.print(
                f"Gateway: http://{gateway.host}:{gateway.port} (routes: {admin}/routes)",
                highlight=False,
            )
            # Copied from the banner, the token command must find this configuration.
            path = self.loaded.path
            here = Path("atoll.toml").resolve()
            config = "" if path.resolve() == here else f" --config {shlex.quote(str(path))}"
            if any(child.name == "orders" for child in self.services()):  # the shop
                self.console.print(
                    "Try: TOKEN=$(atoll token --sub alice --scope orders:write"
                    f" --scope orders:read{config})\n"
                    f"     curl -X POST http://{gateway.host}:{gateway.port}/orders "
                    "-H \"authorization: Bearer $TOKEN\" -H 'content-type: application/json' "
                    """-d '{"customer_id": "c1", "items": [{"sku": "apple", "qty": 1}]}'""",
                    highlight=False,
                )
            else:
                self.console.print(
                    f"A development token for its routes: atoll token --sub <subject>{config}",
                    highlight=False,
                )
        else:
            first = self.services()[0]
            self.console.print(
                f"Try: curl -X POST {first.url}/orders -H 'content-type: application/json' "
                """-d '{"customer_id": "c1", "items": [{"sku": "apple", "qty": 1}]}'"""
                if first.name == "orders"
                else "Services answer at the URLs above; /readyz shows each one's state.",
                highlight=False,
            )
        self.console.print("Press Ctrl-C to stop.", style="dim")

    async def run(self) -> int:
        """Run until Ctrl-C or SIGTERM; return the exit code."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        watchers: list[asyncio.Task[None]] = []
        code = 0
        try:
            self.loaded.data_dir.mkdir(parents=True, exist_ok=True)
            await declare_subscriptions(
                self.loaded, list(dict.fromkeys(c.service for c in self.services()))
            )
            for child in self.children:
                await self._spawn(child)
            async with httpx.AsyncClient() as client:
                ready = await asyncio.gather(*(self._await_ready(client, c) for c in self.children))
            if not all(ready) and not stop.is_set():
                failed = ", ".join(
                    c.name for c, ok in zip(self.children, ready, strict=True) if not ok
                )
                self._say(None, f"not ready: {failed}; stopping", style="bold red")
                code = 1
            else:
                self._summary()
                watchers = [loop.create_task(self._watch(c)) for c in self.children]
                await stop.wait()
        finally:
            self._stopping = True
            self._say(None, "stopping services (finishing in-flight work)")
            await self._stop_all()
            for watcher in watchers:
                watcher.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return code

    async def _stop_all(self) -> None:
        if self.gateway is not None:
            await self._stop([self.gateway])  # first: no new requests reach stopping services
        await self._stop(self.services())
        if self.collector is not None:
            await self._stop([self.collector])  # last: it receives the services' final spans
        self._say(None, "all services stopped")

    async def _stop(self, children: list[_Child]) -> None:
        drain = self.loaded.config.system.drain_timeout + 5.0
        running = [c for c in children if c.process and c.process.returncode is None]
        for child in running:
            assert child.process is not None
            with contextlib.suppress(ProcessLookupError):
                child.process.send_signal(signal.SIGTERM)
        for child in running:
            assert child.process is not None
            try:
                await asyncio.wait_for(child.process.wait(), drain)
            except TimeoutError:
                self._say(
                    None, f"{child.name} did not stop in {drain:.0f}s; killing it", style="red"
                )
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()
            for pump in child.pumps:
                with contextlib.suppress(Exception):
                    await pump


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel send the child SIGTERM when this process dies.

    Children run in their own sessions (so Ctrl-C reaches only the supervisor, which
    stops them in order); without this, a supervisor killed with SIGKILL would leave
    them running, holding their ports, and the next ``atoll up`` could not start. SIGTERM
    is a graceful stop for every child. Linux only (``prctl``); elsewhere ``None``.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    supervisor = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no allocation
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != supervisor:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _admin_address(loaded: LoadedConfig, gateway: GatewaySection) -> str:
    """Where the gateway's admin listener answers: its file's ``admin.host`` (it does
    not listen on the public ``host``), as a URL's host part."""
    host = "127.0.0.1"
    with contextlib.suppress(ImportError, ConfigError):
        from atoll.gateway import load_gateway_config  # noqa: PLC0415 - gateway extra

        host = load_gateway_config(
            loaded.base_dir / gateway.config,
            system=loaded.path,
            profile=loaded.profile,
            environ={**os.environ, **gateway.env},
        ).admin.host
    if host in {"", "0.0.0.0"}:  # noqa: S104 - every address: the local one answers
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"[{host}]" if ":" in host else host
