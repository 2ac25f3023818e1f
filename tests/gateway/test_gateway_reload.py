"""Configuration reloads: applied without dropping in-flight requests; bad ones refused."""

import asyncio
import logging

import httpx
import pytest
import yaml
from gateway_support import base_config, running_gateway, url, write_config

from atoll.config import ConfigError
from atoll.gateway import load_gateway_config
from atoll.testing import wait_until


def two_routes(stub, stub_b, target="a"):
    return base_config(
        {"a": {"targets": [stub.address]}, "b": {"targets": [stub_b.address]}},
        [{"name": "main", "match": {"prefix": "/"}, "upstream": target}],
    )


async def test_reload_on_change_keeps_in_flight_requests(tmp_path, stub, stub_b):
    path = write_config(tmp_path / "gw.yaml", two_routes(stub, stub_b))
    async with (
        running_gateway(path, watch_interval=0.05) as gw,
        httpx.AsyncClient(timeout=10) as client,
    ):
        stub.release.clear()
        in_flight = asyncio.create_task(client.get(url(gw, "/slow")))
        await wait_until(lambda: stub.hits, timeout=5)
        write_config(path, two_routes(stub, stub_b, target="b"))
        await wait_until(lambda: gw.reloads == 1, timeout=5, what="the reload")
        assert (await client.get(url(gw, "/new"))).json()["stub"] == "b"
        stub.release.set()
        r = await in_flight
        assert r.status_code == 200
        assert r.json()["stub"] == "a"


async def test_bad_config_is_refused_with_file_and_key_and_the_old_one_serves(
    tmp_path, stub, stub_b, caplog
):
    path = write_config(tmp_path / "gw.yaml", two_routes(stub, stub_b))
    async with running_gateway(path, watch_interval=0.05) as gw, httpx.AsyncClient() as client:
        bad = two_routes(stub, stub_b)
        bad["routes"][0]["rate_limit"] = {"rate": -1}
        with caplog.at_level(logging.ERROR, logger="atoll.gateway"):
            write_config(path, bad)
            await wait_until(lambda: gw.reload_failures == 1, timeout=5, what="the refusal")
        assert f"{path}: routes[0].rate_limit.rate: must be > 0, got -1" in caplog.text
        assert gw.last_reload_error is not None
        assert (await client.get(url(gw, "/x"))).json()["stub"] == "a"
        path.write_text("routes: [unclosed")
        await wait_until(lambda: gw.reload_failures == 2, timeout=5)
        assert "not valid YAML" in gw.last_reload_error
        assert (await client.get(url(gw, "/x"))).status_code == 200
        view = (await client.get(f"http://127.0.0.1:{gw.admin_port}/config")).json()
        assert view["refused"] == 2


async def test_a_config_failing_past_its_checks_is_refused_and_the_watch_goes_on(
    tmp_path, stub, stub_b, caplog
):
    path = write_config(tmp_path / "gw.yaml", two_routes(stub, stub_b))
    async with running_gateway(path, watch_interval=0.05) as gw, httpx.AsyncClient() as client:
        bad = two_routes(stub, stub_b, target="b")
        # Passes the checks (a redis:// URL); the Redis client refuses its port.
        bad["rate_limits"] = {"store": "redis://h:notaport"}
        with caplog.at_level(logging.ERROR, logger="atoll.gateway"):
            write_config(path, bad)
            await wait_until(lambda: gw.reload_failures == 1, timeout=5, what="the refusal")
        assert "notaport" in caplog.text
        assert "notaport" in gw.last_reload_error
        assert gw.reloads == 0
        assert gw.store is None
        assert (await client.get(url(gw, "/x"))).json()["stub"] == "a"
        # The watch is still running: a good edit is applied.
        write_config(path, two_routes(stub, stub_b, target="b"))
        await wait_until(lambda: gw.reloads == 1, timeout=5, what="the reload")
        assert (await client.get(url(gw, "/x"))).json()["stub"] == "b"
        assert gw.last_reload_error is None
        view = (await client.get(f"http://127.0.0.1:{gw.admin_port}/config")).json()
        assert view["refused"] == 1
        assert view["reloads"] == 1


async def test_unchanged_upstreams_keep_their_state_across_reloads(tmp_path, stub, stub_b):
    config = two_routes(stub, stub_b)
    config["upstreams"]["a"]["policy"] = {
        "breaker": {"window_size": 2, "minimum_calls": 2, "wait": 60}
    }
    path = write_config(tmp_path / "gw.yaml", config)
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        stub.status = 500
        for _ in range(2):
            await client.get(url(gw, "/x"))
        assert (await client.get(url(gw, "/x"))).status_code == 503
        config["routes"].insert(
            0, {"name": "other", "match": {"prefix": "/other"}, "upstream": "b"}
        )
        write_config(path, config)
        assert await gw.reload()
        assert (await client.get(url(gw, "/x"))).status_code == 503  # still open
        assert (await client.get(url(gw, "/other"))).status_code == 200


CONFIG_ERRORS = [
    (
        {"routes": [{"name": "x", "match": {"prefix": "/"}, "upstream": "nope"}]},
        "routes[0].upstream",
    ),
    ({"upstreams": {"a": {"targets": ["no-port"]}}}, "upstreams.a.targets[0]"),
    (
        {"upstreams": {"a": {"targets": [{"address": "h:1", "weight": -1}]}}},
        "upstreams.a.targets[0].weight",
    ),
    ({"upstreams": {"a": {"targets": [{"weight": 2}]}}}, "upstreams.a.targets[0].address"),
    (
        {"upstreams": {"a": {"targets": [{"address": "h:1", "wieght": 2}]}}},
        "upstreams.a.targets[0].wieght",
    ),
    ({"upstreams": {"a": {"targets": [{"address": "h:1", "weight": 0}]}}}, "upstreams.a.targets"),
    ({"upstreams": {"a": {"targets": ["h:1"], "balance": "random"}}}, "upstreams.a.balance"),
    (
        {"upstreams": {"a": {"targets": ["h:1"], "pool": {"read_timeout": 0}}}},
        "upstreams.a.pool.read_timeout",
    ),
    (
        {"upstreams": {"a": {"targets": ["h:1"], "policy": {"breaker": {"failure_rate": 2}}}}},
        "upstreams.a.policy.breaker.failure_rate",
    ),
    (
        {"upstreams": {"a": {"targets": ["h:1"], "policy": {"retry": {"classifier": "http"}}}}},
        "upstreams.a.policy.retry.classifier",
    ),
    ({"server": {"prot": 1}}, "server.prot"),
    (
        {
            "upstreams": {"a": {"targets": ["h:1"]}},
            "routes": [
                {
                    "name": "x",
                    "match": {"prefix": "/"},
                    "upstream": "a",
                    "mirror": {"upstream": "b"},
                }
            ],
        },
        "routes[0].mirror.upstream",
    ),
    (
        {
            "upstreams": {"a": {"targets": ["h:1"]}},
            "routes": [
                {
                    "name": "x",
                    "match": {"prefix": "/"},
                    "upstream": "a",
                    "mirror": {"upstream": "a", "percent": 101},
                }
            ],
        },
        "routes[0].mirror.percent",
    ),
    (
        {
            "upstreams": {"a": {"targets": ["h:1"]}},
            "routes": [
                {
                    "name": "x",
                    "match": {"prefix": "/"},
                    "upstream": "a",
                    "allow_ips": ["10.0.0.300"],
                }
            ],
        },
        "routes[0].allow_ips[0]",
    ),
    ({"server": {"body_timeout": -1}}, "server.body_timeout"),
    ({"server": {"trusted_proxies": ["10.0.0.0/8", "ten.0.0.1"]}}, "server.trusted_proxies[1]"),
    ({"server": {"trusted_proxies": ["::1", "10.0.0.1/8"]}}, "server.trusted_proxies[1]"),
    ({"server": {"trusted_proxies": [["10.0.0.1"]]}}, "server.trusted_proxies[0]"),
    ({"auth": {"jwt": {"algorithms": ["none"]}}}, "auth.jwt.algorithms[0]"),
    (
        {"auth": {"jwt": {"algorithms": ["HS256"], "hs256_secret": "short"}}},
        "auth.jwt.hs256_secret",
    ),
    ({"auth": {"jwt": {"algorithms": ["RS256"]}}}, "auth.jwt"),
    ({"upstreams": {"a": {"service": "orders"}}}, "upstreams.a.service"),
]


@pytest.mark.parametrize(("data", "key"), CONFIG_ERRORS)
def test_config_errors_name_the_key(tmp_path, data, key):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == key, str(info.value)
    assert info.value.source == str(path)


def test_trusted_proxies_take_addresses_and_networks(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"server": {"trusted_proxies": ["127.0.0.1", "fd00::/8"]}}))
    assert [str(n) for n in load_gateway_config(path).server.trusted_proxies] == [
        "127.0.0.1/32",
        "fd00::/8",
    ]
    path.write_text(yaml.safe_dump({"server": {"trusted_proxies": "10.0.0.0/8"}}))
    assert [str(n) for n in load_gateway_config(path).server.trusted_proxies] == ["10.0.0.0/8"]
    path.write_text(yaml.safe_dump({"server": {"trusted_proxies": "10.0.0.1/8"}}))
    with pytest.raises(ConfigError) as info:  # host bits set: 10.0.0.0/8 was meant, or /32
        load_gateway_config(path)
    assert info.value.key == "server.trusted_proxies"
    assert "host bits" in str(info.value)
    path.write_text(yaml.safe_dump({"server": {"port": 8080}}))
    assert load_gateway_config(path).server.trusted_proxies == ()


def test_services_resolve_from_atoll_toml(tmp_path):
    (tmp_path / "atoll.toml").write_text(
        '[services.orders]\napp = "x:y"\nport = 8090\n\n'
        '[services.catalog]\napp = "x:z"\nhost = "0.0.0.0"\nport = 8082\n'
    )
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "services_from": "atoll.toml",
                "upstreams": {"orders": {"service": "orders"}, "catalog": {"service": "catalog"}},
            }
        )
    )
    config = load_gateway_config(path, environ={"ATOLL__SERVICES__ORDERS__PORT": "9999"})
    assert config.upstreams["orders"].targets == (("127.0.0.1", 9999),)
    assert config.upstreams["catalog"].targets == (("127.0.0.1", 8082),)
    assert config.upstreams["orders"].source == "service:orders"


def test_a_service_with_several_instances_is_an_upstream_with_as_many_targets(tmp_path):
    (tmp_path / "atoll.toml").write_text(
        '[services.catalog]\napp = "x:z"\nport = 8082\ninstances = 3\n'
    )
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {"services_from": "atoll.toml", "upstreams": {"catalog": {"service": "catalog"}}}
        )
    )
    config = load_gateway_config(path, environ={})
    assert config.upstreams["catalog"].targets == (
        ("127.0.0.1", 8082),
        ("127.0.0.1", 8083),
        ("127.0.0.1", 8084),
    )
