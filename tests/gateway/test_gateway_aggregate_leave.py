"""A client leaving an aggregate: the parts' upstream calls must be let go."""

import asyncio

from gateway_support import base_config, running_gateway, write_config
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


async def test_a_client_leaving_while_a_part_body_streams_lets_go_of_the_upstream(tmp_path):
    """The part's head came, its body is slow: the client leaves, the aggregate answers
    499 - but the part's upstream connection stays open (and counted outstanding) until
    the upstream itself closes it, though nobody will ever read it."""
    head_sent = asyncio.Event()

    async def slow_body(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"a":'
        )
        await writer.drain()
        head_sent.set()
        await reader.read()  # returns when the gateway lets go

    async with Scripted(slow_body) as up, running_gateway(agg_config(tmp_path, up.address)) as gw:
        _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"GET /orders/7/details HTTP/1.1\r\nHost: t\r\n\r\n")
        await writer.drain()
        await asyncio.wait_for(head_sent.wait(), 5)
        await asyncio.sleep(0.05)  # the part is in its body read
        writer.close()
        await wait_until(lambda: gw.in_flight == 0, timeout=3, what="the aggregate to stop")
        assert gw.metrics.route("details").codes.get(499) == 1
        for _ in range(100):
            if up.open == 0:
                break
            await asyncio.sleep(0.01)
        instance = gw.gen.upstreams["orders"].instances[0]
        assert (up.open, instance.outstanding) == (0, 0)


async def test_a_part_cut_off_by_the_deadline_mid_body_lets_go_of_the_upstream(tmp_path):
    """The same leak on the deadline's path (older than these commits): the part's
    body read is cancelled, its connection is neither read nor closed."""
    import httpx  # noqa: PLC0415
    from gateway_support import url  # noqa: PLC0415

    async def slow_body(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"a":'
        )
        await writer.drain()
        await reader.read()

    async with (
        Scripted(slow_body) as up,
        running_gateway(agg_config(tmp_path, up.address, timeout=0.3)) as gw,
        httpx.AsyncClient(timeout=5) as client,
    ):
        r = await client.get(url(gw, "/orders/7/details"))
        assert r.status_code == 504
        for _ in range(100):
            if up.open == 0:
                break
            await asyncio.sleep(0.01)
        instance = gw.gen.upstreams["orders"].instances[0]
        assert (up.open, instance.outstanding) == (0, 0)
