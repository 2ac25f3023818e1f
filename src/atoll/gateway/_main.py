"""``python -m atoll.gateway``: run the gateway, in one process or N with ``SO_REUSEPORT``.

With ``--workers N`` (or ``server.workers``) this process starts N worker processes
that each listen on the same port (the kernel spreads connections between them) and
restarts a worker that dies. Each worker serves its admin endpoints on
``admin.port + index``. SIGTERM/SIGINT stop gracefully (in-flight requests finish);
SIGHUP reloads the configuration now (it is also reloaded when its file changes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any, Final

from atoll.config import ConfigError
from atoll.determinism import SystemClock


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m atoll.gateway", description=__doc__)
    parser.add_argument("--config", "-c", required=True, help="gateway YAML or TOML file")
    parser.add_argument("--system", help="atoll.toml for 'service:' upstreams")
    parser.add_argument("--profile", help="profile of atoll.toml")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--admin-port", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    from atoll.gateway._config import load_gateway_config  # noqa: PLC0415
    from atoll.observability import configure_logging  # noqa: PLC0415

    configure_logging(service="gateway")
    try:
        config = load_gateway_config(args.config, system=args.system, profile=args.profile)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    workers = args.workers or config.server.workers
    if args.worker_index is None and workers > 1:
        return _supervise(args, workers)
    # Each worker has its own admin port (base + index); 0 in the file means none.
    admin_port = args.admin_port if args.admin_port is not None else config.admin.port
    if admin_port and args.worker_index:
        admin_port += args.worker_index
    return _serve(args, admin_port, reuse_port=workers > 1)


def _serve(args: argparse.Namespace, admin_port: int, *, reuse_port: bool) -> int:
    """Serve in this process; ``admin_port`` 0: no admin listener (as in the file)."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up (uvicorn[standard] brings it)

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        return runner.run(_run(args, admin_port, reuse_port))


def load_listen_settings(args: argparse.Namespace) -> str:
    """``host:port`` the gateway was to listen on (the options, else the file)."""
    from atoll.gateway._config import load_gateway_config  # noqa: PLC0415

    host, port = args.host, args.port
    if host is None or port is None:
        with contextlib.suppress(ConfigError):
            server = load_gateway_config(args.config, system=args.system).server
            host = host if host is not None else server.host
            port = port if port is not None else server.port
    return f"{host}:{port}"


async def _run(args: argparse.Namespace, admin_port: int, reuse_port: bool) -> int:
    from atoll._heap import freeze_startup_heap  # noqa: PLC0415
    from atoll.gateway._gateway import Gateway  # noqa: PLC0415
    from atoll.observability import Tracing  # noqa: PLC0415

    log = logging.getLogger("atoll.gateway")
    tracing = Tracing("gateway")
    tracing.make_global()
    try:
        gateway = Gateway(
            args.config,
            system=args.system,
            profile=args.profile,
            host=args.host,
            port=args.port,
            admin_port=admin_port or None,
            admin=bool(admin_port),
            tracing=tracing if tracing.enabled else None,
            reuse_port=reuse_port,
        )
        await gateway.start()
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    except OSError as exc:
        # Binding failed: the address is taken, not this host's, or not a host at all.
        server = load_listen_settings(args)
        sys.stderr.write(
            f"error: {args.config}: server.host, server.port or admin.port: cannot listen"
            f" on {server} (admin port {admin_port or 'none'}): {exc.strerror or exc}\n"
        )
        return 2
    metric_export = _metric_export(gateway)
    freeze_startup_heap()  # see atoll._heap: no 40 ms full collections while serving
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(gateway.reload()))
    log.info(
        "gateway listening on %s:%d (admin %d, %d route(s))",
        args.host or gateway.gen.config.server.host,
        gateway.port,
        gateway.admin_port,
        len(gateway.gen.config.routes),
    )
    await stop.wait()
    log.info("gateway stopping: finishing in-flight requests")
    await gateway.stop()
    if metric_export is not None:
        await metric_export.stop()
    tracing.shutdown()
    return 0


def _metric_export(gateway: Any) -> Any:
    """The worker's metrics pushed over OTLP when the standard variables say where."""
    from atoll.observability._metric_export import (  # noqa: PLC0415 - only when asked
        MetricExport,
        otlp_metrics_endpoint,
        service_resource,
    )

    endpoint = otlp_metrics_endpoint()
    if endpoint is None:
        return None
    try:
        export = MetricExport(
            service_resource("gateway"), gateway.metrics.registry.collect, endpoint=endpoint
        )
    except Exception as exc:  # no otel extra, a bad exporter variable: /metrics serves them
        logging.getLogger("atoll.gateway").warning(
            "gateway: metrics are not pushed over OTLP: %s", exc
        )
        return None
    export.start()
    return export


#: A worker that exits within this many seconds of starting is restarted after a
#: growing delay (0.25 s, doubling, at most _MAX_BACKOFF), not at once in a loop.
_QUICK_EXIT: Final = 5.0
_MAX_BACKOFF: Final = 10.0


def _supervise(args: argparse.Namespace, workers: int) -> int:  # noqa: C901 - signal plumbing
    base = [sys.executable, "-m", "atoll.gateway"]
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker-index")]
    children: dict[int, subprocess.Popen[bytes]] = {}
    stopping = False
    clock = SystemClock()
    started: dict[int, float] = {}
    #: Exits in a row soon after starting, by worker: restarts back off (a crash loop).
    quick_exits: dict[int, int] = {}
    pause = threading.Event()  # set by stop(): a backoff does not hold up a SIGTERM

    def spawn(index: int) -> None:
        started[index] = clock.monotonic()
        children[index] = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*base, *argv, "--workers", str(workers), "--worker-index", str(index)],
            env=dict(os.environ),
        )

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        del frame
        stopping = True
        pause.set()
        for child in children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def reload(signum: int, frame: object) -> None:
        del frame
        for child in children.values():
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    for index in range(workers):
        spawn(index)
    code = 0
    while children:
        pid, status = os.wait()
        for index, child in list(children.items()):
            if child.pid != pid:
                continue
            child.returncode = os.waitstatus_to_exitcode(status)
            del children[index]
            if not stopping:
                if child.returncode == 2:  # a configuration error: restarting will not help
                    stop(signal.SIGTERM, None)
                    code = 2
                    break
                quick = clock.monotonic() - started[index] < _QUICK_EXIT
                quick_exits[index] = quick_exits.get(index, 0) + 1 if quick else 0
                delay = min(_MAX_BACKOFF, 0.25 * 2 ** (quick_exits[index] - 1)) if quick else 0.0
                sys.stderr.write(
                    f"gateway worker {index} exited ({child.returncode}); restarting"
                    + (f" in {delay:.1f} s\n" if delay else "\n")
                )
                if delay:
                    pause.wait(delay)
                if not stopping:
                    spawn(index)
    del args
    return code
