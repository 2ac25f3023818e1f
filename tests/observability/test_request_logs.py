"""Log lines written while a service serves an HTTP request carry the request's
X-Request-ID (which the gateway sets) as their correlation_id."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import structlog

from atoll import Service
from atoll.observability import configure_logging
from support import serve


def records(err: str) -> dict[str, dict[str, Any]]:
    """The JSON log lines in ``err``, by event."""
    found = {}
    for line in err.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            found[record["event"]] = record
    return found


async def test_log_lines_of_an_http_request_carry_its_request_id(capsys):
    service = Service("shop")

    @service.http.get("/orders/{n}")
    async def order(n: int) -> dict[str, int]:
        logging.getLogger("test.shop").info("stdlib %s", n)
        structlog.get_logger("test.shop").info(f"structlog {n}")
        await asyncio.sleep(0.01)  # the other requests run meanwhile
        return {"n": n}

    @service.http.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    configure_logging(service="shop", fmt="json", level="INFO")
    url, stop = await serve(service.http)
    try:
        async with httpx.AsyncClient(base_url=url) as client:
            responses = await asyncio.gather(
                client.get("/orders/1", headers={"X-Request-ID": "req-1"}),
                client.get("/orders/2", headers={"x-request-id": "req-2"}),
                client.get("/orders/3"),
                client.get("/orders/4", headers={"X-Request-ID": "forged\tid"}),
                client.get("/boom", headers={"X-Request-ID": "req-5"}),
            )
    finally:
        await stop()
        logging.getLogger().handlers.clear()
        structlog.reset_defaults()
    assert [r.status_code for r in responses] == [200, 200, 200, 200, 500]
    logged = records(capsys.readouterr().err)
    assert logged["stdlib 1"]["correlation_id"] == "req-1"
    assert logged["structlog 1"]["correlation_id"] == "req-1"
    assert logged["stdlib 2"]["correlation_id"] == "req-2"
    assert logged["structlog 2"]["correlation_id"] == "req-2"
    # No id, or one that is not a sane id: none made up, nothing copied.
    assert "correlation_id" not in logged["stdlib 3"]
    assert "correlation_id" not in logged["structlog 4"]
    # The handler for unexpected errors runs outside the middleware; it logs with it too.
    assert logged["GET /boom failed"]["correlation_id"] == "req-5"
    assert logged["GET /boom failed"]["service"] == "shop"
    assert "message_id" not in logged["stdlib 1"]
