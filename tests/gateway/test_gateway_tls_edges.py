"""The gateway's TLS at its edges (a review's findings; each test failed before its fix):
TLS 1.2 resumption, certbot-style renewals through symlinks, renewed upstream CAs,
common names with control characters, client_auth tightened, stalled handshakes."""

import asyncio
import contextlib
import shutil
import ssl
import time

import httpx
import yaml
from gateway_support import Stub, base_config, running_gateway, url, write_config
from test_gateway_tls import (
    blocking_get,
    client_context,
    issue_client,
    mtls_config,
    peer_certificate,
    tls_config,
    with_client_cert,
)

from support import write_certificates


async def test_tls12_session_resumption_works_without_client_certificates(tmp_path, stub, certs):
    config = tls_config(tmp_path, stub, {"cert": "certs/server.pem", "key": "certs/server.key"})
    tls12 = client_context(certs)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    async with running_gateway(config) as gw:
        status, session, _ = await asyncio.to_thread(blocking_get, gw.port, tls12)
        assert status == "HTTP/1.1 200 OK"
        # Nothing changed: resuming the session (a TLS 1.2 ticket) must just work.
        status, _, reused = await asyncio.to_thread(blocking_get, gw.port, tls12, session)
        assert (status, reused) == ("HTTP/1.1 200 OK", True), status
        assert gw.tls_failures == {}


async def test_a_certbot_style_renewal_through_a_symlink_is_picked_up(tmp_path, stub, certs):
    # certbot's layout: live/ holds symlinks into archive/, renewal adds files there
    # and re-points the links; the old files stay.
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    for name in ("server.pem", "server.key"):
        shutil.copy(certs / name, archive / f"1-{name}")
        (live / name).symlink_to(archive / f"1-{name}")
    config = tls_config(tmp_path, stub, {"cert": "live/server.pem", "key": "live/server.key"})
    async with running_gateway(config, watch_interval=0.05) as gw:
        before = await peer_certificate(gw.port, client_context(certs))
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        write_certificates(renewed)
        for name in ("server.pem", "server.key"):
            shutil.copy(renewed / name, archive / f"2-{name}")
            (live / f"{name}.new").symlink_to(archive / f"2-{name}")
            (live / f"{name}.new").replace(live / name)  # atomic re-point
        await asyncio.sleep(1)  # twenty watch intervals
        assert gw.reloads == 1, "the watch did not see the renewal"
        after = await peer_certificate(gw.port, client_context(renewed))
        assert after != before


async def test_a_renewed_upstream_ca_or_client_certificate_is_used_after_a_reload(tmp_path, certs):
    server = await Stub(
        "tls", tls={"certfile": str(certs / "server.pem"), "keyfile": str(certs / "server.key")}
    ).start()
    try:
        shutil.copy(certs / "other-ca.pem", certs / "upstream-ca.pem")  # the wrong CA
        config = write_config(
            tmp_path / "gw.yaml",
            base_config(
                {"a": {"targets": [server.address], "tls": {"ca": "certs/upstream-ca.pem"}}},
                [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            ),
        )
        async with running_gateway(config) as gw, httpx.AsyncClient() as client:
            assert (await client.get(url(gw, "/x"))).status_code == 502
            shutil.copy(certs / "ca.pem", certs / "upstream-ca.pem")  # the operator fixes it
            assert await gw.reload(), gw.last_reload_error  # SIGHUP
            assert (await client.get(url(gw, "/x"))).status_code == 200
    finally:
        await server.stop()


async def test_a_common_name_with_a_control_character_cannot_pass_for_another(
    tmp_path, stub, certs
):
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    issue_client(certs, "tricky", subject=[x509.NameAttribute(NameOID.COMMON_NAME, "bill\ring")])
    config = mtls_config(tmp_path, stub, "required")
    config.write_text(
        config.read_text().replace("upstream: a\n", "upstream: a\n  auth: [client_cert]\n", 1)
    )
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=with_client_cert(certs, "tricky")) as client,
    ):
        assert (await client.get(f"https://127.0.0.1:{gw.port}/internal/x")).status_code == 200
        seen = stub.hits[-1]["headers"]
        assert seen["x-auth-subject"] == "CN=bill\\0Ding"
        # The upstream must not read this client as "billing".
        assert seen["x-auth-client"] != "billing"


async def test_tightening_client_auth_to_required_ends_anonymous_connections(tmp_path, stub, certs):
    config = mtls_config(tmp_path, stub, "optional")
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=client_context(certs)) as anonymous,
    ):
        base = f"https://127.0.0.1:{gw.port}/catalog"
        assert (await anonymous.get(base)).status_code == 200
        document = yaml.safe_load(config.read_text())
        document["server"]["tls"]["client_auth"] = "required"
        config.write_text(yaml.safe_dump(document))
        assert await gw.reload(), gw.last_reload_error
        # A new connection without a certificate is refused in the handshake...
        async with httpx.AsyncClient(verify=client_context(certs)) as fresh:
            try:
                await fresh.get(base)
                refused_new = False
            except httpx.HTTPError:
                refused_new = True
        assert refused_new
        # ...but the one opened before keeps being served without one.
        r = None
        with contextlib.suppress(httpx.HTTPError):
            r = await anonymous.get(base)
        assert r is None or r.status_code != 200, "served without a client certificate"


async def test_a_stalled_handshake_is_not_held_past_the_idle_timeout(tmp_path, stub, certs):
    config = tls_config(tmp_path, stub, {"cert": "certs/server.pem", "key": "certs/server.key"})
    document = yaml.safe_load(config.read_text())
    document["server"]["idle_timeout"] = 1
    config.write_text(yaml.safe_dump(document))
    async with running_gateway(config) as gw:
        # A client that connects and never sends its ClientHello (or drips it).
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
        started = time.monotonic()
        try:
            async with asyncio.timeout(5):
                await reader.read(1)
            held = time.monotonic() - started
        except TimeoutError:
            held = None
        writer.close()
        assert held is not None, "the listener still holds the connection"
        assert held < 5
