"""HTTP details the gateway must get right on its own: HEAD answers, forged headers, Host."""

import asyncio

import httpx
import pytest
from gateway_support import base_config, problem_of, raw_request, running_gateway, url, write_config

API_KEY = "pk-0123456789abcdef"


@pytest.fixture
def config(tmp_path, stub):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {"name": "keys", "match": {"prefix": "/keys"}, "upstream": "a", "auth": "api_key"},
                {
                    "name": "summary",
                    "match": {"path": "/summary/{id}"},
                    "aggregate": {
                        "timeout": 2,
                        "parts": {
                            "item": {"upstream": "a", "path": "/items/{id}", "required": True}
                        },
                    },
                },
                {"name": "open", "match": {"prefix": "/open"}, "upstream": "a"},
            ],
            auth={"api_keys": {"keys": [{"name": "partner", "key": API_KEY}]}},
        ),
    )


async def read_response(reader, *, head=False):
    """One response from ``reader``: status, headers, body (none for a HEAD's)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    start, *lines = raw.decode("latin-1").rstrip("\r\n").split("\r\n")
    assert start.startswith("HTTP/1.1 "), raw[:200]
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = b""
    if not head:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return int(start.split(" ")[1]), headers, body


async def head_then_get(port, path, headers=b""):
    """HEAD then GET of ``path`` on one keep-alive connection: both responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        request = b"%s %s HTTP/1.1\r\nhost: x\r\n%s\r\n"
        writer.write(request % (b"HEAD", path, headers))
        await writer.drain()
        head = await read_response(reader, head=True)
        writer.write(request % (b"GET", path, headers))
        await writer.drain()
        get = await read_response(reader)
        writer.write_eof()
        # Nothing after the GET's body either: a HEAD body sent late would show up here.
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    return head, get


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        (b"/nowhere", b"", 404),  # below every route: no match
        (b"/keys/x", b"", 401),
        (b"/keys/x", b"x-api-key: wrong\r\n", 401),
        (b"/summary/7", b"", 200),  # an aggregate: the gateway writes the 200 itself
        (b"/a/../b", b"", 400),
    ],
)
async def test_head_answers_made_by_the_gateway_carry_no_body(config, stub, path, headers, status):
    async with running_gateway(config) as gw:
        (head_status, head_headers, _), (get_status, get_headers, body) = await head_then_get(
            gw.port, path, headers
        )
    assert head_status == get_status == status
    # The same headers as the GET, Content-Length included (RFC 9110 allows it).
    assert head_headers.keys() - {"x-request-id"} == get_headers.keys() - {"x-request-id"}
    assert int(head_headers["content-length"]) == len(body) > 0


@pytest.mark.parametrize(("path", "status"), [(b"/healthz", 200), (b"/nowhere", 404)])
async def test_head_on_the_admin_port_carries_no_body(config, stub, path, status):
    async with running_gateway(config) as gw:
        (head_status, head_headers, _), (get_status, _, body) = await head_then_get(
            gw.admin_port, path
        )
    assert head_status == get_status == status
    assert int(head_headers["content-length"]) == len(body) > 0


async def test_proxied_head_keeps_the_connection_in_step(config, stub):
    async with running_gateway(config) as gw:
        (head_status, head_headers, _), (get_status, _, body) = await head_then_get(
            gw.port, b"/open/x"
        )
        instance = gw.gen.upstreams["a"].instances[0]
        assert instance.outstanding == 0
    assert head_status == get_status == 200
    assert [hit["method"] for hit in stub.hits] == ["HEAD", "GET"]
    # The upstream's Content-Length for its HEAD answer is passed on (its GET body
    # names the method, hence one byte less than the HEAD's would have had).
    assert int(head_headers["content-length"]) == len(body) + 1
    assert b'"method":"GET"' in body


async def test_identity_headers_forged_with_underscores_are_dropped(config, stub):
    forged = {
        "x_auth_subject": "root",
        "X_Auth_Scopes": "admin",
        "x-auth_method": "jwt",
        "x_auth-client": "partner",
    }
    kept = {"x_other": "1", "x-authority": "2"}
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        for path, key in (("/open/x", {}), ("/keys/x", {"x-api-key": API_KEY})):
            r = await client.get(url(gw, path), headers=forged | kept | key)
            assert r.status_code == 200
            received = stub.hits[-1]["header_list"]
            identity = sorted(
                (name, value)
                for name, value in received
                if name.replace("_", "-").startswith("x-auth-")
            )
            if key:  # the gateway's own identity headers, and nothing else
                assert identity == [
                    ("x-auth-client", "partner"),
                    ("x-auth-method", "api_key"),
                    ("x-auth-scopes", ""),
                    ("x-auth-subject", "partner"),
                ]
            else:
                assert identity == []
            for name, value in kept.items():
                assert (name, value) in received


async def test_underscore_spellings_of_the_headers_the_gateway_sets_are_dropped(tmp_path, stub):
    # WSGI/CGI upstreams read X_Forwarded_For as X-Forwarded-For: a client must not be
    # able to send any header the gateway sets, under either spelling.
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "open", "match": {"prefix": "/"}, "upstream": "a"}],
            server={"port": 8080, "access_log": False, "request_id_header": "X-Trace-Id"},
        ),
    )
    forged = {
        "x_forwarded_for": "10.9.9.9",
        "X_Forwarded_Host": "evil.example",
        "x-forwarded_proto": "https",
        "x_trace_id": "forged-id",
        "x_atoll_deadline": "999999",
        "content_length": "5",
    }
    kept = {"x_other": "1", "x_request_id": "not-the-configured-name"}
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/x"), headers=forged | kept)
        assert r.status_code == 200
    received = stub.hits[-1]["header_list"]
    names = [name for name, _ in received]
    for name in forged:
        assert name.lower() not in names, name
    for name, value in kept.items():
        assert (name, value) in received
    # The gateway's own values are the only ones.
    by_name = dict(received)
    assert by_name["x-forwarded-for"] == "127.0.0.1"
    assert by_name["x-forwarded-proto"] == "http"
    assert by_name["x-trace-id"] == r.headers["x-trace-id"] != "forged-id"


async def test_a_custom_identity_prefix_with_an_underscore_is_matched_both_ways(tmp_path, stub):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "open", "match": {"prefix": "/"}, "upstream": "a"}],
            auth={"identity_prefix": "X-Who_"},
        ),
    )
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        r = await client.get(
            url(gw, "/x"), headers={"x-who-subject": "root", "x_who_scopes": "admin", "x-w": "1"}
        )
        assert r.status_code == 200
        names = [name for name, _ in stub.hits[-1]["header_list"]]
        assert "x-w" in names
        assert not [name for name in names if name.startswith(("x-who", "x_who"))]


async def test_a_repeated_host_header_is_refused(config, stub):
    async with running_gateway(config) as gw:
        raw = await raw_request(
            gw.port,
            b"GET /open/x HTTP/1.1\r\nhost: a.example\r\nhost: b.example\r\n"
            b"connection: close\r\n\r\n",
        )
        status, problem = problem_of(raw)
        assert status == 400, raw[:300]
        assert "Host" in problem["detail"]
        assert b"application/problem+json" in raw
        assert not stub.hits
        raw = await raw_request(
            gw.port, b"GET /open/x HTTP/1.1\r\nhost: a.example\r\nconnection: close\r\n\r\n"
        )
        assert raw.startswith(b"HTTP/1.1 200"), raw[:300]


async def test_fields_a_client_names_in_connection_are_not_forwarded(config, stub):
    # RFC 9110 7.6.1: what Connection names is for this hop only. The gateway's own
    # X-Forwarded-For is not the client's to remove.
    async with running_gateway(config) as gw:
        raw = await raw_request(
            gw.port,
            b"GET /open/x HTTP/1.1\r\nhost: a.example\r\n"
            b"connection: close, X-Hop, x-forwarded-for\r\n"
            b"x-hop: secret\r\nx-keep: 1\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
        seen = stub.hits[-1]["headers"]
        assert "x-hop" not in seen
        assert seen["x-keep"] == "1"
        assert seen["x-forwarded-for"] == "127.0.0.1"
        raw = await raw_request(
            gw.port,
            b"GET /open/y HTTP/1.1\r\nhost: a.example\r\nconnection: keep-alive\r\n"
            b"connection: X-Other\r\nx-other: 2\r\nx-hop: 3\r\nconnection: close\r\n\r\n",
        )
        assert raw.startswith(b"HTTP/1.1 200"), raw[:300]
        seen = stub.hits[-1]["headers"]
        assert "x-other" not in seen  # named by a second Connection field
        assert seen["x-hop"] == "3"


async def test_fields_an_upstream_names_in_connection_do_not_reach_the_client(tmp_path):
    body = b'{"ok": true}'
    answer = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"connection: keep-alive, X-Internal\r\nx-internal: secret\r\nx-public: 1\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(body), body)
    )

    writers = []

    async def serve(reader, writer):
        writers.append(writer)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"raw": {"targets": [f"127.0.0.1:{port}"]}},
            [{"name": "raw", "match": {"prefix": "/"}, "upstream": "raw"}],
        ),
    )
    try:
        async with running_gateway(path) as gw, httpx.AsyncClient() as client:
            for _ in range(2):  # the pooled connection is used again
                r = await client.get(url(gw, "/x"))
                assert r.status_code == 200
                assert r.json() == {"ok": True}
                assert "x-internal" not in r.headers
                assert r.headers["x-public"] == "1"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_a_reload_that_changes_the_identity_prefix_reclassifies_field_names(tmp_path, stub):
    def config(prefix):
        return base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "open", "match": {"prefix": "/"}, "upstream": "a"}],
            auth={"identity_prefix": prefix},
        )

    path = write_config(tmp_path / "gw.yaml", config("X-Auth-"))
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        await client.get(url(gw, "/x"), headers={"x-user-id": "7", "x-auth-subject": "root"})
        names = [name for name, _ in stub.hits[-1]["header_list"]]
        assert "x-user-id" in names
        assert "x-auth-subject" not in names
        write_config(path, config("X-User-"))
        assert await gw.reload()
        # The names seen before are judged again under the new prefix.
        await client.get(url(gw, "/x"), headers={"x-user-id": "7", "x-auth-subject": "root"})
        names = [name for name, _ in stub.hits[-1]["header_list"]]
        assert "x-user-id" not in names
        assert "x-auth-subject" in names


async def test_made_up_field_names_do_not_grow_the_gateway(config, stub):
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        for batch in range(30):
            headers = {f"x-made-up-{batch}-{n}": "1" for n in range(50)}
            r = await client.get(url(gw, "/open/x"), headers=headers)
            assert r.status_code == 200
        names = {name for name, _ in stub.hits[-1]["header_list"]}
        assert {f"x-made-up-29-{n}" for n in range(50)} <= names  # still forwarded
        assert len(gw.gen.header_kinds) <= 1024
