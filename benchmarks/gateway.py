"""The atoll gateway against nginx and a FastAPI + httpx proxy, in one run.

Setup (everything on 127.0.0.1, started and stopped by this script):

* upstream: nginx (Debian's /usr/sbin/nginx, 1 worker) returning a fixed 20-byte body,
  so that it is not the bottleneck;
* ``nginx``: nginx as a reverse proxy to it (``--workers`` worker processes, upstream
  keep-alive pool of 64 connections, HTTP/1.1 to the upstream, access log off);
* ``plain``: ``python -m atoll.gateway`` with one prefix route to the upstream
  (``--workers`` processes with SO_REUSEPORT, access log off);
* ``secured``: the same gateway with a route that checks an HS256 JWT, takes a permit
  from a per-client rate limiter (a limit far above the load, so every request does the
  work and none is refused) and goes through a circuit breaker on the upstream;
* ``fastapi``: the usual hand-written Python gateway: FastAPI with one catch-all route
  forwarding through a shared ``httpx.AsyncClient``, under uvicorn with httptools and
  uvloop (``--workers`` processes).

Measurements, with Debian's ``wrk`` (no constant-rate mode, so no wrk2-style latency at
a fixed rate): **throughput** is ``wrk -t1 -c64`` for ``--seconds`` against each server
in turn; the cases alternate and each keeps its best of ``--rounds`` rounds (the machine
is shared, so noise only lowers numbers). **Latency** is wrk's ``--latency``
distribution (p50, p99) at a moderate load of 8 connections, once per case, and again
at a paced rate of about 1,000 requests/s: 10 connections, each waiting 10 ms (a wrk
script's ``delay()``) between an answer and its next request. That is the nearest
Debian's wrk comes to a fixed rate. At a load this far below every contender's capacity
the pacing holds and little queueing hides in the figures (coordinated omission); the
achieved rate is printed beside them.

Ratios: ``plain-vs-nginx`` = plain / nginx requests/s (target 0.5),
``plain-vs-fastapi-httpx`` = plain / fastapi (target 5), ``secured-vs-plain`` =
secured / plain (target 0.75, i.e. at most 25 % lost to JWT + rate limit + breaker).

Usage: ``.venv/bin/python benchmarks/gateway.py [--quick] [--workers N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

NGINX = "/usr/sbin/nginx"
WRK = "/usr/bin/wrk"
SECRET = "benchmark-secret-benchmark-secret-0123"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def nginx_conf(tmp: Path, name: str, workers: int, body: str) -> Path:
    temp = tmp / f"{name}-temp"
    temp.mkdir()
    conf = tmp / f"{name}.conf"
    conf.write_text(
        textwrap.dedent(
            f"""
            worker_processes {workers};
            daemon off;
            pid {tmp}/{name}.pid;
            error_log {tmp}/{name}-error.log warn;
            events {{ worker_connections 4096; }}
            http {{
              access_log off;
              client_body_temp_path {temp}/body;
              proxy_temp_path {temp}/proxy;
              fastcgi_temp_path {temp}/fastcgi;
              uwsgi_temp_path {temp}/uwsgi;
              scgi_temp_path {temp}/scgi;
              keepalive_requests 10000000;
              {body}
            }}
            """
        )
    )
    return conf


FASTAPI_APP = """
import os
import socket
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import Response

UPSTREAM = os.environ["BENCH_UPSTREAM"]
HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "upgrade"}
app = FastAPI()
# TCP_NODELAY: without it httpx's writes meet delayed ACKs and every request waits ~40 ms,
# which would make the peer look far worse than it is.
client = httpx.AsyncClient(
    base_url=UPSTREAM,
    transport=httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=100),
        socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
    ),
)


@app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"])
async def proxy(path: str, request: Request) -> Response:
    headers = {k: v for k, v in request.headers.items() if k not in HOP}
    upstream = await client.request(
        request.method, "/" + path, params=request.query_params, headers=headers,
        content=await request.body(),
    )
    out = {k: v for k, v in upstream.headers.items() if k not in HOP}
    return Response(upstream.content, status_code=upstream.status_code, headers=out)
"""


_TICK = os.sysconf("SC_CLK_TCK")


def session_cpu(session: int) -> float:
    """CPU seconds used so far by every process of a session (a server and its workers)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            if int(fields[3]) == session:  # field 6 of stat: the session id
                total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


class Servers:
    def __init__(self, tmp: Path, workers: int) -> None:
        self.tmp = tmp
        self.workers = workers
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ports: dict[str, int] = {}
        self.sessions: dict[str, int] = {}

    def spawn(self, argv: list[str], env: dict[str, str] | None = None, log: str = "log") -> None:
        out = (self.tmp / f"{log}.out").open("wb")
        process = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        self.processes.append(process)
        self.sessions[log] = process.pid

    def start(self) -> None:
        up = self.ports["upstream"] = free_port()
        conf = nginx_conf(
            self.tmp,
            "upstream",
            1,
            f"server {{ listen 127.0.0.1:{up} backlog=4096; location / {{ "
            f'default_type text/plain; return 200 "hello from upstream\\n"; }} }}',
        )
        self.spawn([NGINX, "-c", str(conf), "-p", str(self.tmp)], log="upstream")
        px = self.ports["nginx"] = free_port()
        conf = nginx_conf(
            self.tmp,
            "proxy",
            self.workers,
            f"upstream backend {{ server 127.0.0.1:{up}; keepalive 64; }} "
            f"server {{ listen 127.0.0.1:{px} backlog=4096; location / {{ "
            f"proxy_pass http://backend; "
            f'proxy_http_version 1.1; proxy_set_header Connection ""; }} }}',
        )
        self.spawn([NGINX, "-c", str(conf), "-p", str(self.tmp)], log="proxy")
        for name, secured in (("plain", False), ("secured", True)):
            port = self.ports[name] = free_port()
            config = self.tmp / f"{name}.yaml"
            config.write_text(gateway_config(up, port, secured))
            self.spawn(
                [
                    sys.executable,
                    "-m",
                    "atoll.gateway",
                    "--config",
                    str(config),
                    "--workers",
                    str(self.workers),
                ],
                env={"ATOLL_LOG_FORMAT": "json", "ATOLL_LOG_LEVEL": "WARNING"},
                log=name,
            )
        fa = self.ports["fastapi"] = free_port()
        (self.tmp / "fastapi_proxy.py").write_text(FASTAPI_APP)
        self.spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "fastapi_proxy:app",
                "--app-dir",
                str(self.tmp),
                "--port",
                str(fa),
                "--workers",
                str(self.workers),
                "--no-access-log",
                "--log-level",
                "warning",
                "--http",
                "httptools",
                "--loop",
                "uvloop",
            ],
            env={"BENCH_UPSTREAM": f"http://127.0.0.1:{up}"},
            log="fastapi",
        )
        for port in self.ports.values():
            wait_port(port)

    def stop(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def gateway_config(upstream: int, port: int, secured: bool) -> str:
    head = f"""
server: {{host: 127.0.0.1, port: {port}, access_log: false}}
admin: {{port: 0}}
"""
    if not secured:
        return (
            head
            + f"""
upstreams:
  backend: {{targets: ["127.0.0.1:{upstream}"]}}
routes:
  - {{name: plain, match: {{prefix: /}}, upstream: backend}}
"""
        )
    return (
        head
        + f"""
auth:
  jwt: {{algorithms: [HS256], hs256_secret: "{SECRET}", issuer: bench, audience: bench}}
upstreams:
  backend:
    targets: ["127.0.0.1:{upstream}"]
    policy:
      breaker: {{window_size: 100, minimum_calls: 20, failure_rate: 0.5, wait: 5}}
routes:
  - name: secured
    match: {{prefix: /}}
    upstream: backend
    auth: jwt
    scopes: [bench]
    rate_limit: {{rate: 10000000, burst: 10000000, per: client}}
"""
    )


def bench_token() -> str:
    from atoll.gateway import mint_token  # noqa: PLC0415 - keeps --help independent of atoll

    return mint_token(
        subject="bench-client",
        scopes=["bench"],
        ttl=3600,
        secret=SECRET.encode(),
        issuer="bench",
        audience="bench",
    )


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if match is None:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(  # noqa: PLR0917 - wrk's own options, as wrk takes them
    port: int,
    seconds: float,
    connections: int,
    headers: list[str],
    latency: bool,
    script: Path | None = None,
) -> dict[str, float]:
    argv = [WRK, "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "5s"]
    for header in headers:
        argv += ["-H", header]
    if latency:
        argv.append("--latency")
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}/bench")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    result: dict[str, float] = {}
    total = re.search(r"(\d+) requests in", out)
    result["requests"] = float(total.group(1)) if total else 0.0
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    result["rps"] = float(match.group(1)) if match else 0.0
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    result["non_2xx"] = float(errors.group(1)) if errors else 0.0
    if socket_errors:
        result["socket_errors"] = 1.0
    if latency:
        for pct in ("50", "99"):
            found = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", out, re.MULTILINE)
            if found:
                result[f"p{pct}_ms"] = _ms(found.group(1))
    return result


#: The paced latency run: PACED_CONNECTIONS connections, each waiting PACED_DELAY_MS
#: between its answer and its next request, offer about 1,000 requests/s, a load every
#: contender holds (FastAPI + httpx tops out near 1,200 here).
PACED_CONNECTIONS = 10
PACED_DELAY_MS = 10


def paced_script(tmp: Path) -> Path:
    """A wrk script that waits PACED_DELAY_MS before each request of a connection."""
    script = tmp / "paced.lua"
    script.write_text(f"function delay()\n  return {PACED_DELAY_MS}\nend\n")
    return script


def latencies(port: int, headers: list[str], seconds: float, tmp: Path) -> dict[str, float]:
    """p50 and p99 at 8 connections, and at about 1,000 requests/s (paced)."""
    out: dict[str, float] = {}
    result = wrk(port, seconds, 8, headers, latency=True)
    out["p50_ms"] = result.get("p50_ms", float("nan"))
    out["p99_ms"] = result.get("p99_ms", float("nan"))
    out["latency_rps"] = result["rps"]
    paced = paced_script(tmp)
    result = wrk(port, seconds, PACED_CONNECTIONS, headers, latency=True, script=paced)
    out["paced_p50_ms"] = result.get("p50_ms", float("nan"))
    out["paced_p99_ms"] = result.get("p99_ms", float("nan"))
    out["paced_rps"] = result["rps"]
    return out


def print_paced(best: dict[str, dict[str, float]]) -> None:
    print()
    print(f"{'paced':10} {'req/s offered ~1,000':>20} {'p50 ms':>10} {'p99 ms':>10}")
    for name, r in best.items():
        print(
            f"{name:10} {r['paced_rps']:>20,.0f} "
            f"{r['paced_p50_ms']:>10.3f} {r['paced_p99_ms']:>10.3f}"
        )


def paced_cases(best: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """The paced latencies of the plain route against nginx and FastAPI + httpx."""
    out: dict[str, dict[str, Any]] = {}
    for pct in ("50", "99"):
        for other in ("nginx", "fastapi"):
            atoll, peer = best["plain"][f"paced_p{pct}_ms"], best[other][f"paced_p{pct}_ms"]
            name = "nginx" if other == "nginx" else "fastapi-httpx"
            out[f"paced-latency-p{pct}-plain-vs-{name}"] = {
                "atoll": atoll,
                "peer": peer,
                "unit": (
                    f"ms at about 1,000 req/s ({PACED_CONNECTIONS} connections paced"
                    f" {PACED_DELAY_MS} ms apart; plain {best['plain']['paced_rps']:,.0f},"
                    f" {other} {best[other]['paced_rps']:,.0f} req/s; reported)"
                ),
                "ratio": round(peer / atoll, 3),
            }
    return out


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short run (under 60 s)")
    parser.add_argument("--workers", type=int, default=2, help="processes per proxy (2 cores)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 4)
    seconds = args.seconds or (3.0 if args.quick else 8.0)
    latency_seconds = 2.0 if args.quick else 6.0
    for tool in (NGINX, WRK):
        if not Path(tool).exists():
            sys.exit(f"{tool} is needed (apt-get install nginx-light wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="atoll-gateway-bench-"))
    servers = Servers(tmp, args.workers)
    token = bench_token()
    cases = {
        "nginx": [],
        "plain": [],
        "secured": [f"Authorization: Bearer {token}"],
        "fastapi": [],
    }
    print(f"load average before: {load_average()} (2 cores, shared)")
    best: dict[str, dict[str, float]] = {}
    try:
        servers.start()
        for name, headers in cases.items():  # warm up: pools, JIT-free but caches
            wrk(servers.ports[name], 1, 16, headers, latency=False)
        for round_ in range(rounds):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in order:
                session = servers.sessions["proxy" if name == "nginx" else name]
                cpu_before = session_cpu(session)
                result = wrk(servers.ports[name], seconds, 64, cases[name], latency=False)
                cpu = session_cpu(session) - cpu_before
                us_per_request = cpu / max(1.0, result["requests"]) * 1e6
                cpu_best = best.get(name, {}).get("cpu_us", float("inf"))
                result["cpu_us"] = min(us_per_request, cpu_best)
                if result["non_2xx"] or result.get("socket_errors"):
                    print(f"  warning: {name} had errors: {result}")
                print(
                    f"round {round_ + 1} {name:8} {result['rps']:>10,.0f} req/s "
                    f"{us_per_request:>8.1f} us CPU/request"
                )
                if result["rps"] > best.get(name, {}).get("rps", 0.0):
                    best[name] = result
                best[name]["cpu_us"] = result["cpu_us"]
        for name, headers in cases.items():
            best[name].update(latencies(servers.ports[name], headers, latency_seconds, tmp))
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {load_average()}")
    print()
    print(
        f"{'server':10} {'req/s (best, c=64)':>20} {'CPU us/req (min)':>17} "
        f"{'p50 ms (c=8)':>14} {'p99 ms (c=8)':>14}"
    )
    for name in cases:
        r = best[name]
        print(
            f"{name:10} {r['rps']:>20,.0f} {r['cpu_us']:>17.1f} "
            f"{r['p50_ms']:>14.3f} {r['p99_ms']:>14.3f}"
        )
    print_paced(best)
    plain, nginx, fastapi, secured = (
        best["plain"]["rps"],
        best["nginx"]["rps"],
        best["fastapi"]["rps"],
        best["secured"]["rps"],
    )
    result_cases = {
        "plain-vs-nginx": {
            "atoll": round(plain),
            "peer": round(nginx),
            "unit": "req/s",
            "ratio": round(plain / nginx, 3),
            "target": 0.5,
        },
        "plain-vs-fastapi-httpx": {
            "atoll": round(plain),
            "peer": round(fastapi),
            "unit": "req/s",
            "ratio": round(plain / fastapi, 3),
            "target": 5.0,
        },
        "secured-vs-plain": {
            "atoll": round(secured),
            "peer": round(plain),
            "unit": "req/s",
            "ratio": round(secured / plain, 3),
            "target": 0.75,
        },
        "cpu-per-request-plain-vs-nginx": {
            "atoll": round(best["plain"]["cpu_us"], 1),
            "peer": round(best["nginx"]["cpu_us"], 1),
            "unit": "CPU us per request, all processes of the proxy (reported)",
            "ratio": round(best["nginx"]["cpu_us"] / best["plain"]["cpu_us"], 3),
        },
        "cpu-per-request-secured-vs-plain": {
            "atoll": round(best["secured"]["cpu_us"], 1),
            "peer": round(best["plain"]["cpu_us"], 1),
            "unit": "CPU us per request (reported)",
            "ratio": round(best["plain"]["cpu_us"] / best["secured"]["cpu_us"], 3),
        },
        "latency-p50-plain-vs-nginx": {
            "atoll": best["plain"]["p50_ms"],
            "peer": best["nginx"]["p50_ms"],
            "unit": "ms at 8 connections (reported)",
            "ratio": round(best["nginx"]["p50_ms"] / best["plain"]["p50_ms"], 3),
        },
        "latency-p99-plain-vs-nginx": {
            "atoll": best["plain"]["p99_ms"],
            "peer": best["nginx"]["p99_ms"],
            "unit": "ms at 8 connections (reported)",
            "ratio": round(best["nginx"]["p99_ms"] / best["plain"]["p99_ms"], 3),
        },
    }
    result_cases.update(paced_cases(best))
    print(json.dumps({"benchmark": "gateway", "cases": result_cases}))


if __name__ == "__main__":
    main()
