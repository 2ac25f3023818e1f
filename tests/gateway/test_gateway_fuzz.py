"""Hypothesis throws malformed and hostile requests at a running gateway.

Whatever arrives, the gateway must answer with a status a client can act on (never a
500, which would mean a bug on the request path) and go on serving: no request is left
in flight, and no "unexpected error" is logged. The gateway runs on its own event loop
in a thread; each example is sent over a blocking socket.
"""

import asyncio
import contextlib
import logging
import re
import socket
import threading

import pytest
from gateway_support import base_config, write_config
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from atoll.gateway import Gateway, mint_token

SECRET = "fuzz-secret-0123456789-0123456789-abcdef"
#: A valid token, for the fuzzer to send whole, cut short, altered or rearranged.
TOKEN = mint_token(subject="fuzz", scopes=["s1"], secret=SECRET.encode(), issuer="fuzz")
#: Statuses the gateway may answer a bad request with, or pass on from the upstream.
ALLOWED = {200, 204, 400, 401, 403, 404, 405, 408, 413, 414, 429, 431, 501, 502, 503, 504}
STATUS = re.compile(rb"^HTTP/1\.[01] (\d{3}) ")


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request head with a small 200 and closes (no body bookkeeping)."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro):
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    async def start_upstream():
        return await asyncio.start_server(_upstream, "127.0.0.1", 0)

    upstream = run(start_upstream())
    address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
    path = write_config(
        tmp_path_factory.mktemp("fuzz") / "gw.yaml",
        base_config(
            {"a": {"targets": [address], "passive": {"failures": 100000}}},
            [
                {"name": "small", "match": {"prefix": "/small"}, "upstream": "a", "max_body": 16},
                {"name": "key", "match": {"prefix": "/keyed"}, "upstream": "a", "auth": "api_key"},
                {"name": "ws", "match": {"prefix": "/ws"}, "upstream": "a", "websocket": True},
                {
                    "name": "jwt",
                    "match": {"prefix": "/jwt"},
                    "upstream": "a",
                    "auth": "jwt",
                    "scopes": ["s1"],
                },
                {"name": "a", "match": {"prefix": "/"}, "upstream": "a"},
            ],
            server={
                "port": 8080,
                "access_log": False,
                "body_timeout": 0.2,
                "idle_timeout": 1,
                "max_header_bytes": 2048,
                "max_url_bytes": 512,
            },
            auth={
                "api_keys": {"keys": [{"name": "k", "key": "secret-key-0123456789"}]},
                "jwt": {"algorithms": ["HS256"], "hs256_secret": SECRET, "issuer": "fuzz"},
            },
        ),
    )
    errors = _Errors()
    logging.getLogger("atoll.gateway").addHandler(errors)

    async def start_gateway():
        gateway = Gateway(path, port=0, admin_port=0, watch_interval=None)
        await gateway.start()
        return gateway

    gw = run(start_gateway())
    gw.errors = errors
    gw.test_loop = loop
    yield gw
    run(gw.stop(drain_timeout=2))
    upstream.close()
    logging.getLogger("atoll.gateway").removeHandler(errors)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def exchange(port: int, data: bytes, *, head_only: bool = False) -> bytes:
    """Send ``data`` and read one final answer (after any 100 Continue): its head, and its
    body by its Content-Length (none for a HEAD, a 204 or a 304); what came back if the
    gateway closed first."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        with contextlib.suppress(OSError):  # refused mid-send: read the answer anyway
            sock.sendall(data)
        received = b""
        try:
            while True:
                while b"\r\n\r\n" not in received:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return received
                    received += chunk
                head, _, body = received.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 1"):
                    break
                received = body  # an interim answer (100 Continue): the final one follows
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            status = STATUS.match(head)
            if head_only or length is None or (status and status.group(1) in (b"204", b"304")):
                return received
            while len(body) < int(length.group(1)):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
            return head + b"\r\n\r\n" + body
        except (TimeoutError, OSError):
            return received


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-_0123456789", min_size=1, max_size=12)
_bytes_text = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_known_methods = st.sampled_from(
    [b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE"]
)
# Mostly methods that parse, so that most examples get past the parser to routing,
# authentication and the upstream; some raw bytes for the parser itself.
_methods = _known_methods | _known_methods | _known_methods | st.binary(max_size=8)
_paths = st.sampled_from(["/", "/small", "/keyed/x", "/ws", "/jwt", "/a/b", "/a?q=1", "*"]).map(
    str.encode
) | st.lists(
    st.sampled_from(["a", ".", "..", "%2e", "%2F", "%00", "\\", "é", "%", "~", ";", "?", "#"]),
    max_size=6,
).map(lambda parts: ("/" + "/".join(parts)).encode())
_versions = st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.x", b""])
_header_names = st.sampled_from(
    [
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"upgrade",
        b"expect",
        b"x-forwarded-for",
        b"authorization",
        b"x-api-key",
        b"x-request-id",
        b"x-atoll-deadline",
        b"traceparent",
        b"x_auth_subject",
        b"origin",
    ]
) | _token.map(str.encode)
_header_values = (
    st.sampled_from(
        [
            b"",
            b"0",
            b"5",
            b"-1",
            b"99999999999999999999",
            b"chunked",
            b"gzip, chunked",
            b"close",
            b"keep-alive, upgrade",
            b"websocket",
            b"100-continue",
            b"Bearer a.b.c",
            b"Bearer ",
            b"Basic Zm9vOmJhcg==",
            b"secret-key-0123456789",
            b"1.2.3.4, 5.6.7.8:90, [::1]:1",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ]
    )
    | _bytes_text
    | st.builds(lambda token: b"Bearer " + token.encode(), st.just(TOKEN))
    | st.builds(lambda cut: b"Bearer " + TOKEN[:cut].encode(), st.integers(0, len(TOKEN) - 1))
    | st.builds(
        lambda at: b"Bearer " + (TOKEN[:at] + "A" + TOKEN[at + 1 :]).encode(),
        st.integers(0, len(TOKEN) - 1),
    )
    | st.just(b"Bearer " + ".".join(reversed(TOKEN.split("."))).encode())
)
_requests = st.tuples(
    _methods,
    _paths,
    _versions,
    st.lists(st.tuples(_header_names, _header_values), max_size=8),
    st.binary(max_size=64),
    st.booleans(),  # add a Host header first
)


@settings(
    max_examples=1000,
    deadline=None,
    derandomize=True,  # the same examples in every run: CI stays reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(_requests)
def test_whatever_arrives_is_answered_sanely_and_the_gateway_goes_on(gateway, request_parts):
    method, path, version, headers, body, with_host = request_parts
    head = [method + b" " + path + b" " + version]
    if with_host:
        head.append(b"host: example")
    head += [name + b": " + value for name, value in headers]
    data = b"\r\n".join(head) + b"\r\n\r\n" + body
    answer = exchange(gateway.port, data, head_only=method == b"HEAD")
    # Every request head here is complete, so every one gets an answer (a body that
    # never comes gets its 408), even one behind garbage or ahead of it.
    match = STATUS.match(answer)
    assert match is not None, answer[:200]
    status = int(match.group(1))
    event(f"status {status}")  # the spread of answers, in --hypothesis-show-statistics
    assert status in ALLOWED, answer[:400]
    # Still serving, and nothing left behind.
    assert STATUS.match(exchange(gateway.port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert not gateway.errors.records, gateway.errors.records[0].getMessage()


def test_nothing_was_left_in_flight(gateway):
    # Runs after the property above (same module, file order): every request finished.
    async def settled():
        for _ in range(100):
            if gateway.in_flight == 0:
                return True
            await asyncio.sleep(0.02)
        return False

    assert asyncio.run_coroutine_threadsafe(settled(), gateway.test_loop).result(5)
