"""A client leaving an aggregate: the parts' upstream calls must be let go."""

import asyncio

import httpx
from gateway_support import base_config, running_gateway, url, write_config
from test_gateway_proxy_edges import Scripted

from atoll.testing import wait_until


def agg_config(tmp_path, address, timeout=30):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"orders": {"targets": [address]}},
            [
                {
                    "name": "details",
                    "match": {"path": "/orders/{id}/details", "methods": ["GET"]},
                    "aggregate": {
                        "timeout": timeout,
                        "parts": {
                            "order": {
                                "upstream": "orders",
                                "path": "/orders/{id}",
                                "required": True,
                            }
                        },
                    },
                }
            ],
        ),
    )


def slow_part(head_sent=None):
    """An upstream that sends a part's head and the start of its body, then nothing; it
    returns when the gateway lets go of the connection."""

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"a":'
        )
        await writer.drain()
        if head_sent is not None:
            head_sent.set()
        await reader.read()

    return serve


async def assert_released(gw, up):
    """The part's upstream connection closed and no longer counted outstanding."""
    for _ in range(100):
        if up.open == 0:
            break
        await asyncio.sleep(0.01)
    instance = gw.gen.upstreams["orders"].instances[0]
    assert (up.open, instance.outstanding) == (0, 0)


async def test_a_client_leaving_while_a_part_body_streams_lets_go_of_the_upstream(tmp_path):
    """The part's head came, its body is slow: the client leaves, the aggregate answers
    499, and the part's upstream connection must go too (it used to stay open, counted
    outstanding, until the upstream itself closed it)."""
    head_sent = asyncio.Event()
    async with (
        Scripted(slow_part(head_sent)) as up,
        running_gateway(agg_config(tmp_path, up.address)) as gw,
    ):
        _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /orders/7/details HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(head_sent.wait(), 5)
        await asyncio.sleep(0.05)  # the part is in its body read
        writer.close()
        await wait_until(lambda: gw.in_flight == 0, timeout=3, what="the aggregate to stop")
        assert gw.metrics.route("details").codes.get(499) == 1
        await assert_released(gw, up)


async def test_a_part_cut_off_by_the_deadline_mid_body_lets_go_of_the_upstream(tmp_path):
    """The same on the deadline's path: the part's body read is cancelled, and its
    connection must not be left open and unread."""
    async with (
        Scripted(slow_part()) as up,
        running_gateway(agg_config(tmp_path, up.address, timeout=0.3)) as gw,
        httpx.AsyncClient(timeout=5) as client,
    ):
        r = await client.get(url(gw, "/orders/7/details"))
        assert r.status_code == 504
        await assert_released(gw, up)
