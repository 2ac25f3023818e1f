"""What the cyclic garbage collector costs a gateway worker, with and without atoll's settings.

    .venv/bin/python benchmarks/gc_settings.py [--quick]

One gateway worker (plain prefix route) in front of an nginx upstream, as in
``benchmarks/gateway.py``, under ``wrk -t1 -c64``. The worker runs with a
``gc.callbacks`` timer around every collection and writes, as it exits, how many
collections of each generation ran and how long they took. Three settings, alternating
over the rounds:

* ``defaults``: CPython's (no freeze, young threshold 700);
* ``freeze``: ``gc.collect(); gc.freeze()`` after start-up only;
* ``shipped``: :func:`atoll.service.freeze_startup_heap` (freeze, young threshold 10,000),
  what every gateway worker runs.

Last line, JSON: ``gc-us-per-request-shipped-vs-defaults`` (µs of collection per
request; ratio = the defaults' over the shipped, capped at 1,000 when the shipped
settings ran no collection) and ``cpu-per-request-shipped-vs-defaults`` (reported: the
worker's CPU per request, which the host's noise moves more than the difference).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import gateway
from gateway import free_port, wait_port, wrk

SETTINGS = ("defaults", "freeze", "shipped")

# The worker: atoll's gateway entry point, with the collector timed (from SIGUSR1 on) and
# the settings chosen by replacing freeze_startup_heap (imported by the entry point when
# it runs, so the replacement is what it calls).
_WORKER = """
import atexit, gc, json, signal, sys, time
import atoll._heap

setting, out = sys.argv[1], sys.argv[2]
if setting == "defaults":
    atoll._heap.freeze_startup_heap = lambda: None
elif setting == "freeze":
    def _freeze_only() -> None:
        gc.collect()
        gc.freeze()
    atoll._heap.freeze_startup_heap = _freeze_only
stats = {g: [0, 0.0] for g in range(3)}
started = [0.0]

def timer(phase, info):
    if phase == "start":
        started[0] = time.perf_counter()
    else:
        entry = stats[info["generation"]]
        entry[0] += 1
        entry[1] += time.perf_counter() - started[0]

gc.callbacks.append(timer)

def zero(signum, frame) -> None:  # the driver's signal: the measured window starts
    for entry in stats.values():
        entry[0], entry[1] = 0, 0.0

signal.signal(signal.SIGUSR1, zero)

@atexit.register
def report() -> None:
    with open(out, "w") as f:
        json.dump(stats, f)

from atoll.gateway._main import main
sys.argv = ["atoll.gateway", *sys.argv[3:]]
sys.exit(main())
"""


def run(tmp: Path, upstream: int, setting: str, seconds: float) -> dict[str, float]:
    port = free_port()
    config = tmp / "gateway.yaml"
    config.write_text(gateway.gateway_config(upstream, port, secured=False))
    out = tmp / f"gc-{setting}.json"
    command = [sys.executable, "-c", _WORKER, setting, str(out)]
    worker = subprocess.Popen(
        [*command, "--config", str(config), "--workers", "1"],
        env={**os.environ, "ATOLL_LOG_LEVEL": "WARNING"},
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # its own session: session_cpu() counts it alone
    )
    try:
        wait_port(port)
        wrk(port, 2, 64, [], latency=False)  # warm up: pools, caches
        worker.send_signal(signal.SIGUSR1)
        cpu = gateway.session_cpu(worker.pid)
        result = wrk(port, seconds, 64, [], latency=False)
        cpu = gateway.session_cpu(worker.pid) - cpu
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    stats = json.loads(out.read_text())
    requests = result["requests"]
    gc_seconds = sum(seconds for _, seconds in stats.values())
    return {
        "requests": requests,
        "rps": result["rps"],
        "gc_us_per_request": gc_seconds / requests * 1e6,
        "full_collections": stats["2"][0],
        "young_collections": stats["0"][0],
        "cpu_us_per_request": cpu / requests * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 5 s per setting")
    args = parser.parse_args()
    for tool in (gateway.NGINX, gateway.WRK):
        if shutil.which(tool) is None and not Path(tool).exists():
            sys.exit(f"{tool} is needed (apt-get install nginx-light wrk)")
    rounds, seconds = (1, 5.0) if args.quick else (3, 10.0)
    tmp = Path(tempfile.mkdtemp(prefix="atoll-gc-settings-"))
    servers = gateway.Servers(tmp, 1)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
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
        for r in range(rounds):
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                one = run(tmp, upstream, setting, seconds)
                results[setting].append(one)
                print(
                    f"round {r + 1} {setting:9} {one['gc_us_per_request']:6.2f} us GC/request"
                    f" (young {one['young_collections']:.0f}, full"
                    f" {one['full_collections']:.0f}), {one['cpu_us_per_request']:5.1f} us"
                    f" CPU/request, {one['rps']:,.0f} req/s",
                    flush=True,
                )
    finally:
        servers.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    gc_us = {s: min(r["gc_us_per_request"] for r in results[s]) for s in SETTINGS}
    cpu_us = {s: min(r["cpu_us_per_request"] for r in results[s]) for s in SETTINGS}
    for setting in SETTINGS:
        print(f"{setting:9} GC {gc_us[setting]:.2f} us/request, CPU {cpu_us[setting]:.1f} us")
    shipped, defaults = gc_us["shipped"], gc_us["defaults"]
    cases = {
        "gc-us-per-request-shipped-vs-defaults": {
            "atoll": round(shipped, 3),
            "peer": round(defaults, 3),
            "unit": "us of garbage collection per request (min of rounds)",
            "ratio": round(min(defaults / shipped, 1000.0), 1) if shipped else 1000.0,
            "freeze_only": round(gc_us["freeze"], 3),
        },
        "cpu-per-request-shipped-vs-defaults": {
            "atoll": round(cpu_us["shipped"], 1),
            "peer": round(cpu_us["defaults"], 1),
            "unit": "us of worker CPU per request, min of rounds (reported)",
            "ratio": round(cpu_us["defaults"] / cpu_us["shipped"], 3),
        },
    }
    print(json.dumps({"benchmark": "gc_settings", "cases": cases}))


if __name__ == "__main__":
    main()
