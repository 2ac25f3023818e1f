"""Routing, configuration and reloads at their edges (a review's findings; each test
failed before its fix): percent-encoded paths, files caught mid-save, edits during a
reload, templates and values that can never work, listener settings and rate limits
across reloads."""

import asyncio
import subprocess
import sys

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from gateway_support import base_config, raw_request, running_gateway, url, write_config
from test_auth_jwks_fetch import JwksServer

from atoll.config import ConfigError
from atoll.gateway import load_gateway_config
from atoll.testing import wait_until
from support import free_port


def one_route(stub, prefix="/", **route):
    return base_config(
        {"a": {"targets": [stub.address]}},
        [{"name": "main", "match": {"prefix": prefix}, "upstream": "a", **route}],
    )


# 1
@pytest.mark.parametrize("path", ["/%61dmin/users", "/adm%69n"])
async def test_percent_encoded_letters_do_not_bypass_a_guarded_prefix(tmp_path, stub, path):
    config = one_route(stub)  # the public catch-all "/"
    config["routes"].insert(
        0,
        {
            "name": "admin",
            "match": {"prefix": "/admin"},
            "upstream": "a",
            "allow_ips": ["10.0.0.0/8"],
        },  # 127.0.0.1 gets 403
    )
    async with running_gateway(write_config(tmp_path / "gw.yaml", config)) as gw:
        raw = await raw_request(
            gw.port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
    assert int(raw.split(b" ", 2)[1]) in (400, 403), [h["path"] for h in stub.hits]


# 2
async def test_a_file_caught_empty_mid_save_is_refused(tmp_path, stub):
    path = write_config(tmp_path / "gw.yaml", one_route(stub))
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        path.write_text("")  # a non-atomic save (open "w", then write) shows this first
        await gw.reload()
        assert (await client.get(url(gw, "/x"))).status_code == 200


# 3
async def test_an_edit_made_while_a_reload_loads_is_not_lost(tmp_path, stub):
    jwks = JwksServer()
    jwks.publish({"k1": ed25519.Ed25519PrivateKey.generate()})
    auth = {"auth": {"jwt": {"algorithms": ["EdDSA"], "jwks_url": jwks.url}}}
    path = write_config(tmp_path / "gw.yaml", one_route(stub, "/v1") | auth)
    try:
        async with running_gateway(path, watch_interval=0.05) as gw:
            jwks.delay = 0.5  # the new generation's first JWKS fetch is slow
            write_config(path, one_route(stub, "/v2") | auth)
            await wait_until(lambda: jwks.hits >= 2, timeout=5)
            await asyncio.sleep(0.05)
            write_config(path, one_route(stub, "/v3") | auth)  # saved again meanwhile
            jwks.delay = 0
            await asyncio.sleep(1.5)
            assert [r.prefix for r in gw.gen.config.routes] == ["/v3"]
    finally:
        jwks.stop()


# 4
@pytest.mark.parametrize("template", ["/a/{id}/{id}", "/a/{id", "/a/{id:int}"])
def test_a_bad_path_template_is_refused_naming_match_path(tmp_path, template):
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"port": free_port()},
                "admin": {"port": 0},
                "upstreams": {"a": {"targets": ["127.0.0.1:1"]}},
                "routes": [{"name": "x", "match": {"path": template}, "upstream": "a"}],
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == "routes[0].match.path"
    done = subprocess.run(
        [sys.executable, "-m", "atoll.gateway", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


# 5
def test_atoll_up_with_a_typo_in_the_gateway_file_exits_2(tmp_path):
    (tmp_path / "svc_mod.py").write_text('from atoll import Service\nservice = Service("svc")\n')
    (tmp_path / "gateway.yaml").write_text(
        "services_from: atoll.toml\nupstreams: {svc: {service: svc}}\n"
        "routes: [{name: r, match: {prefix: /}, upsteam: svc}]\n"
    )
    (tmp_path / "atoll.toml").write_text(
        '[system]\ntransport = "sqlite:///bus.db"\npython_path = ["."]\n'
        f'[gateway]\nconfig = "gateway.yaml"\nport = {free_port()}\nadmin_port = {free_port()}\n'
        f'[services.svc]\napp = "svc_mod:service"\nport = {free_port()}\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "atoll", "up", "-c", "atoll.toml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=90,
        check=False,
    )
    assert done.returncode == 2, done.stdout[-800:]


# 6
async def test_a_reload_applies_changed_server_limits(tmp_path, stub):
    config = one_route(stub)
    config["server"]["max_header_bytes"] = 1024
    path = write_config(tmp_path / "gw.yaml", config)
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 2000 + b"\r\nConnection: close\r\n\r\n"
    async with running_gateway(path) as gw:
        config["server"]["max_header_bytes"] = 8192
        write_config(path, config)
        assert await gw.reload()  # "reloaded", no word of a restart
        assert (await raw_request(gw.port, big)).startswith(b"HTTP/1.1 200")


# 7
async def test_an_unrelated_reload_keeps_rate_limits(tmp_path, stub):
    config = one_route(stub, rate_limit={"rate": 0.01, "burst": 1, "per": "ip"})
    path = write_config(tmp_path / "gw.yaml", config)
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        assert (await client.get(url(gw, "/x"))).status_code == 200
        assert (await client.get(url(gw, "/x"))).status_code == 429
        config["routes"].append({"name": "new", "match": {"prefix": "/new"}, "upstream": "a"})
        write_config(path, config)
        assert await gw.reload()
        assert (await client.get(url(gw, "/x"))).status_code == 429


# 8
@pytest.mark.parametrize(
    ("data", "key"),
    [
        (
            {
                "routes": [
                    {
                        "name": "x",
                        "match": {"prefix": "/api"},
                        "upstream": "a",
                        "strip_prefix": "/zzzz",
                    }
                ]
            },
            "routes[0].strip_prefix",
        ),
        (
            {
                "routes": [
                    {
                        "name": "x",
                        "match": {"prefix": "/", "host": "shop.example:8080"},
                        "upstream": "a",
                    }
                ]
            },
            "routes[0].match.host",
        ),
        (
            {"routes": [{"name": "x", "match": {"prefix": "/", "methods": []}, "upstream": "a"}]},
            "routes[0].match.methods",
        ),
        ({"upstreams": {"a": {"targets": ["https://h:443"]}}}, "upstreams.a.targets[0]"),
        ({"upstreams": {"a": {"targets": ["a b:80"]}}}, "upstreams.a.targets[0]"),
    ],
)
def test_values_that_can_never_work_are_refused(tmp_path, data, key):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"upstreams": {"a": {"targets": ["h:1"]}}} | data))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == key


async def test_a_405_for_a_get_route_lists_head_too(tmp_path, stub):
    path = write_config(
        tmp_path / "gateway.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "o", "match": {"path": "/orders/{id}", "methods": ["GET"]}, "upstream": "a"}],
        ),
    )
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        assert (await client.head(url(gw, "/orders/1"))).status_code == 200
        r = await client.delete(url(gw, "/orders/1"))
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"


async def test_a_rewrite_with_a_query_keeps_one_query_string(tmp_path, stub):
    path = write_config(
        tmp_path / "gateway.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {
                    "name": "s",
                    "match": {"path": "/find/{term}"},
                    "upstream": "a",
                    "rewrite": "/search?q={term}",
                }
            ],
        ),
    )
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        r = await client.get(url(gw, "/find/apple?page=2"))
        assert r.json()["path"] == "/search"
        assert r.json()["query"] == "q=apple&page=2"
