"""End to end over real HTTP: a caller's deadline travels through one service to the next."""

import asyncio
import contextlib

import httpx
import pytest
from fastapi import FastAPI, Request
from resilience_helpers import serve_app

from atoll.resilience import (
    DEADLINE_HEADER,
    DeadlineExceededError,
    PropagationMiddleware,
    ServiceClient,
    current_deadline,
)

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def inventory_app(hits, release):
    app = FastAPI()
    app.add_middleware(PropagationMiddleware)

    @app.get("/echo")
    async def echo(request: Request):
        hits["echo"] += 1
        deadline = current_deadline()
        return {
            "header": request.headers.get(DEADLINE_HEADER),
            "traceparent": request.headers.get("traceparent"),
            "remaining": None if deadline is None else deadline.remaining(),
        }

    @app.get("/slow")
    async def slow():
        hits["slow"] += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), 5)
        return {"late": True}

    return app


def orders_app(client, hits):
    app = FastAPI()
    app.add_middleware(PropagationMiddleware)

    @app.get("/checkout")
    async def checkout(slow: bool = True):
        hits["checkout"] += 1
        loop = asyncio.get_running_loop()
        seen = (await client.get("inventory", "/echo")).json()
        if not slow:
            return {"seen": seen}
        started = loop.time()
        try:
            await client.get("inventory", "/slow")
            slow = "answered"
        except DeadlineExceededError:
            slow = "deadline"
        slow_took = loop.time() - started
        started = loop.time()
        try:
            await client.get("inventory", "/echo")
            after = "answered"
        except DeadlineExceededError:
            after = "failed fast"
        return {
            "seen": seen,
            "slow": slow,
            "slow_took": slow_took,
            "after": after,
            "after_took": loop.time() - started,
        }

    return app


@pytest.fixture
async def system():
    hits = {"echo": 0, "slow": 0, "checkout": 0}
    release = asyncio.Event()
    inventory_url, stop_inventory = await serve_app(inventory_app(hits, release))
    client = ServiceClient({"inventory": inventory_url})
    orders_url, stop_orders = await serve_app(orders_app(client, hits))
    try:
        yield orders_url, hits
    finally:
        release.set()
        await client.aclose()
        await stop_orders()
        await stop_inventory()


async def test_deadline_propagates_and_downstream_calls_never_wait_past_it(system):
    orders_url, hits = system
    async with httpx.AsyncClient(base_url=orders_url) as http:
        response = await http.get(
            "/checkout", headers={DEADLINE_HEADER: "800", "traceparent": TRACEPARENT}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    # The downstream service received the caller's deadline, reduced by the time spent.
    assert 0 < int(body["seen"]["header"]) <= 800
    assert 0 < body["seen"]["remaining"] <= 0.8
    assert body["seen"]["traceparent"] == TRACEPARENT
    # The slow call (5 s downstream) was cut at the deadline, not waited for.
    assert body["slow"] == "deadline"
    assert body["slow_took"] < 1.0
    # Past the deadline, the next call failed at once without being sent.
    assert body["after"] == "failed fast"
    assert body["after_took"] < 0.05
    assert hits == {"echo": 1, "slow": 1, "checkout": 1}


async def test_a_request_arriving_after_its_deadline_is_not_handled(system):
    orders_url, hits = system
    async with httpx.AsyncClient(base_url=orders_url) as http:
        response = await http.get("/checkout", headers={DEADLINE_HEADER: "0"})
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"
    assert "deadline had passed" in response.json()["detail"]
    assert hits["checkout"] == 0


async def test_a_malformed_deadline_is_ignored_and_local_timeouts_apply(system):
    orders_url, _ = system
    async with httpx.AsyncClient(base_url=orders_url) as http:
        response = await http.get(
            "/checkout", params={"slow": "false"}, headers={DEADLINE_HEADER: "not-a-number"}
        )
    body = response.json()
    # No deadline came in; the default policy's 3 s attempt timeout is what travels on.
    assert 2000 < int(body["seen"]["header"]) <= 3000
