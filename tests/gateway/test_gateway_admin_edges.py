"""The admin listener, metrics and access log at their edges (a review's findings; each test
failed before its fix): /readyz during a drain, the admin port's scans, counters across
reloads, one line and the right status for a defect, control characters in the console log."""

import asyncio
import contextlib
import logging

import httpx
import structlog
from gateway_support import admin_url, base_config, raw_request, running_gateway, url, write_config
from test_gateway_http2 import h2_config, raw_h2, raw_unchecked

from atoll.gateway import Gateway
from atoll.observability import configure_logging


async def test_readyz_answers_503_while_draining(tmp_path, stub):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        ),
    )
    gw = Gateway(path, port=0, admin_port=0, watch_interval=None)
    await gw.start()
    stub.release.clear()  # the upstream holds its answer: a request stays in flight
    async with httpx.AsyncClient(timeout=5) as client:
        held = asyncio.create_task(client.get(url(gw, "/slow")))
        while not stub.hits:
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(gw.stop(drain_timeout=5))
        await asyncio.sleep(0.2)  # draining now: the held request is still in flight
        assert not stopping.done()
        try:
            async with httpx.AsyncClient(timeout=2) as probe:  # a probe's fresh connection
                ready = await probe.get(admin_url(gw, "/readyz"))
            outcome = ready.status_code
        except httpx.HTTPError as exc:
            outcome = f"{type(exc).__name__}"
        finally:
            stub.release.set()
            with contextlib.suppress(Exception):
                await held
            await stopping
        assert outcome == 503, f"GET /readyz while draining: {outcome}"


async def test_garbage_on_the_admin_port_is_not_a_public_bad_request(tmp_path, stub):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        ),
    )
    async with running_gateway(path) as gw:
        for _ in range(5):
            await raw_request(gw.admin_port, b"\x16\x03\x01\x02\x00 hello\r\n\r\n", read_timeout=2)
        async with httpx.AsyncClient() as client:
            text = (await client.get(admin_url(gw, "/metrics"))).text
    [line] = [x for x in text.splitlines() if x.startswith("atoll_gateway_bad_requests_total")]
    assert line.endswith(" 0.0"), line


def _value(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


def _config(stub, route_name_suffix=""):
    return base_config(
        {"a": {"targets": [stub.address]}},
        [
            {"name": "a", "match": {"prefix": "/"}, "upstream": "a", "auth": "jwt"},
            # a second route, changed by the reload: nothing to do with auth
            {"name": "other", "match": {"prefix": "/other" + route_name_suffix}, "upstream": "a"},
        ],
        auth={"jwt": {"algorithms": ["HS256"], "hs256_secret": "s" * 40}},
    )


async def test_auth_failures_counter_survives_an_unrelated_reload(tmp_path, stub):
    path = write_config(tmp_path / "gw.yaml", _config(stub))
    series = 'atoll_gateway_auth_failures_total{reason="malformed"}'
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        for _ in range(3):
            r = await client.get(url(gw, "/x"), headers={"authorization": "Bearer nope"})
            assert r.status_code == 401
        before = _value((await client.get(admin_url(gw, "/metrics"))).text, series)
        assert before == 3
        # An unrelated change (another route's prefix) reloads the configuration.
        write_config(path, _config(stub, "2"))
        assert await gw.reload()
        after = _value((await client.get(admin_url(gw, "/metrics"))).text, series)
        # A Prometheus counter only goes down when the process restarts.
        assert after >= before, f"{series} went from {before} to {after} on a reload"


async def test_upstream_request_counter_survives_a_reload_that_tunes_the_upstream(tmp_path, stub):
    def cfg(max_idle):
        return base_config(
            {"a": {"targets": [stub.address], "pool": {"max_idle": max_idle}}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        )

    path = write_config(tmp_path / "gw.yaml", cfg(16))
    series = 'atoll_gateway_upstream_requests_total{upstream="a"}'
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.get(url(gw, "/x"))).status_code == 200
        before = _value((await client.get(admin_url(gw, "/metrics"))).text, series)
        assert before == 3
        write_config(path, cfg(32))  # a pool setting: the upstream is rebuilt
        assert await gw.reload()
        after = _value((await client.get(admin_url(gw, "/metrics"))).text, series)
        assert after >= before, f"{series} went from {before} to {after} on a reload"


async def test_policy_counters_survive_a_reload_that_rebuilds_the_upstream(tmp_path, stub):
    def cfg(max_idle):
        breaker = {"window_size": 100, "minimum_calls": 50, "failure_rate": 0.5, "wait": 5}
        return base_config(
            {
                "a": {
                    "targets": [stub.address],
                    "pool": {"max_idle": max_idle},
                    "policy": {"breaker": breaker},
                }
            },
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        )

    path = write_config(tmp_path / "gw.yaml", cfg(16))
    series = 'atoll_breaker_calls_total{breaker="a",outcome="success"}'
    async with running_gateway(path) as gw, httpx.AsyncClient() as client:
        for _ in range(3):
            assert (await client.get(url(gw, "/x"))).status_code == 200
        before = _value((await client.get(admin_url(gw, "/metrics"))).text, series)
        assert before == 3, series
        old_breaker = gw.gen.upstreams["a"].breaker
        write_config(path, cfg(32))  # a pool setting: the upstream and its breaker are new
        assert await gw.reload()
        assert gw.gen.upstreams["a"].breaker is not old_breaker
        assert (await client.get(url(gw, "/x"))).status_code == 200
        after = _value((await client.get(admin_url(gw, "/metrics"))).text, series)
        assert after == 4, f"{series} went from {before} to {after} across a reload"


async def test_an_error_while_proxying_is_one_500_line_and_a_500_in_the_metrics(
    tmp_path, stub, monkeypatch
):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "item", "match": {"prefix": "/items"}, "upstream": "a"}],
            server={"port": 8080, "access_log": True},
        ),
    )
    async with running_gateway(path) as gw:

        async def broken(*args, **kwargs):
            raise RuntimeError("a bug while proxying")

        monkeypatch.setattr(gw, "_proxy", broken)
        with structlog.testing.capture_logs() as logs:
            answer = await raw_request(
                gw.port, b"GET /items/1 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
            )
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(admin_url(gw, "/metrics"))).text
    assert answer.startswith(b"HTTP/1.1 500"), answer[:100]
    lines = [(e["status"], e["path"]) for e in logs if e.get("event") == "request"]
    assert lines == [(500, "/items/1")], lines
    assert 'atoll_gateway_requests_total{code="500",route="item"} 1.0' in metrics, [
        x for x in metrics.splitlines() if x.startswith("atoll_gateway_requests_total")
    ]


async def test_an_h2_path_with_an_escape_sequence_is_not_logged_raw(tmp_path, stub, capsys):
    path = h2_config(tmp_path, stub, server={"access_log": True})
    # What `python -m atoll.gateway` picks on a terminal, and what `atoll up` sets.
    configure_logging(service="gateway", fmt="console")
    try:
        async with running_gateway(path) as gw, raw_h2(gw.port) as raw:
            raw_unchecked(raw)
            headers = dict(raw.request_headers("/x"))
            # ESC [2J clears the screen; ESC ]0;...BEL retitles the terminal.
            headers[b":path"] = b"/x\x1b[2J\x1b]0;pwned\x07"
            stream_id = raw.conn.get_next_available_stream_id()
            raw.conn.send_headers(stream_id, list(headers.items()), end_stream=True)
            await raw.flush()
            response = await raw.response(stream_id)
            assert response.status == 400
        err = capsys.readouterr().err
    finally:
        logging.getLogger().handlers.clear()
    assert "status=400" in err
    assert "\x1b" not in err, repr(err[-400:])
    assert "\x07" not in err, repr(err[-400:])
