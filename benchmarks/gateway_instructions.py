"""Instructions per request in the gateway, counted by callgrind: a figure noise can't move.

    .venv/bin/python benchmarks/gateway_instructions.py [--quick] [--variants a,b,...]

Wall-clock figures for the gateway move by tens of percent with the host's state (see
``docs/benchmarks.md``), too much to see a change of a few percent. This script runs one
gateway worker under ``valgrind --tool=callgrind`` in front of an nginx upstream (the
same one ``benchmarks/gateway.py`` uses). It warms it up, zeroes the counters with
``callgrind_control -z``, sends requests with ``wrk -c4``, dumps the counters, and
divides the instructions by the requests served. It counts user-space instructions
only: system calls and cache misses are not in the figure. The gateway keeps Python's
own allocator (pymalloc), as it runs in production; until 2026-11-28 this script ran it
with ``PYTHONMALLOC=malloc``, which counted every small allocation at glibc's price
(figures from before then are about 9% higher for the plain route).

Variants: ``plain`` (a prefix route), ``jwt`` (HS256 bearer token, cached after its first
use), ``rate-limit`` (a per-client limit far above the load), ``breaker`` (a circuit
breaker on the upstream), ``secured`` (all three, as ``benchmarks/gateway.py`` runs it).

Needs Debian's ``valgrind``, ``nginx-light`` and ``wrk``. Last line, JSON: the case
``secured-vs-plain-instructions`` (atoll = secured, peer = plain, ratio = plain /
secured, higher is better; reported, the target itself is on requests/s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gateway
from gateway import SECRET, bench_token, free_port, wait_port, wrk

VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    # name: (jwt, rate limit, breaker)
    "plain": (False, False, False),
    "jwt": (True, False, False),
    "rate-limit": (False, True, False),
    "breaker": (False, False, True),
    "secured": (True, True, True),
}


def config(upstream: int, port: int, jwt: bool, limit: bool, breaker: bool) -> str:
    out = f"server: {{host: 127.0.0.1, port: {port}, access_log: false}}\nadmin: {{port: 0}}\n"
    if jwt:
        out += (
            "auth:\n  jwt: {algorithms: [HS256],"
            f' hs256_secret: "{SECRET}", issuer: bench, audience: bench}}\n'
        )
    out += f'upstreams:\n  backend:\n    targets: ["127.0.0.1:{upstream}"]\n'
    if breaker:
        out += (
            "    policy:\n      breaker:"
            " {window_size: 100, minimum_calls: 20, failure_rate: 0.5, wait: 5}\n"
        )
    out += "routes:\n  - name: r\n    match: {prefix: /}\n    upstream: backend\n"
    if jwt:
        out += "    auth: jwt\n    scopes: [bench]\n"
    if limit:
        out += "    rate_limit: {rate: 10000000, burst: 10000000, per: client}\n"
    return out


def count(tmp: Path, upstream: int, name: str, seconds: float, token: str) -> dict[str, float]:
    jwt, limit, breaker = VARIANTS[name]
    port = free_port()
    path = tmp / f"{name}.yaml"
    path.write_text(config(upstream, port, jwt, limit, breaker))
    out = tmp / f"callgrind.{name}"
    process = subprocess.Popen(
        [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}.%p",
            sys.executable,
            "-m",
            "atoll.gateway",
            "--config",
            str(path),
            "--workers",
            "1",
        ],
        env={**os.environ, "ATOLL_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, timeout=300)
        headers = [f"Authorization: Bearer {token}"] if jwt else []
        wrk(port, 3, 4, headers, latency=False)  # warm up: imports, pools, the token cache
        subprocess.run(
            ["callgrind_control", "-z", str(process.pid)], check=True, capture_output=True
        )
        result = wrk(port, seconds, 4, headers, latency=False)
        subprocess.run(
            ["callgrind_control", "-d", str(process.pid)], check=True, capture_output=True
        )
    finally:
        process.kill()
        process.wait()
    dumps = sorted(tmp.glob(f"callgrind.{name}.*"), key=lambda p: p.stat().st_mtime)
    instructions = None
    for dump in dumps:  # the dump asked for, not the one written at exit
        text = dump.read_text(errors="replace")
        if "Trigger: Program termination" in text[:4000]:
            continue
        found = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
        if found:
            instructions = int(found.group(1))
    if instructions is None or not result["requests"] or result["non_2xx"]:
        raise RuntimeError(f"{name}: no usable count ({result})")
    return {"requests": result["requests"], "per_request": instructions / result["requests"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="plain and secured, shorter")
    parser.add_argument("--variants", help="comma-separated, from: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control", gateway.NGINX, gateway.WRK):
        if shutil.which(tool) is None and not Path(tool).exists():
            sys.exit(f"{tool} is needed (apt-get install valgrind nginx-light wrk)")
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    if args.quick and not args.variants:
        names = ["plain", "secured"]
    for name in names:
        if name not in VARIANTS:
            sys.exit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    seconds = 4.0 if args.quick else 8.0
    tmp = Path(tempfile.mkdtemp(prefix="atoll-gateway-instructions-"))
    servers = gateway.Servers(tmp, 1)
    token = bench_token()
    counts: dict[str, dict[str, float]] = {}
    try:
        upstream = servers.ports["upstream"] = free_port()
        conf = gateway.nginx_conf(
            tmp,
            "upstream",
            1,
            f"server {{ listen 127.0.0.1:{upstream} backlog=4096; location / {{ "
            f'default_type text/plain; return 200 "hello from upstream\\n"; }} }}',
        )
        servers.spawn([gateway.NGINX, "-c", str(conf), "-p", str(tmp)], log="upstream")
        wait_port(upstream)
        for name in names:
            counts[name] = count(tmp, upstream, name, seconds, token)
            print(
                f"{name:12} {counts[name]['per_request']:>10,.0f} instructions/request"
                f" ({counts[name]['requests']:,.0f} requests)",
                flush=True,
            )
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    cases = {}
    if "plain" in counts and "secured" in counts:
        plain, secured = counts["plain"]["per_request"], counts["secured"]["per_request"]
        cases["secured-vs-plain-instructions"] = {
            "atoll": round(secured),
            "peer": round(plain),
            "unit": "instructions per request (secured vs plain; reported)",
            "ratio": round(plain / secured, 3),
        }
    print(json.dumps({"benchmark": "gateway_instructions", "cases": cases}))


if __name__ == "__main__":
    main()
