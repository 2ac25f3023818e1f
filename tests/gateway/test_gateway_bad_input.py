"""Malformed, oversized and hostile requests: the right status, problem+json, no crash."""

import asyncio
import re

import httpx
import pytest
from gateway_support import base_config, problem_of, raw_request, running_gateway, url, write_config


@pytest.fixture
def config(tmp_path, stub):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {"name": "small", "match": {"prefix": "/small"}, "upstream": "a", "max_body": 1000},
                {"name": "a", "match": {"prefix": "/"}, "upstream": "a"},
            ],
            server={
                "port": 8080,
                "access_log": False,
                "max_header_bytes": 4096,
                "max_url_bytes": 2048,
            },
        ),
    )


CASES = {
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 hello\r\n\r\n", 400),
    "bad method": (b"G(T / HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "bad version": (b"GET / HTTP/9.9\r\nhost: x\r\n\r\n", 400),
    "header without colon": (b"GET / HTTP/1.1\r\nhost x\r\n\r\n", 400),
    "bad content-length": (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n", 400),
    "two content-lengths": (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        400,
    ),
    "smuggling CL+TE": (
        (
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n"
            b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
        400,
    ),
    "bad chunk": (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n", 400),
    "huge headers": (b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 8000 + b"\r\n\r\n", 431),
    "many headers": (b"GET / HTTP/1.1\r\n" + b"x-h: 1234567890\r\n" * 400 + b"\r\n", 431),
    "long url": (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nhost: x\r\n\r\n", 414),
    "dot segments": (b"GET /a/../admin HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "encoded dot segments": (b"GET /a/%2e%2E/admin HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "NUL in path": (b"GET /a%00b HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "absolute form": (b"GET http://evil/ HTTP/1.1\r\nhost: x\r\n\r\n", 400),
    "body too large": (
        b"POST /small HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n" + b"a" * 5000,
        413,
    ),
    # No length to refuse it by, and whole before the handler runs: counted as it is.
    "chunked body too large, arriving with its head": (
        b"POST /small HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
        b"1388\r\n" + b"a" * 5000 + b"\r\n0\r\n\r\n",
        413,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_bad_requests_get_the_right_status_and_a_problem(config, stub, name):
    data, status = CASES[name]
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        raw = await raw_request(gw.port, data, read_timeout=2)
        got, problem = problem_of(raw)
        assert got == status, raw[:300]
        assert problem["status"] == status
        assert b"application/problem+json" in raw.split(b"\r\n\r\n")[0]
        assert not stub.hits  # nothing reached the upstream
        # The worker is fine and serves the next request.
        assert (await client.get(url(gw, "/ok"))).status_code == 200
        assert gw.metrics.routes.get("a") is not None


async def test_pipelined_requests_are_answered_in_order(config, stub):
    async with running_gateway(config) as gw:
        data = (
            b"".join(b"GET /p%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(5))
            + b"GET /last HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        raw = await raw_request(gw.port, data)
        assert raw.count(b"HTTP/1.1 200 OK") == 6
        order = [raw.find(b'"path":"/p%d"' % i) for i in range(5)] + [raw.find(b'"path":"/last"')]
        assert order == sorted(order)
        assert -1 not in order


async def test_a_client_vanishing_mid_body_breaks_nothing(config, stub):
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        raw = await raw_request(
            gw.port,
            b"POST /x HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n" + b"a" * 1000,
            read_timeout=0.3,
        )
        assert raw == b""
        assert (await client.get(url(gw, "/ok"))).status_code == 200


@pytest.mark.parametrize(
    ("length", "sent"),
    [(1000, 10), (200_000, 70_000)],
    ids=["buffered-body", "streamed-body"],
)
async def test_a_request_body_that_stalls_is_408_and_closes(tmp_path, stub, length, sent):
    """A client that stops sending mid-body (a slow-body attack, or a dead peer) is
    refused after ``server.body_timeout``, whether the body was being read whole or
    streamed to the upstream, and its connection is closed."""
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            server={"port": 8080, "access_log": False, "body_timeout": 0.3},
        ),
    )
    async with running_gateway(path) as gw:
        head = b"POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % length
        loop = asyncio.get_running_loop()
        started = loop.time()
        raw = await raw_request(gw.port, head + b"a" * sent, read_timeout=5)
        elapsed = loop.time() - started
        status, problem = problem_of(raw)
        assert status == 408
        assert "stalled" in problem["detail"]
        assert b"connection: close" in raw.lower()
        assert 0.25 < elapsed < 3  # closed by the gateway, not by raw_request's timeout
        assert gw.in_flight == 0


async def test_malformed_bytes_behind_good_requests_are_refused_after_them(config, stub):
    """Requests that parsed are answered first, in order; then the garbage pipelined
    behind them gets its 400 and the connection ends (the fuzz test found these answers
    cut off: the connection closed as soon as the garbage was read)."""
    async with running_gateway(config) as gw:
        good = b"GET /one HTTP/1.1\r\nhost: x\r\n\r\nGET /two HTTP/1.1\r\nhost: x\r\n\r\n"
        raw = await raw_request(gw.port, good + b"\x00\xfagarbage\r\n\r\n", read_timeout=5)
    # Bodies are not CRLF-terminated: each status line follows the previous body.
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"200", b"400"]
    assert [hit["path"] for hit in stub.hits] == ["/one", "/two"]
    assert raw.rstrip().endswith(b"}")  # the problem body, then the gateway closed


async def test_a_bad_body_behind_a_good_request_is_refused_in_its_turn(config, stub):
    async with running_gateway(config) as gw:
        good = b"GET /one HTTP/1.1\r\nhost: x\r\n\r\n"
        bad = b"POST /two HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"
        raw = await raw_request(gw.port, good + bad, read_timeout=5)
        assert gw.in_flight == 0
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"400"]
    assert [hit["path"] for hit in stub.hits] == ["/one"]
