"""The gateway's pooled upstream connections when the upstream misbehaves.

An upstream written on raw sockets stalls, closes a pooled connection as a request
arrives on it, answers garbage or streams a large body. The gateway must answer as
its pipeline says: a 504 after the timeout (and not pool the stalled connection), one
more try on a new connection for an idempotent request whose pooled connection was
closed (and a 502 for another), a 502 for a malformed answer, the breaker's 503, the
whole body, and a graceful stop that waits for the request in flight.
"""

import asyncio
import contextlib

import httpx
import pytest
from gateway_support import base_config, running_gateway, url, write_config


class RawUpstream:
    """An HTTP/1.1 upstream on asyncio streams, told how to treat each request."""

    def __init__(self):
        self.mode = "ok"
        self.status = 200
        self.requests = 0
        self.connections = 0
        self.writers = []
        self.server = None
        self.port = 0

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    async def start(self):
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self):
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                mode = self.mode
                if mode == "drop":  # a pooled connection the instance closes as it is used
                    self.mode = "ok"
                    break
                if mode == "stall":
                    await asyncio.sleep(3600)
                if mode == "garbage":
                    writer.write(b"HTTP/1.1 abc\r\n\r\n")
                    break
                if mode == "early":  # answers at once, reads the body on (and drops it)
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                    await writer.drain()
                    while await reader.read(65536):
                        pass
                    break
                if mode == "stall-body":  # a head, part of the body, then nothing
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n")
                    writer.write(b"z" * 100_000)
                    await writer.drain()
                    await asyncio.sleep(3600)
                if mode == "big":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2000000\r\n\r\n")
                    for _ in range(40):
                        writer.write(b"y" * 50_000)
                        await writer.drain()
                        await asyncio.sleep(0.001)
                    continue
                body = b'{"n": %d}' % self.requests
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nx-upstream: raw\r\n\r\n%b"
                    % (self.status, len(body), body)
                )
        writer.close()


@pytest.fixture
async def raw():
    server = await RawUpstream().start()
    yield server
    await server.stop()


def gateway_config(tmp_path, raw, policy=None, pool=None):
    upstream = {"targets": [raw.address], "passive": {"failures": 1000}}
    if pool is not None:
        upstream["pool"] = pool
    if policy is not None:
        upstream["policy"] = policy
    return write_config(
        tmp_path / "gw.yaml",
        base_config({"a": upstream}, [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}]),
    )


async def test_requests_reuse_one_pooled_connection(tmp_path, raw):
    async with running_gateway(gateway_config(tmp_path, raw)) as gw, httpx.AsyncClient() as client:
        for n in range(1, 21):
            r = await client.get(url(gw, f"/items/{n}"))
            assert r.status_code == 200
            assert r.json() == {"n": n}
            assert r.headers["x-upstream"] == "raw"
            assert len(r.headers["x-request-id"]) == 32
        r = await client.head(url(gw, "/items/head"))
        assert r.status_code == 200
        assert r.content == b""
        upstream = gw.gen.upstreams["a"]
        assert upstream.requests_total == 21
        assert upstream.instances[0].requests_total == 21
    assert raw.connections == 1


async def test_a_stalled_upstream_is_504_after_its_timeout(tmp_path, raw):
    config = gateway_config(tmp_path, raw, {"timeout": 0.3})
    async with running_gateway(config) as gw, httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.mode = "stall"
        loop = asyncio.get_running_loop()
        started = loop.time()
        r = await client.get(url(gw, "/slow"))
        assert r.status_code == 504
        assert "did not answer in time" in r.json()["detail"]
        assert 0.25 < loop.time() - started < 2
        # The stalled connection was dropped, not pooled: the next request opens another.
        raw.mode = "ok"
        assert (await client.get(url(gw, "/again"))).status_code == 200
        assert raw.connections == 2
        assert gw.gen.upstreams["a"].failures_total == 1
        assert gw.in_flight == 0


async def test_a_pooled_connection_closed_under_a_request_is_retried_if_idempotent(tmp_path, raw):
    async with running_gateway(gateway_config(tmp_path, raw)) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.mode = "drop"
        r = await client.get(url(gw, "/idempotent"))
        assert r.status_code == 200  # once more, on a new connection
        assert raw.connections == 2
        upstream = gw.gen.upstreams["a"]
        assert upstream.requests_total == 2
        assert upstream.failures_total == 0
        raw.mode = "drop"
        r = await client.post(url(gw, "/not-idempotent"))  # no body: complete at once
        assert r.status_code == 502
        assert upstream.failures_total == 1
        # With an Idempotency-Key it may be sent again (a pooled connection first: the
        # last one was dropped, and a new connection closed at once is not tried again).
        assert (await client.get(url(gw, "/warm-again"))).status_code == 200
        raw.mode = "drop"
        r = await client.post(url(gw, "/keyed"), headers={"idempotency-key": "k-1"})
        assert r.status_code == 200


async def test_a_malformed_answer_is_502(tmp_path, raw):
    async with running_gateway(gateway_config(tmp_path, raw)) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.mode = "garbage"
        r = await client.post(url(gw, "/x"))
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/problem+json"
        raw.mode = "ok"
        assert (await client.get(url(gw, "/after"))).status_code == 200


async def test_the_breaker_counts_5xx_and_refuses(tmp_path, raw):
    policy = {"breaker": {"window_size": 4, "minimum_calls": 4, "failure_rate": 0.5, "wait": 30}}
    config = gateway_config(tmp_path, raw, policy)
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.status = 500
        for _ in range(3):
            assert (await client.get(url(gw, "/x"))).status_code == 500
        r = await client.get(url(gw, "/x"))
        assert r.status_code == 503
        assert "circuit breaker is open" in r.json()["detail"]
        assert 1 <= int(r.headers["retry-after"]) <= 30
        breaker = gw.gen.upstreams["a"].breaker
        assert breaker.state.value == "open"
        assert breaker.failures_total == 3
        assert raw.requests == 4  # the refused request never left
        # The connection the refused request did not use stays in the pool.
        assert gw.gen.upstreams["a"].instances[0].idle_connections == 1


async def test_a_body_still_coming_is_streamed(tmp_path, raw):
    async with running_gateway(gateway_config(tmp_path, raw)) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.mode = "big"
        r = await client.get(url(gw, "/big"))
        assert r.status_code == 200
        assert r.headers["content-length"] == "2000000"
        assert r.content == b"y" * 2_000_000
        raw.mode = "ok"
        r = await client.get(url(gw, "/after"))
        assert r.status_code == 200
        assert gw.in_flight == 0


async def test_a_body_that_stalls_is_cut_off_after_the_read_timeout(tmp_path, raw):
    config = gateway_config(tmp_path, raw, pool={"read_timeout": 0.3})
    async with running_gateway(config) as gw, httpx.AsyncClient(timeout=10) as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.mode = "stall-body"
        loop = asyncio.get_running_loop()
        started = loop.time()
        received = 0
        async with client.stream("GET", url(gw, "/stalls")) as r:
            assert r.status_code == 200
            assert r.headers["content-length"] == "1000000"
            # The client must learn the body is incomplete: the gateway closes on it.
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in r.aiter_bytes():
                    received += len(chunk)
        assert received == 100_000
        assert 0.25 < loop.time() - started < 2
        # The stalled connection is not pooled: the next request gets a new one.
        raw.mode = "ok"
        assert (await client.get(url(gw, "/after"))).status_code == 200
        assert raw.connections == 2
        assert gw.in_flight == 0


async def test_an_answer_before_the_whole_body_keeps_the_connection_out_of_the_pool(tmp_path, raw):
    """An instance that answers while a streamed body is still being copied: the client
    gets the answer, the copy's end (the client leaving) is not an error nobody reads, and
    that connection never goes back to the pool while the body is unfinished."""
    async with running_gateway(gateway_config(tmp_path, raw)) as gw, httpx.AsyncClient() as client:
        raw.mode = "early"
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        writer.write(b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 200000\r\n\r\n")
        writer.write(b"u" * 70_000)  # over 64 KiB: streamed, not read whole first
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert answer.endswith(b"early")
        writer.close()  # the rest of the body never comes
        raw.mode = "ok"
        assert (await client.get(url(gw, "/after"))).status_code == 200
        assert raw.connections == 2  # a new connection: the first was not pooled
        assert gw.in_flight == 0


async def test_stop_waits_for_a_request_in_flight(tmp_path, raw):
    config = gateway_config(tmp_path, raw, {"timeout": 0.5})
    async with httpx.AsyncClient(timeout=10) as client:
        running = running_gateway(config)
        gw = await running.__aenter__()
        try:
            assert (await client.get(url(gw, "/warm"))).status_code == 200
            raw.mode = "stall"
            pending = asyncio.create_task(client.get(url(gw, "/slow")))
            while raw.requests < 2:
                await asyncio.sleep(0.01)
            assert gw.in_flight == 1
        finally:
            await running.__aexit__(None, None, None)
        # stop() waited for the request: it was answered (by its timeout), not cut off.
        assert (await pending).status_code == 504


@pytest.mark.parametrize("status", [101, 600, 99])
async def test_an_invalid_status_or_an_unasked_for_101_is_502(tmp_path, raw, status):
    """Relayed, they would leave the client lost: a 101 switches protocols nobody asked
    for (and what follows on the connection is read as another protocol); 600 and 099
    are no HTTP status at all (RFC 9110 15). nginx: "upstream sent invalid status"."""
    async with running_gateway(gateway_config(tmp_path, raw)) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/warm"))).status_code == 200
        raw.status = status
        r = await client.post(url(gw, "/x"))
        assert r.status_code == 502, r.text
        assert r.headers["content-type"] == "application/problem+json"
        raw.status = 200
        after = await client.get(url(gw, "/after"))
        assert after.status_code == 200
        assert after.json()["n"] >= 2
