"""JWKS fetched from a URL: refused when the first fetch fails, kept when a refresh fails.

The key set is served by a real HTTP server on a local port (a thread), so these tests go
through the gateway's own HTTP fetch, its status and body checks, and its timing.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from gateway_support import base_config, running_gateway, url, write_config

from atoll.config import ConfigError
from atoll.testing import wait_until
from support import free_port


def _jwk(key, kid):
    data = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key()))
    data["kid"] = kid
    return data


def token(key, kid):
    # A new jti each time: a fresh token is never answered from the gateway's token cache.
    claims = {"sub": "alice", "exp": int(time.time()) + 300, "jti": uuid.uuid4().hex}
    return {"authorization": "Bearer " + jwt.encode(claims, key, "EdDSA", headers={"kid": kid})}


class JwksServer:
    """A JWKS endpoint in a thread; tests change what it answers, or stop it."""

    def __init__(self, port=0):
        self.status = 200
        self.body = b""
        self.delay = 0.0
        self.hits = 0
        self.publish({})
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                owner.hits += 1
                time.sleep(owner.delay)
                body = owner.body
                self.send_response(owner.status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.handler = Handler
        self.httpd = None
        self.start(port)

    def start(self, port):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self.handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self):
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    def publish(self, keys):
        self.body = json.dumps({"keys": [_jwk(k, kid) for kid, k in keys.items()]}).encode()


@pytest.fixture
def server():
    s = JwksServer()
    yield s
    s.stop()


@pytest.fixture
def key():
    return ed25519.Ed25519PrivateKey.generate()


def config(tmp_path, stub, jwks_url=None, **jwt_settings):
    settings = {"algorithms": ["EdDSA"], **jwt_settings}
    if jwks_url is not None:
        settings["jwks_url"] = jwks_url
    return write_config(
        tmp_path / "gateway.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "r", "match": {"prefix": "/"}, "upstream": "a", "auth": "jwt"}],
            auth={"jwt": settings},
        ),
    )


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ({"status": 404}, "HTTP 404 Not Found"),
        ({"status": 503}, "HTTP 503 Service Unavailable"),
        ({"body": b"<html>sign in</html>"}, "JSONDecodeError"),
        ({"body": b'{"issuer": "https://id.example"}'}, "not a JWK set (no 'keys' list)"),
        # Only a symmetric key: a JWKS never provides those, so nothing could verify.
        (
            {"body": b'{"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}'},
            "it holds no usable signing key",
        ),
    ],
)
async def test_a_first_fetch_that_fails_refuses_the_config_at_start(
    tmp_path, stub, server, answer, reason
):
    server.status = answer.get("status", 200)
    server.body = answer.get("body", server.body)
    path = config(tmp_path, stub, server.url)
    with pytest.raises(ConfigError) as caught:
        async with running_gateway(path):
            pytest.fail("the gateway started without keys")
    assert caught.value.key == "auth.jwt.jwks_url"
    assert f"could not be loaded from {server.url}: {reason}" in str(caught.value)
    assert server.hits == 1


async def test_an_unreachable_jwks_url_or_missing_file_refuses_the_config_at_start(tmp_path, stub):
    dead = f"http://127.0.0.1:{free_port()}/jwks.json"
    with pytest.raises(ConfigError) as caught:
        async with running_gateway(config(tmp_path, stub, dead)):
            pytest.fail("the gateway started without keys")
    assert caught.value.key == "auth.jwt.jwks_url"
    assert f"from {dead}: ConnectError" in str(caught.value)

    missing = tmp_path / "nowhere.json"
    with pytest.raises(ConfigError) as caught:
        async with running_gateway(config(tmp_path, stub, jwks_file=str(missing))):
            pytest.fail("the gateway started without keys")
    assert caught.value.key == "auth.jwt.jwks_file"
    assert f"from {missing}: FileNotFoundError" in str(caught.value)


async def test_a_reload_whose_jwks_cannot_be_fetched_is_refused_and_the_old_keys_serve(
    tmp_path, stub, server, key
):
    server.publish({"k1": key})
    path = config(tmp_path, stub, server.url, jwks_min_refetch_interval=60)
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"), headers=token(key, "k1"))).status_code == 200
        old = gw.gen
        dead = f"http://127.0.0.1:{free_port()}/jwks.json"
        config(tmp_path, stub, dead, jwks_min_refetch_interval=60)
        assert not await gw.reload()
        assert gw.gen is old
        assert gw.reload_failures == 1
        assert "auth.jwt.jwks_url" in gw.last_reload_error
        assert dead in gw.last_reload_error
        assert "ConnectError" in gw.last_reload_error
        r = await client.get(url(gw, "/x"), headers=token(key, "k1"))
        assert r.status_code == 200, r.text

        # A reload to a JWKS that loads is applied, with its keys already in place: the
        # first token for them needs no refetch (which the interval would not allow).
        other = JwksServer()
        try:
            new_key = ed25519.Ed25519PrivateKey.generate()
            other.publish({"k2": new_key})
            config(tmp_path, stub, other.url, jwks_min_refetch_interval=60)
            assert await gw.reload()
            assert other.hits == 1
            r = await client.get(url(gw, "/x"), headers=token(new_key, "k2"))
            assert r.status_code == 200, r.text
            assert other.hits == 1
        finally:
            other.stop()


@pytest.mark.parametrize("failure", ["http 500", "not json", "not a jwk set", "server down"])
async def test_failed_refreshes_keep_the_last_good_keys_then_a_rotation_applies(
    tmp_path, stub, server, failure, caplog
):
    key = ed25519.Ed25519PrivateKey.generate()
    server.publish({"k1": key})
    path = config(
        tmp_path,
        stub,
        server.url,
        jwks_refresh_interval=0.05,
        jwks_min_refetch_interval=60,  # only the periodic refresh fetches here
    )
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        keyset = gw.gen.auth.keyset
        assert (await client.get(url(gw, "/x"), headers=token(key, "k1"))).status_code == 200
        version = keyset.version
        good_body = server.body
        if failure == "http 500":
            server.status = 500
        elif failure == "not json":
            server.body = b"oops"
        elif failure == "not a jwk set":
            server.body = b'{"keys": "none"}'
        else:
            server.stop()
        errors = keyset.errors
        with caplog.at_level(logging.WARNING, logger="atoll.gateway"):
            await wait_until(
                lambda: keyset.errors >= errors + 2, timeout=5, what="failed refreshes"
            )
        assert f"JWKS from {server.url} could not be loaded" in caplog.text
        assert "keeping the last 1 key(s)" in caplog.text
        assert set(keyset.keys) == {"k1"}
        assert keyset.version == version
        r = await client.get(url(gw, "/x"), headers=token(key, "k1"))
        assert r.status_code == 200, r.text

        # The provider answers again, having rotated: k2 replaces k1.
        if failure == "server down":
            server.start(server.port)
        server.status = 200
        server.body = good_body
        new_key = ed25519.Ed25519PrivateKey.generate()
        server.publish({"k2": new_key})
        await wait_until(lambda: set(keyset.keys) == {"k2"}, timeout=5, what="the rotation")
        r = await client.get(url(gw, "/x"), headers=token(new_key, "k2"))
        assert r.status_code == 200, r.text
        r = await client.get(url(gw, "/x"), headers=token(key, "k1"))
        assert r.status_code == 401
        assert "key id is unknown" in r.json()["detail"]


async def test_an_unknown_kid_refetches_once_for_concurrent_requests(tmp_path, stub, server, key):
    server.publish({"k1": key})
    path = config(tmp_path, stub, server.url, jwks_min_refetch_interval=0)
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        new_key = ed25519.Ed25519PrivateKey.generate()
        server.publish({"k1": key, "k2": new_key})
        server.delay = 0.3  # every request arrives while the one refetch is under way
        hits = server.hits
        answers = await asyncio.gather(
            *(client.get(url(gw, "/x"), headers=token(new_key, "k2")) for _ in range(10))
        )
        assert [r.status_code for r in answers] == [200] * 10
        assert server.hits == hits + 1
        assert set(gw.gen.auth.keyset.keys) == {"k1", "k2"}


async def test_unknown_kid_refetches_over_http_are_rate_limited(tmp_path, stub, server, key):
    server.publish({"k1": key})
    path = config(tmp_path, stub, server.url, jwks_min_refetch_interval=60)
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        new_key = ed25519.Ed25519PrivateKey.generate()
        server.publish({"k1": key, "k2": new_key})
        hits = server.hits
        for _ in range(5):
            r = await client.get(url(gw, "/x"), headers=token(new_key, "k2"))
            assert r.status_code == 401
        # The load at start was the fetch of this interval.
        assert server.hits == hits
        gw.gen.auth.keyset._last_fetch = -1e9  # as if the interval had passed
        r = await client.get(url(gw, "/x"), headers=token(new_key, "k2"))
        assert r.status_code == 200, r.text
        assert server.hits == hits + 1
