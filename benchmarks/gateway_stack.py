"""Which server and which upstream client for the gateway's hot path: measured, not guessed.

Each variant is the smallest proxy that forwards ``GET`` to one upstream (nginx returning a
20-byte body) over keep-alive connections, in one process on uvloop, measured with
``wrk -t1 -c64`` (best of ``--rounds`` alternating rounds), with the CPU its process
spends per request (the least over the rounds):

* server: uvicorn (httptools, uvloop) with a raw ASGI app (no framework), or atoll's
  ``asyncio.Protocol`` server parsing with httptools directly (``atoll.gateway._server``);
* client: httpx ``AsyncClient``, aiohttp ``ClientSession`` (if installed), or atoll's
  keep-alive pool of ``asyncio.Protocol`` connections (``atoll.gateway._upstream``).

Usage: ``.venv/bin/python benchmarks/gateway_stack.py [--quick]``; the last line is the
JSON summary, ratios relative to the stack atoll uses (atoll server + atoll pool).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from gateway import NGINX, WRK, free_port, nginx_conf, wait_port

VARIANTS = [
    ("atoll-server+atoll-pool", "atoll", "pool"),
    ("atoll-server+httpx", "atoll", "httpx"),
    ("atoll-server+aiohttp", "atoll", "aiohttp"),
    ("uvicorn-asgi+atoll-pool", "uvicorn", "pool"),
    ("uvicorn-asgi+httpx", "uvicorn", "httpx"),
]


def make_client(kind: str, port: int):  # noqa: ANN201 - returns a coroutine function
    """``fetch(path) -> (status, body)`` through the chosen client."""
    if kind == "httpx":
        import httpx  # noqa: PLC0415

        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        )

        async def fetch_httpx(path: str) -> tuple[int, bytes]:
            response = await client.get(path)
            return response.status_code, response.content

        return fetch_httpx
    if kind == "aiohttp":
        import aiohttp  # noqa: PLC0415

        holder: dict[str, aiohttp.ClientSession] = {}

        async def fetch_aiohttp(path: str) -> tuple[int, bytes]:
            session = holder.get("s")
            if session is None:
                session = holder["s"] = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=200)
                )
            async with session.get(f"http://127.0.0.1:{port}{path}") as response:
                return response.status, await response.read()

        return fetch_aiohttp
    from atoll.determinism import SystemClock  # noqa: PLC0415
    from atoll.gateway._upstream import Instance, PassiveHealth, PoolSettings  # noqa: PLC0415

    instance = Instance(
        "127.0.0.1", port, pool=PoolSettings(), passive=PassiveHealth(), clock=SystemClock()
    )
    host = f"127.0.0.1:{port}".encode()

    async def fetch_pool(path: str) -> tuple[int, bytes]:
        conn = await instance.connect()
        response = await conn.send(b"GET %b HTTP/1.1\r\nhost: %b\r\n\r\n" % (path.encode(), host))
        return response.status, await response.body.read()

    return fetch_pool


def serve(server: str, client: str, port: int, upstream: int) -> None:
    """Run one variant until killed."""
    import uvloop  # noqa: PLC0415

    async def main() -> None:
        fetch = make_client(client, upstream)
        if server == "uvicorn":
            import uvicorn  # noqa: PLC0415

            async def app(scope, receive, send) -> None:  # noqa: ANN001, ARG001
                if scope["type"] != "http":
                    return
                status, body = await fetch(scope["path"])
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})

            config = uvicorn.Config(
                app,
                port=port,
                http="httptools",
                loop="none",
                access_log=False,
                log_level="warning",
                lifespan="off",
            )
            await uvicorn.Server(config).serve()
            return
        from atoll.gateway._server import (  # noqa: PLC0415
            Connection,
            ServerState,
            status_line,
        )

        async def handle(request) -> None:  # noqa: ANN001
            try:
                status, body = await fetch(request.path.decode())
                request.conn.write(
                    b"%bcontent-length: %d\r\n\r\n%b" % (status_line(status), len(body), body)
                )
            finally:
                request.conn.finish(request)

        state = ServerState(handle, lambda conn, _exc: conn.close())
        loop = asyncio.get_running_loop()
        await loop.create_server(lambda: Connection(state), "127.0.0.1", port, backlog=4096)
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def wrk_run(port: int, seconds: float) -> tuple[float, int]:
    """Requests/s and requests served in one ``wrk -t1 -c64`` run."""
    out = subprocess.run(
        [WRK, "-t1", "-c64", f"-d{seconds:g}s", f"http://127.0.0.1:{port}/bench"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    served = re.search(r"(\d+) requests in", out)
    return (float(rate.group(1)) if rate else 0.0), (int(served.group(1)) if served else 0)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        server, client, port, upstream = args.serve
        serve(server, client, int(port), int(upstream))
        return
    try:
        import aiohttp  # noqa: F401, PLC0415
    except ImportError:
        VARIANTS[:] = [v for v in VARIANTS if v[2] != "aiohttp"]
        print("aiohttp is not installed: its variant is skipped")
    rounds, seconds = (2, 2.0) if args.quick else (3, 5.0)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-gateway-stack-"))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        upstream = free_port()
        conf = nginx_conf(
            tmp,
            "upstream",
            1,
            f"server {{ listen 127.0.0.1:{upstream} backlog=4096; location / {{ "
            f'default_type text/plain; return 200 "hello from upstream\\n"; }} }}',
        )
        processes.append(
            subprocess.Popen([NGINX, "-c", str(conf), "-p", str(tmp)], start_new_session=True)
        )
        ports = {}
        pids = {}
        for name, server, client in VARIANTS:
            ports[name] = free_port()
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--serve",
                        server,
                        client,
                        str(ports[name]),
                        str(upstream),
                    ],
                    start_new_session=True,
                )
            )
            pids[name] = processes[-1].pid
        for port in [upstream, *ports.values()]:
            wait_port(port)
        best: dict[str, float] = {}
        #: CPU of the proxy's process per request served (the minimum over the rounds):
        #: steadier than requests/s on a shared machine.
        cpu: dict[str, float] = {}
        for port in ports.values():
            wrk_run(port, 1)
        for round_ in range(rounds):
            order = list(ports) if round_ % 2 == 0 else list(reversed(ports))
            for name in order:
                before = cpu_seconds(pids[name])
                rps, served = wrk_run(ports[name], seconds)
                used = (cpu_seconds(pids[name]) - before) / max(served, 1) * 1e6
                print(
                    f"round {round_ + 1} {name:26} {rps:>10,.0f} req/s {used:7.1f} us CPU/request"
                )
                best[name] = max(best.get(name, 0.0), rps)
                cpu[name] = min(cpu.get(name, float("inf")), used)
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            process.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    chosen = best["atoll-server+atoll-pool"]
    cases = {
        f"{name}-vs-chosen": {
            "atoll": round(chosen),
            "peer": round(rps),
            "unit": "req/s",
            "ratio": round(chosen / rps, 2),
        }
        for name, rps in best.items()
        if name != "atoll-server+atoll-pool"
    }
    cases["chosen-cpu-per-request"] = {
        "atoll": round(cpu["atoll-server+atoll-pool"], 1),
        "peer": round(cpu["uvicorn-asgi+atoll-pool"], 1),
        "unit": "us of CPU per request, the proxy's process (reported: uvicorn as peer)",
        "ratio": round(cpu["uvicorn-asgi+atoll-pool"] / cpu["atoll-server+atoll-pool"], 2),
    }
    print(json.dumps({"benchmark": "gateway_stack", "cases": cases}))


if __name__ == "__main__":
    main()
