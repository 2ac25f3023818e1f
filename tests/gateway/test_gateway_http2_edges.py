"""HTTP/2 and WebSocket at their edges (a review's findings; the first two failed before
their fixes): answers waiting for the window count against the stream limit; uploads to
a slow upstream do not stall the connection; a client leaving a WebSocket handshake
releases the upstream."""

import asyncio
import contextlib

import h2.errors
import h2.events
import h2.settings
import httpx
from gateway_support import base_config, running_gateway, url, write_config
from test_gateway_http2 import TIMEOUT, h2_config, raw_h2

from atoll.testing import wait_until


async def test_streams_whose_answers_wait_for_the_window_count_against_the_limit(tmp_path, stub):
    """A client that never opens its windows gets every answer queued in the gateway;
    the handler returns, its slot is freed, and the next stream is accepted. The
    announced limit (4 here) bounds nothing: 40 requests reach the upstream and 40
    answers sit in memory on one connection (h2's own backstop is 1000)."""
    config = h2_config(tmp_path, stub, server={"http2_max_streams": 4})
    window = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    async with running_gateway(config) as gw, raw_h2(gw.port, settings=window) as raw:
        for batch in range(10):
            for n in range(4):
                await raw.request(f"/big?size=60000&n={batch}-{n}")
            await asyncio.sleep(0.2)
            await wait_until(lambda: gw.in_flight == 0, timeout=TIMEOUT, what="handlers done")
        (conn,) = [c for c in gw.state.connections if c.h2 is not None]
        queued = sum(s._out_size for s in conn.h2.streams.values())
        refused = [
            e
            for e in raw.events
            if isinstance(e, h2.events.StreamReset)
            and e.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
        ]
        assert len(conn.h2.streams) <= 4, (len(conn.h2.streams), queued, len(refused))


async def test_uploads_to_a_slow_upstream_do_not_stall_the_others(tmp_path, stub):
    """A connection window given back only as handlers read bodies let four uploads
    whose upstream is slow (here: its connect hangs, as with a full accept queue) hold
    all of it, and an upload to a healthy route on the same connection (a browser
    multiplexes everything on one) got no byte through until they ended: head-of-line
    blocking across streams, which HTTP/1.1 does not have. Each stream's own window now
    bounds what it holds; the connection's reopens as data arrives."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(0)  # never accepted: once the queue is full, connects hang
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(sock.getsockname())
        fillers.append(filler)
    full = f"127.0.0.1:{sock.getsockname()[1]}"
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {
                "a": {"targets": [stub.address]},
                "busy": {"targets": [full], "pool": {"connect_timeout": 10}},
            },
            [
                {"name": "slow", "match": {"prefix": "/slow"}, "upstream": "busy"},
                {"name": "a", "match": {"prefix": "/"}, "upstream": "a"},
            ],
            server={"port": 8080, "access_log": False},
        ),
    )
    try:
        async with running_gateway(config) as gw, raw_h2(gw.port) as raw:
            await raw.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
            for _ in range(4):  # each sends all its window lets it, and waits on
                stream_id = raw.conn.get_next_available_stream_id()
                raw.conn.send_headers(stream_id, raw.request_headers("/slow", "POST"))
                allowed = min(
                    raw.conn.local_flow_control_window(stream_id),
                    raw.conn.outbound_flow_control_window,
                )
                for start in range(0, allowed, raw.conn.max_outbound_frame_size):
                    size = min(raw.conn.max_outbound_frame_size, allowed - start)
                    raw.conn.send_data(stream_id, b"x" * size)
                await raw.flush()
            await asyncio.sleep(0.5)
            upload = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(upload, raw.request_headers("/upload", "POST"))
            sender = asyncio.create_task(raw.send_body(upload, b"y" * 100_000))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(sender), 3.0)
            window = raw.conn.outbound_flow_control_window
            assert sender.done(), f"upload stalled, connection window {window}"
            assert (await raw.response(upload)).status == 200
    finally:
        sock.close()
        for filler in fillers:
            filler.close()


import socket  # noqa: E402
import struct  # noqa: E402

import pytest  # noqa: E402


@pytest.mark.parametrize("rst", [False, True])
async def test_a_client_leaving_during_the_websocket_handshake_releases_the_upstream(
    tmp_path, stub, rst
):
    routes = [{"name": "ws", "match": {"prefix": "/ws"}, "upstream": "a", "websocket": True}]
    config = h2_config(tmp_path, stub, routes=routes, server={"http2": False})
    async with running_gateway(config) as gw:
        _reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(
            b"GET /ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
            b"sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        await writer.drain()
        if rst:
            writer.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        writer.close()
        await wait_until(lambda: len(stub.hits) == 1, timeout=TIMEOUT, what="handshake upstream")
        await wait_until(lambda: gw.in_flight == 0, timeout=3, what="handler released")


async def test_the_access_log_names_the_protocol(tmp_path, stub):
    import structlog  # noqa: PLC0415

    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            server={"port": 8080, "access_log": True},
        ),
    )
    async with running_gateway(path) as gw:
        seen = []
        for http2 in (False, True):
            with structlog.testing.capture_logs() as logs:
                async with httpx.AsyncClient(http1=not http2, http2=http2) as client:
                    r = await client.get(url(gw, "/x"))
                    assert r.status_code == 200
            [line] = [entry for entry in logs if entry.get("event") == "request"]
            seen.append(line["protocol"])
    assert seen == ["HTTP/1.1", "HTTP/2"]
