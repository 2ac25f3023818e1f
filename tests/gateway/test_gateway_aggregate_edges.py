"""Aggregation at its edges (a review's findings; each test failed before its fix): a
required part's failure answers at once; a part that redirects is not a null success."""

import asyncio
import time

import httpx
import uvicorn
from gateway_support import running_gateway, url
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_gateway_aggregate import details_config

from atoll.testing import wait_until
from support import free_port


async def test_a_required_parts_failure_answers_at_once(tmp_path, three):
    """The module says a required part failing "answers at once", but asyncio.wait waits
    for every part: the 404 comes only when the slowest optional part is done (here
    1.5 s; up to the route's deadline), and that call is never cancelled."""
    orders, payments, _shipping = three
    orders.status = 404
    payments.delay = 1.5
    async with (
        running_gateway(details_config(tmp_path, *three, timeout=2)) as gw,
        httpx.AsyncClient() as client,
    ):
        started = time.monotonic()
        r = await client.get(url(gw, "/orders/nope/details"))
        elapsed = time.monotonic() - started
        assert r.status_code == 404
        assert elapsed < 0.5, f"the 404 took {elapsed:.2f} s"


class Redirecting:
    """An upstream whose routes end in a slash: Starlette (FastAPI) answers the
    slash-less path with 307 and an empty body (redirect_slashes, on by default)."""

    async def start(self):
        async def order(request):
            return JSONResponse({"id": request.path_params["id"]})

        app = Starlette(routes=[Route("/orders/{id}/", order)])
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"
            )
        )
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)
        return self

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    async def stop(self):
        self.server.should_exit = True
        await self.task


async def test_a_required_part_that_redirects_is_not_a_null_success(tmp_path, three):
    _orders, payments, shipping = three
    orders = await Redirecting().start()
    try:
        async with (
            running_gateway(details_config(tmp_path, orders, payments, shipping)) as gw,
            httpx.AsyncClient() as client,
        ):
            r = await client.get(url(gw, "/orders/o-7/details"))
            body = r.json()
            # Today: 200 {"order": null, ...} with no "_partial": the order silently lost.
            assert r.status_code != 200 or body.get("order") is not None, (r.status_code, body)
    finally:
        await orders.stop()


async def test_a_client_that_leaves_an_aggregate_cancels_its_part_calls(tmp_path, three):
    """Nobody will read the answer: the parts' calls stop, as nginx stops a proxied call
    (proxy_ignore_client_abort off), instead of holding upstream connections until the
    route's deadline."""
    _orders, payments, _shipping = three
    payments.release.clear()  # the payment part never answers
    try:
        async with running_gateway(details_config(tmp_path, *three, timeout=30)) as gw:
            _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /orders/o-1/details HTTP/1.1\r\nHost: t\r\n\r\n")
            await writer.drain()
            await wait_until(lambda: len(payments.hits) == 1, what="the payment call")
            assert gw.in_flight == 1
            writer.close()
            await wait_until(lambda: gw.in_flight == 0, timeout=3, what="the aggregate to stop")
            assert gw.metrics.route("order-details").codes.get(499) == 1
    finally:
        payments.release.set()


async def test_a_parts_call_carries_no_conditions_or_ranges_of_the_clients(tmp_path, three):
    """A client's If-None-Match or Range is about its copy of the aggregate: passed to a
    part, it made the part answer 304 or 206, and the whole answer a failure."""
    orders, payments, shipping = three
    async with (
        running_gateway(details_config(tmp_path, *three)) as gw,
        httpx.AsyncClient() as client,
    ):
        r = await client.get(
            url(gw, "/orders/o-1/details"),
            headers={
                "if-none-match": '"v1"',
                "if-modified-since": "Sat, 28 Nov 2026 00:00:00 GMT",
                "range": "bytes=0-10",
                "accept": "text/html",
                "x-client-note": "kept",
            },
        )
        assert r.status_code == 200, r.text
    for stub in (orders, payments, shipping):
        received = stub.hits[-1]["headers"]
        assert "if-none-match" not in received
        assert "if-modified-since" not in received
        assert "range" not in received
        assert received["accept"] == "application/json"
        assert received["x-client-note"] == "kept"


async def test_an_http2_client_that_resets_an_aggregates_stream_cancels_its_calls(tmp_path, three):
    import h2.errors  # noqa: PLC0415 - this test alone speaks HTTP/2 by hand
    from test_gateway_http2 import RawH2  # noqa: PLC0415

    _orders, payments, _shipping = three
    payments.release.clear()
    try:
        async with running_gateway(details_config(tmp_path, *three, timeout=30)) as gw:
            client = await RawH2.open(gw.port)
            try:
                stream = await client.request("/orders/o-1/details")
                await wait_until(lambda: len(payments.hits) == 1, what="the payment call")
                client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
                await client.flush()
                await wait_until(lambda: gw.in_flight == 0, timeout=3, what="the aggregate")
                assert gw.metrics.route("order-details").codes.get(499) == 1
                assert not client.closed  # the connection's other streams go on
            finally:
                await client.close()
    finally:
        payments.release.set()
