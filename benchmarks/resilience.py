"""Overhead per call of atoll's resilience policies against their peers, in one run.

Every case wraps the same coroutine function (``async def op(): return 1``, which never
suspends) with the library's own decorator and awaits it in a tight loop; the bare
``await op()`` is the limit. Reported per case: the raw time per call, and the overhead
(raw time minus the bare await of the same run), which is what the ratios compare
(ratio = peer overhead / atoll overhead, higher is better for atoll).

* Breakers, closed state, successful calls: atoll (count window; also with slow-call
  detection and with a time window), aiobreaker, purgatory, circuitbreaker and pybreaker.
  pybreaker's ``call_async`` needs Tornado, so it runs through its ``calling()``
  context manager around the await: the way to use it from asyncio without Tornado.
* Retries, no retry taken: atoll ``Retry``, tenacity (``stop_after_attempt(3)``,
  ``wait_exponential_jitter``), stamina (``attempts=3``).
* atoll's pipeline: timeout + retry + breaker + bulkhead (and with a retry budget).

Every 100 calls the loop yields once (``await asyncio.sleep(0)``), in every case and in
the bare baseline alike, as a service's event loop turns between requests: asyncio only
purges cancelled timer handles when its loop runs, so a loop that never turns makes any
timer-based timeout look slower and slower as the run goes on.

Rounds interleave the cases, so machine noise hits them alike; each figure is the best
round (the usual way to measure a cost rather than the machine's other load).

Usage: ``python benchmarks/resilience.py [--quick]``; the last line is the JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiobreaker
import circuitbreaker
import purgatory
import pybreaker
import stamina
import tenacity

from atoll.resilience import Bulkhead, CircuitBreaker, Pipeline, Retry, RetryBudget, Timeout

Case = Callable[[], Awaitable[Any]]


async def op() -> int:
    return 1


def atoll_cases() -> dict[str, Case]:
    pipeline = Pipeline(
        timeout=Timeout(10.0),
        retry=Retry(max_attempts=3),
        breaker=CircuitBreaker("bench-pipeline"),
        bulkhead=Bulkhead("bench-pipeline", max_concurrent=100),
    )
    budgeted = Pipeline(
        timeout=Timeout(10.0),
        retry=Retry(max_attempts=3, budget=RetryBudget()),
        breaker=CircuitBreaker("bench-budgeted"),
        bulkhead=Bulkhead("bench-budgeted", max_concurrent=100),
    )
    return {
        "atoll breaker": CircuitBreaker("bench")(op),
        "atoll breaker, slow-call detection": CircuitBreaker("bench-slow", slow_call_duration=1.0)(
            op
        ),
        "atoll breaker, time window": CircuitBreaker("bench-time", window="time", window_size=60)(
            op
        ),
        "atoll retry": Retry(max_attempts=3)(op),
        "atoll pipeline": pipeline(op),
        "atoll pipeline, retry budget": budgeted(op),
    }


def peer_cases() -> dict[str, Case]:
    pb = pybreaker.CircuitBreaker()

    async def pybreaker_calling() -> int:
        with pb.calling():
            return await op()

    return {
        "aiobreaker": aiobreaker.CircuitBreaker()(op),
        "purgatory": purgatory.AsyncCircuitBreakerFactory()(circuit="bench")(op),
        "circuitbreaker": circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=30)(
            op
        ),
        "pybreaker (calling())": pybreaker_calling,
        "tenacity": tenacity.retry(
            stop=tenacity.stop_after_attempt(3), wait=tenacity.wait_exponential_jitter()
        )(op),
        "stamina": stamina.retry(on=Exception, attempts=3)(op),
    }


BREAKER_PEERS = ("aiobreaker", "purgatory", "circuitbreaker", "pybreaker (calling())")
ASYNC_BREAKER_PEERS = ("aiobreaker", "purgatory", "circuitbreaker")
RETRY_PEERS = ("tenacity", "stamina")


async def run(fn: Case, calls: int) -> float:
    """Nanoseconds per call of ``calls`` awaits of ``fn``, the loop turning every 100."""
    started = time.perf_counter_ns()
    for i in range(calls):
        await fn()
        if i % 100 == 0:
            await asyncio.sleep(0)
    return (time.perf_counter_ns() - started) / calls


async def measure(cases: dict[str, Case], calls: int, rounds: int) -> dict[str, float]:
    """Best-of-``rounds`` nanoseconds per call of each case.

    The bare await is measured again before every case, so the baseline that every
    overhead subtracts is the best of many samples (which, if anything, understates
    the lighter cases' advantage).
    """
    best = dict.fromkeys(cases, float("inf"))
    for fn in cases.values():  # warm up every path (and check it works)
        for _ in range(min(calls, 2000)):
            assert await fn() == 1
    bare = cases["bare await"]
    for _ in range(rounds):
        for name, fn in cases.items():
            gc.collect()
            best["bare await"] = min(best["bare await"], await run(bare, calls))
            best[name] = min(best[name], await run(fn, calls))
    return best


def case(
    atoll: float, peer: float, peer_name: str, raw: dict[str, float], atoll_name: str
) -> dict[str, Any]:
    return {
        "atoll": round(atoll, 1),
        "peer": round(peer, 1),
        "unit": "ns/call overhead (time per call minus the bare await)",
        "ratio": round(peer / atoll, 2),
        "peer_name": peer_name,
        "atoll_raw": round(raw[atoll_name], 1),
        "peer_raw": round(raw[peer_name], 1),
        "bare_raw": round(raw["bare await"], 1),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (under a minute)")
    args = parser.parse_args()
    calls, rounds = (20_000, 5) if args.quick else (100_000, 9)

    cases: dict[str, Case] = {"bare await": op, **atoll_cases(), **peer_cases()}
    raw = await measure(cases, calls, rounds)
    bare = raw["bare await"]
    overhead = {name: max(raw[name] - bare, 1.0) for name in raw}

    print(f"python {platform.python_version()} on {platform.machine()}, asyncio default loop")
    print(f"{calls} calls x {rounds} rounds per case, best round; overhead = raw - bare await")
    print("the loop yields once every 100 calls in every case")
    print(f"{'case':40s} {'raw ns/call':>12s} {'overhead':>10s}")
    for name, value in raw.items():
        print(f"{name:40s} {value:12.1f} {overhead[name]:10.1f}")

    fastest = min(ASYNC_BREAKER_PEERS, key=overhead.__getitem__)
    fastest_any = min(BREAKER_PEERS, key=overhead.__getitem__)
    slowest = max((*BREAKER_PEERS, *RETRY_PEERS), key=overhead.__getitem__)
    summary: dict[str, Any] = {
        "breaker-vs-fastest-async-peer": case(
            overhead["atoll breaker"], overhead[fastest], fastest, raw, "atoll breaker"
        ),
        "pipeline-vs-slowest-peer": case(
            overhead["atoll pipeline"], overhead[slowest], slowest, raw, "atoll pipeline"
        ),
        "breaker-vs-fastest-peer-incl-pybreaker": case(
            overhead["atoll breaker"], overhead[fastest_any], fastest_any, raw, "atoll breaker"
        ),
        "breaker-slow-calls-vs-fastest-async-peer": case(
            overhead["atoll breaker, slow-call detection"],
            overhead[fastest],
            fastest,
            raw,
            "atoll breaker, slow-call detection",
        ),
        "breaker-time-window-vs-fastest-async-peer": case(
            overhead["atoll breaker, time window"],
            overhead[fastest],
            fastest,
            raw,
            "atoll breaker, time window",
        ),
        "pipeline-with-budget-vs-slowest-peer": case(
            overhead["atoll pipeline, retry budget"],
            overhead[slowest],
            slowest,
            raw,
            "atoll pipeline, retry budget",
        ),
    }
    for peer in BREAKER_PEERS:
        key = "breaker-vs-" + peer.split(" ")[0]
        summary[key] = case(overhead["atoll breaker"], overhead[peer], peer, raw, "atoll breaker")
    for peer in RETRY_PEERS:
        summary[f"retry-vs-{peer}"] = case(
            overhead["atoll retry"], overhead[peer], peer, raw, "atoll retry"
        )
    ok = (
        summary["breaker-vs-fastest-async-peer"]["ratio"] >= 2
        and summary["pipeline-vs-slowest-peer"]["ratio"] > 1
    )
    print("targets met" if ok else "TARGETS NOT MET", file=sys.stderr)
    print(json.dumps({"benchmark": "resilience", "cases": summary}))


if __name__ == "__main__":
    asyncio.run(main())
