"""HTTPS to upstream instances (``upstreams.NAME.tls``)."""

import logging
import ssl

import httpx
import pytest
import yaml
from gateway_support import Stub, base_config, running_gateway, url, write_config

from atoll.config import ConfigError
from atoll.gateway import Gateway
from atoll.gateway._config import load_gateway_config
from atoll.testing import wait_until


@pytest.fixture
async def https_stub(certs):
    server = await Stub(
        "tls", tls={"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key")}
    ).start()
    yield server
    await server.stop()


@pytest.fixture
async def mtls_stub(certs):
    server = await Stub(
        "mtls",
        tls={
            "certfile": str(certs / "server.pem"),
            "keyfile": str(certs / "server.key"),
            "ca_certs": str(certs / "ca.pem"),
            "cert_reqs": ssl.CERT_REQUIRED,
        },
    ).start()
    yield server
    await server.stop()


def config_for(tmp_path, stub, tls, **upstream):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address], "tls": tls, **upstream}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        ),
    )


async def test_requests_go_to_the_instance_over_https(tmp_path, https_stub):
    config = config_for(
        tmp_path,
        https_stub,
        {"ca": "certs/ca.pem"},
        health={"path": "/healthz", "interval": 0.05, "timeout": 1},
    )
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        for n in range(3):
            r = await client.get(url(gw, f"/orders/{n}"))
            assert r.status_code == 200
            assert r.json()["stub"] == "tls"
        assert len(https_stub.hits) == 3
        instance = gw.gen.upstreams["a"].instances[0]
        assert instance.idle_connections == 1  # kept alive and reused, as over HTTP
        # The active health check speaks HTTPS too.
        await wait_until(lambda: instance.probe_successes >= 2, timeout=5, what="probes")
        assert instance.health() == "healthy"


async def test_an_instance_whose_certificate_is_not_trusted_is_502(tmp_path, https_stub, caplog):
    config = config_for(tmp_path, https_stub, {"ca": "certs/other-ca.pem"})
    caplog.set_level(logging.WARNING, logger="atoll.gateway")
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/x"))
        assert r.status_code == 502
        assert r.headers["content-type"] == "application/problem+json"
    assert https_stub.hits == []
    assert "TLS handshake failed" in caplog.text
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_verify_false_skips_the_check(tmp_path, https_stub):
    config = config_for(tmp_path, https_stub, {"ca": "certs/other-ca.pem", "verify": False})
    async with running_gateway(config) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"))).status_code == 200


async def test_a_client_certificate_for_instances_that_require_one(tmp_path, mtls_stub):
    without = config_for(tmp_path, mtls_stub, {"ca": "certs/ca.pem"})
    async with running_gateway(without) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"))).status_code == 502
    assert mtls_stub.hits == []
    tls = {"ca": "certs/ca.pem", "cert": "certs/client.pem", "key": "certs/client.key"}
    with_cert = config_for(tmp_path, mtls_stub, tls)
    async with running_gateway(with_cert) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"))).status_code == 200
    assert len(mtls_stub.hits) == 1


@pytest.mark.parametrize(
    ("tls", "key", "problem"),
    [
        ({"ca": "certs/nope.pem"}, "upstreams.a.tls.ca", "no such file"),
        ({"cert": "certs/client.pem"}, "upstreams.a.tls.key", "needs both"),
        ({"verify": "no"}, "upstreams.a.tls.verify", "true or false"),
        ({"sni": "x"}, "upstreams.a.tls.sni", "unknown key"),
    ],
)
def test_bad_upstream_tls_settings_name_the_key(tmp_path, certs, tls, key, problem):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"a": {"targets": ["h:1"], "tls": tls}}}))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == key
    assert problem in str(info.value)


def test_a_client_key_that_does_not_match_is_refused(tmp_path, certs):
    path = tmp_path / "gw.yaml"
    tls = {"cert": "certs/client.pem", "key": "certs/server.key"}
    path.write_text(yaml.safe_dump({"upstreams": {"a": {"targets": ["h:1"], "tls": tls}}}))
    with pytest.raises(ConfigError) as info:
        Gateway(path, port=0, admin_port=0, watch_interval=None)
    assert info.value.key == "upstreams.a.tls"
    assert "KEY_VALUES_MISMATCH" in str(info.value)
