"""TLS termination on the public listener (``server.tls``)."""

import asyncio
import datetime as dt
import hashlib
import logging
import shutil
import socket
import ssl
import time
import urllib.parse

import httpx
import pytest
import websockets
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gateway_support import admin_url, base_config, raw_request, running_gateway, write_config
from prometheus_client.parser import text_string_to_metric_families

from atoll.config import ConfigError
from atoll.gateway import Gateway
from atoll.gateway._config import load_gateway_config
from atoll.gateway._tls import client_subject
from support import issue_certificate, write_certificates


def tls_config(tmp_path, stub, tls):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            server={"port": 8080, "access_log": False, "tls": tls},
        ),
    )


def client_context(certs, ca="ca.pem"):
    return ssl.create_default_context(cafile=str(certs / ca))


async def peer_certificate(port, context):
    """The certificate the listener presents to a new connection, DER-encoded."""
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


async def test_requests_over_tls_are_proxied_as_https(tmp_path, stub, certs):
    config = tls_config(tmp_path, stub, {"cert": "certs/server.pem", "key": "certs/server.key"})
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=client_context(certs)) as client,
    ):
        r = await client.get(f"https://127.0.0.1:{gw.port}/orders/7")
        assert r.status_code == 200
        assert r.json()["path"] == "/orders/7"
        assert stub.hits[-1]["headers"]["x-forwarded-proto"] == "https"
        # A client that does not trust the issuer is refused in the handshake.
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(verify=client_context(certs, "other-ca.pem")) as other:
                await other.get(f"https://127.0.0.1:{gw.port}/")
        # Plain HTTP on the TLS port: no answer, the connection is dropped, nothing crashes.
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient() as plain:
                await plain.get(f"http://127.0.0.1:{gw.port}/")
        r = await client.get(f"https://127.0.0.1:{gw.port}/still-serving")
        assert r.status_code == 200
        # When the certificate expires, for monitoring: the admin view and a gauge.
        from cryptography import x509  # noqa: PLC0415 - only this check reads certificates

        expires = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
        view = (await client.get(admin_url(gw, "/config"))).json()["tls"]
        assert view["not_after"] == expires.not_valid_after_utc.isoformat()
        assert view["min_version"] == "1.2"
        metrics = (await client.get(admin_url(gw, "/metrics"))).text
        [gauge] = [
            family
            for family in text_string_to_metric_families(metrics)
            if family.name == "atoll_gateway_tls_certificate_not_after_seconds"
        ]
        assert gauge.samples[0].value == expires.not_valid_after_utc.timestamp()


async def test_a_renewed_certificate_is_loaded_on_reload(tmp_path, stub, certs):
    config = tls_config(tmp_path, stub, {"cert": "certs/server.pem", "key": "certs/server.key"})
    async with running_gateway(config) as gw:
        context = client_context(certs)
        before = await peer_certificate(gw.port, context)
        renewed = tmp_path / "renewed"
        renewed.mkdir()
        write_certificates(renewed)  # a new CA and a new server certificate
        shutil.copy(renewed / "server.pem", certs / "server.pem")
        shutil.copy(renewed / "server.key", certs / "server.key")
        assert await gw.reload()
        after = await peer_certificate(gw.port, client_context(renewed))
        assert after != before
        # A pair that does not load (a key of another certificate) is refused, and the
        # listener keeps the certificate it had.
        shutil.copy(renewed / "client.key", certs / "server.key")
        assert not await gw.reload()
        assert "server.tls" in gw.last_reload_error
        assert await peer_certificate(gw.port, client_context(renewed)) == after


@pytest.mark.parametrize(
    ("tls", "key", "problem"),
    [
        ({"cert": "certs/server.pem"}, "server.tls.key", "is required"),
        ({"cert": "certs/missing.pem", "key": "certs/server.key"}, "server.tls.cert", "no such"),
        (
            {"cert": "certs/server.pem", "key": "certs/server.key", "min_version": "1.0"},
            "server.tls.min_version",
            "must be",
        ),
    ],
)
def test_bad_tls_settings_name_the_key(tmp_path, certs, tls, key, problem):
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump({"server": {"tls": tls}}))
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == key
    assert problem in str(info.value)


def test_a_key_that_does_not_match_is_refused_at_start(tmp_path, stub, certs):
    config = tls_config(tmp_path, stub, {"cert": "certs/server.pem", "key": "certs/client.key"})
    with pytest.raises(ConfigError) as info:
        Gateway(config, port=0, admin_port=0, watch_interval=None)
    assert info.value.key == "server.tls"
    assert "KEY_VALUES_MISMATCH" in str(info.value)


async def test_websockets_pass_through_over_tls(tmp_path, stub, certs):
    path = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "ws", "match": {"prefix": "/ws"}, "upstream": "a", "websocket": True}],
            server={
                "port": 8080,
                "access_log": False,
                "tls": {"cert": "certs/server.pem", "key": "certs/server.key"},
            },
        ),
    )
    loop = asyncio.get_running_loop()
    async with running_gateway(path) as gw:
        url = f"wss://127.0.0.1:{gw.port}/ws"
        async with websockets.connect(url, ssl=client_context(certs)) as ws:
            for text in ("hello", "x" * 100_000, "bye"):
                await ws.send(text)
                assert await ws.recv() == f"a:{text}"
            closing = loop.time()
        # TLS cannot half-close: the gateway ends the client's side when the instance
        # ends its own, so the close handshake finishes (not after the client's timeout).
        assert loop.time() - closing < 3


# --- client certificates (mutual TLS) ----------------------------------------------------


def mtls_config(tmp_path, stub, client_auth):
    return write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [
                {"name": "machines", "match": {"prefix": "/internal"}, "upstream": "a"},
                {
                    "name": "either",
                    "match": {"prefix": "/either"},
                    "upstream": "a",
                    "auth": ["api_key", "client_cert"],
                },
                {"name": "public", "match": {"prefix": "/"}, "upstream": "a"},
            ],
            server={
                "port": 8080,
                "access_log": False,
                "tls": {
                    "cert": "certs/server.pem",
                    "key": "certs/server.key",
                    "client_ca": "certs/ca.pem",
                    "client_auth": client_auth,
                },
            },
            auth={"api_keys": {"keys": [{"name": "ops", "key": "k-0123456789abcdef"}]}},
        ),
    )


def with_client_cert(certs, stem="client"):
    context = client_context(certs)
    context.load_cert_chain(certs / f"{stem}.pem", certs / f"{stem}.key")
    return context


async def test_required_client_certificates_identify_the_caller(tmp_path, stub, certs):
    config = mtls_config(tmp_path, stub, "required")
    text = config.read_text().replace(
        "upstream: a\n", "upstream: a\n  auth: [client_cert]\n", 1
    )  # the first route, /internal, takes client certificates only
    config.write_text(text)
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=with_client_cert(certs)) as client,
    ):
        r = await client.get(
            f"https://127.0.0.1:{gw.port}/internal/jobs",
            headers={"x-auth-subject": "CN=admin", "x-auth-cert-sha256": "00"},  # forged
        )
        assert r.status_code == 200
        seen = stub.hits[-1]["headers"]
        assert seen["x-auth-method"] == "client_cert"
        assert seen["x-auth-subject"] == "CN=atoll"
        assert seen["x-auth-client"] == "atoll"
        der = ssl.PEM_cert_to_DER_cert((certs / "client.pem").read_text())
        assert seen["x-auth-cert-sha256"] == hashlib.sha256(der).hexdigest()
        # Without a certificate, or with one another CA signed, no handshake at all.
        for verify in (client_context(certs), with_client_cert(certs, "stranger")):
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient(verify=verify) as other:
                    await other.get(f"https://127.0.0.1:{gw.port}/")
        r = await client.get(f"https://127.0.0.1:{gw.port}/still-serving")
        assert r.status_code == 200
        view = (await client.get(admin_url(gw, "/config"))).json()["tls"]
        assert view["client_auth"] == "required"
        assert view["client_ca"].endswith("ca.pem")


async def test_optional_client_certificates_are_one_credential_among_others(tmp_path, stub, certs):
    config = mtls_config(tmp_path, stub, "optional")
    text = config.read_text().replace("upstream: a\n", "upstream: a\n  auth: [client_cert]\n", 1)
    config.write_text(text)
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}"
        async with httpx.AsyncClient(verify=client_context(certs)) as anonymous:
            assert (await anonymous.get(f"{base}/catalog")).status_code == 200
            refused = await anonymous.get(f"{base}/internal/jobs")
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"
            assert "client certificate" in refused.json()["detail"]
            assert "www-authenticate" not in refused.headers
            missing = await anonymous.get(f"{base}/either")
            assert missing.status_code == 401
            assert "an API key or a client certificate" in missing.json()["detail"]
            keyed = await anonymous.get(
                f"{base}/either", headers={"x-api-key": "k-0123456789abcdef"}
            )
            assert keyed.status_code == 200
            assert stub.hits[-1]["headers"]["x-auth-method"] == "api_key"
        async with httpx.AsyncClient(verify=with_client_cert(certs)) as machine:
            assert (await machine.get(f"{base}/internal/jobs")).status_code == 200
            assert stub.hits[-1]["headers"]["x-auth-subject"] == "CN=atoll"
            assert (await machine.get(f"{base}/either")).status_code == 200
            assert stub.hits[-1]["headers"]["x-auth-method"] == "client_cert"
        # A certificate that does not verify fails the handshake, optional or not.
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(verify=with_client_cert(certs, "stranger")) as other:
                await other.get(f"{base}/catalog")


@pytest.mark.parametrize(
    ("tls", "routes_auth", "key", "problem"),
    [
        ({"client_auth": "optional"}, None, "server.tls.client_auth", "needs server.tls.client_ca"),
        (
            {"client_ca": "certs/ca.pem", "client_auth": "sometimes"},
            None,
            "server.tls.client_auth",
            "must be 'required' or 'optional'",
        ),
        ({"client_ca": "certs/nope.pem"}, None, "server.tls.client_ca", "no such file"),
        ({}, ["client_cert"], "routes[0].auth", "client_cert needs server.tls.client_ca"),
        (
            {"client_ca": "certs/ca.pem"},
            ["client_cert", "scoped"],
            "routes[0].scopes",
            "client certificates carry no scopes",
        ),
    ],
)
def test_bad_client_certificate_settings_name_the_key(  # noqa: PLR0917 - the parameters
    tmp_path, certs, tls, routes_auth, key, problem
):
    path = tmp_path / "gw.yaml"
    route = {"name": "r", "match": {"prefix": "/"}, "upstream": "a"}
    if routes_auth is not None:
        route["auth"] = [kind for kind in routes_auth if kind != "scoped"]
        if "scoped" in routes_auth:
            route["scopes"] = ["orders:read"]
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"tls": {"cert": "certs/server.pem", "key": "certs/server.key", **tls}},
                "upstreams": {"a": {"targets": ["127.0.0.1:9"]}},
                "routes": [route],
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key == key
    assert problem in str(info.value)


def test_a_ca_file_that_is_not_pem_is_refused_at_start(tmp_path, stub, certs):
    (certs / "junk.pem").write_text("not a certificate")
    config = mtls_config(tmp_path, stub, "required")
    config.write_text(config.read_text().replace("certs/ca.pem", "certs/junk.pem"))
    with pytest.raises(ConfigError) as info:
        Gateway(config, port=0, admin_port=0)
    assert info.value.key == "server.tls.client_ca"


async def test_a_reload_replaces_the_trusted_client_cas(tmp_path, stub, certs):
    config = mtls_config(tmp_path, stub, "required")
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        async with httpx.AsyncClient(verify=with_client_cert(certs)) as ours:
            assert (await ours.get(base)).status_code == 200
        # The CA is replaced: its clients are refused from the next handshake on, and the
        # new CA's are taken (OpenSSL's store only grows: a fresh context, not a reload
        # into the old one).
        config.write_text(config.read_text().replace("certs/ca.pem", "certs/other-ca.pem"))
        assert await gw.reload()
        with pytest.raises(httpx.HTTPError):
            async with httpx.AsyncClient(verify=with_client_cert(certs)) as ours:
                await ours.get(base)
        async with httpx.AsyncClient(verify=with_client_cert(certs, "stranger")) as theirs:
            assert (await theirs.get(base)).status_code == 200
        # Without client_ca (and client_cert routes) on the next reload, no certificate
        # is asked for.
        document = yaml.safe_load(config.read_text())
        del document["server"]["tls"]["client_ca"], document["server"]["tls"]["client_auth"]
        document["routes"][1]["auth"] = ["api_key"]
        config.write_text(yaml.safe_dump(document))
        assert await gw.reload(), gw.last_reload_error
        async with httpx.AsyncClient(verify=client_context(certs)) as anonymous:
            assert (await anonymous.get(base)).status_code == 200


async def test_a_mixed_route_challenges_with_the_scheme_it_takes(tmp_path, stub, certs):
    config = mtls_config(tmp_path, stub, "optional")
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=client_context(certs)) as anonymous,
    ):
        missing = await anonymous.get(f"https://127.0.0.1:{gw.port}/either")
        assert missing.status_code == 401
        assert missing.headers["www-authenticate"].startswith("ApiKey")


@pytest.mark.parametrize(
    ("peercert", "expected"),
    [
        ({"subject": ((("commonName", "atoll"),),)}, ("CN=atoll", "atoll")),
        (
            {
                "subject": (
                    (("countryName", "FR"),),
                    (("organizationName", "Shop, Inc."),),
                    (("commonName", "billing"), ("userId", "7")),
                )
            },
            ("CN=billing+UID=7,O=Shop\\, Inc.,C=FR", "billing"),
        ),
        # Control characters as hex, so that "a\nb" and "ab" are two subjects.
        # A common name with control characters would read as another once they are
        # stripped from a header: the escaped subject stands in for it.
        ({"subject": ((("commonName", "a\nb"),),)}, ("CN=a\\0Ab", "CN=a\\0Ab")),
        ({"subject": ((("commonName", "a\x00b"),),)}, ("CN=a\\00b", "CN=a\\00b")),
        ({"subject": ((("commonName", " "),),)}, ("CN=\\ ", " ")),
        ({"subject": ((("commonName", "#x "),),)}, ("CN=\\#x\\ ", "#x ")),
        (
            {"subject": ((("commonName", 'q"<>;=+\\'),),)},
            ('CN=q\\"\\<\\>\\;\\=\\+\\\\', 'q"<>;=+\\'),
        ),
        ({"subject": ((("commonName", "zoë"),),)}, ("CN=zoë", "zoë")),
        # SPIFFE: an empty subject, the id in a URI alternative name.
        (
            {"subject": (), "subjectAltName": (("DNS", "w.example"), ("URI", "spiffe://shop/w"))},
            ("spiffe://shop/w", "spiffe://shop/w"),
        ),
        ({"subject": (), "subjectAltName": ()}, None),
        (None, None),
    ],
)
def test_client_subjects_are_written_unambiguously(peercert, expected):
    assert client_subject(peercert) == expected


async def test_allow_subjects_admits_only_the_certificates_named(tmp_path, stub, certs):
    config = mtls_config(tmp_path, stub, "optional")
    document = yaml.safe_load(config.read_text())
    document["routes"][0]["auth"] = ["client_cert"]
    document["routes"][0]["allow_subjects"] = ["CN=atoll"]
    document["routes"][1]["allow_subjects"] = ["CN=*", "ops"]
    config.write_text(yaml.safe_dump(document))
    # A second client certificate from the trusted CA, under another name.
    from cryptography import x509  # noqa: PLC0415 - only this test issues one
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    other = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intruder")]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(ca.not_valid_before_utc)
        .not_valid_after(ca.not_valid_after_utc)
        .sign(ca_key, hashes.SHA256())
    )
    (certs / "intruder.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    (certs / "intruder.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}"
        async with httpx.AsyncClient(verify=with_client_cert(certs)) as atoll:
            assert (await atoll.get(f"{base}/internal/jobs")).status_code == 200
        async with httpx.AsyncClient(verify=with_client_cert(certs, "intruder")) as intruder:
            refused = await intruder.get(f"{base}/internal/jobs")
            assert refused.status_code == 403
            assert "'CN=intruder' may not use this route" in refused.json()["detail"]
            # The wildcard route takes any certificate subject, and the key named ops.
            assert (await intruder.get(f"{base}/either")).status_code == 200
        async with httpx.AsyncClient(verify=client_context(certs)) as keyed:
            ok = await keyed.get(f"{base}/either", headers={"x-api-key": "k-0123456789abcdef"})
            assert ok.status_code == 200
        async with httpx.AsyncClient() as admin:
            routes = (await admin.get(admin_url(gw, "/routes"))).json()["routes"]
        assert routes[0]["allow_subjects"] == ["CN=atoll"]


def test_allow_subjects_needs_auth_and_real_subjects(tmp_path):
    for route, key, problem in (
        ({"allow_subjects": ["CN=x"]}, "routes[0].allow_subjects", "needs auth"),
        (
            {"auth": ["api_key"], "allow_subjects": ["**"]},
            "routes[0].allow_subjects[0]",
            "must name a subject",
        ),
        (
            {"auth": ["api_key"], "allow_subjects": ["ops", "api_key:*"]},
            "routes[0].allow_subjects[1]",
            "must name a subject",
        ),
    ):
        path = tmp_path / "gw.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "upstreams": {"a": {"targets": ["127.0.0.1:9"]}},
                    "auth": {"api_keys": {"keys": [{"name": "ops", "key": "k-0123456789abcdef"}]}},
                    "routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "a", **route}],
                }
            )
        )
        with pytest.raises(ConfigError) as info:
            load_gateway_config(path)
        assert info.value.key == key
        assert problem in str(info.value)


# --- certificate revocation lists ----------------------------------------------------------


def issue_client(certs, stem, issuer="ca", *, subject=None, san=None):
    """Another client certificate, ``stem.pem``/``stem.key``, that ``issuer`` signed."""
    issue_certificate(certs, stem, issuer=issuer, subject=subject, san=san)


def write_crl(
    certs,
    name,
    revoked=(),
    *,
    issuer="ca",
    signer=None,
    hours=24,
    last_update_hours=-2,
    issuer_name=None,
):
    """``name``: a revocation list of ``issuer`` (signed with ``signer``'s key, the
    issuer's by default, and naming its issuer ``CN=issuer_name`` if given) naming the
    certificates ``revoked`` (their stems), whose next update is ``hours`` from now
    (negative: already past) and last update ``last_update_hours`` from now."""
    key = serialization.load_pem_private_key((certs / f"{signer or issuer}.key").read_bytes(), None)
    now = dt.datetime.now(dt.UTC)
    common_name = issuer if issuer_name is None else issuer_name
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .last_update(now + dt.timedelta(hours=last_update_hours))
        .next_update(now + dt.timedelta(hours=hours))
    )
    for stem in revoked:
        cert = x509.load_pem_x509_certificate((certs / f"{stem}.pem").read_bytes())
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(now - dt.timedelta(minutes=1))
            .build()
        )
    path = certs / name
    path.write_bytes(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    return path


def crl_config(tmp_path, stub, crl):
    config = mtls_config(tmp_path, stub, "required")
    document = yaml.safe_load(config.read_text())
    if crl is not None:
        document["server"]["tls"]["client_crl"] = f"certs/{crl}"
    config.write_text(yaml.safe_dump(document))
    return config


async def refused(certs, stem, url):
    """Whether a client with ``stem``'s certificate fails the handshake."""
    try:
        async with httpx.AsyncClient(verify=with_client_cert(certs, stem)) as client:
            await client.get(url)
    except httpx.HTTPError:
        return True
    return False


async def test_a_revoked_client_certificate_fails_the_handshake(tmp_path, stub, certs):
    issue_client(certs, "colleague")
    write_crl(certs, "crl.pem", revoked=["client"])
    async with running_gateway(crl_config(tmp_path, stub, "crl.pem")) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        assert await refused(certs, "client", base)
        async with httpx.AsyncClient(verify=with_client_cert(certs, "colleague")) as client:
            assert (await client.get(base)).status_code == 200
            view = (await client.get(admin_url(gw, "/config"))).json()["tls"]
            assert view["client_crl"].endswith("crl.pem")
            assert view["crl_issuers"] == ["CN=ca"]
            assert view["crl_next_update"] > dt.datetime.now(dt.UTC).isoformat()
            metrics = (await client.get(admin_url(gw, "/metrics"))).text
        gauges = {
            sample.name: sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
        }
        assert gauges["atoll_gateway_tls_crl_next_update_seconds"] > time.time() + 3600


async def test_a_reload_takes_a_new_revocation_list_and_can_drop_it(tmp_path, stub, certs):
    write_crl(certs, "crl.pem")
    config = crl_config(tmp_path, stub, "crl.pem")
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        assert not await refused(certs, "client", base)
        # The CA publishes a list that revokes the client: from the next handshake on.
        write_crl(certs, "crl.pem", revoked=["client"])
        assert await gw.reload(), gw.last_reload_error
        assert await refused(certs, "client", base)
        # Revocation checking turned off again: the listener's flags follow the config.
        document = yaml.safe_load(config.read_text())
        del document["server"]["tls"]["client_crl"]
        config.write_text(yaml.safe_dump(document))
        assert await gw.reload(), gw.last_reload_error
        assert not await refused(certs, "client", base)
        assert gw.tls_crl is None


async def test_an_expired_revocation_list_is_refused_and_the_old_one_kept(tmp_path, stub, certs):
    write_crl(certs, "crl.pem", revoked=["client"])
    async with running_gateway(crl_config(tmp_path, stub, "crl.pem")) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        write_crl(certs, "crl.pem", hours=-1)  # past its next update
        assert not await gw.reload()
        assert "server.tls.client_crl" in gw.last_reload_error
        assert "expired" in gw.last_reload_error
        assert await refused(certs, "client", base)  # the list in use still revokes it
    with pytest.raises(ConfigError) as info:
        Gateway(crl_config(tmp_path, stub, "crl.pem"), port=0, admin_port=0)
    assert info.value.key == "server.tls.client_crl"


async def test_a_ca_without_a_revocation_list_is_named_and_its_clients_refused(
    tmp_path, stub, certs, caplog
):
    (certs / "both.pem").write_bytes(
        (certs / "ca.pem").read_bytes() + (certs / "other-ca.pem").read_bytes()
    )
    write_crl(certs, "crl.pem")
    config = crl_config(tmp_path, stub, "crl.pem")
    config.write_text(config.read_text().replace("certs/ca.pem", "certs/both.pem"))
    with caplog.at_level(logging.WARNING, logger="atoll.gateway"):
        async with running_gateway(config) as gw:
            base = f"https://127.0.0.1:{gw.port}/catalog"
            assert not await refused(certs, "client", base)
            # OpenSSL needs the issuer's list: other-ca has none, so its client fails.
            assert await refused(certs, "stranger", base)
    assert any("no revocation list of CN=other-ca" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("tls", "make", "problem"),
    [
        ({"client_crl": "certs/crl.pem"}, None, "needs server.tls.client_ca"),
        ({"client_ca": "certs/ca.pem", "client_crl": "certs/nope.pem"}, None, "no such file"),
        (
            {"client_ca": "certs/ca.pem", "client_crl": "certs/client.pem"},
            None,
            "holds a CERTIFICATE block",
        ),
        (
            {"client_ca": "certs/ca.pem", "client_crl": "certs/crl.pem"},
            {"signer": "other-ca"},
            "is not signed by the key of that CA",
        ),
        (
            {"client_ca": "certs/ca.pem", "client_crl": "certs/crl.pem"},
            {"hours": -1},
            "expired at",
        ),
    ],
)
def test_bad_revocation_lists_name_the_key(  # noqa: PLR0917 - the parameters
    tmp_path, stub, certs, tls, make, problem
):
    write_crl(certs, "crl.pem", **(make or {}))
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
            server={
                "port": 8080,
                "tls": {"cert": "certs/server.pem", "key": "certs/server.key", **tls},
            },
        ),
    )
    with pytest.raises(ConfigError) as info:
        Gateway(config, port=0, admin_port=0)
    assert info.value.key == "server.tls.client_crl"
    assert problem in str(info.value)


# --- X-Forwarded-Client-Cert --------------------------------------------------------------


def xfcc_config(tmp_path, stub, fields):
    config = mtls_config(tmp_path, stub, "optional")
    document = yaml.safe_load(config.read_text())
    document["server"]["tls"]["forward_client_cert"] = fields
    config.write_text(yaml.safe_dump(document))
    return config


def xfcc_pairs(value):
    """``X-Forwarded-Client-Cert``'s pairs, unquoted, in order (one element)."""
    pairs, at = [], 0
    while at < len(value):
        key, _, rest = value[at:].partition("=")
        at += len(key) + 1
        if rest.startswith('"'):
            out, i = [], 1
            while rest[i] != '"':
                if rest[i] == "\\":
                    i += 1
                out.append(rest[i])
                i += 1
            pairs.append((key, "".join(out)))
            at += i + 2  # the closing quote and the ';'
        else:
            text = rest.split(";", 1)[0]
            pairs.append((key, text))
            at += len(text) + 1
    return pairs


async def test_the_client_certificate_is_forwarded_as_envoy_does(tmp_path, stub, certs):
    config = xfcc_config(tmp_path, stub, ["subject", "hash", "cert", "uri", "dns"])
    forged = {
        "x-forwarded-client-cert": 'Hash=00;Subject="CN=admin"',
        "x_forwarded_client_cert": "x",
    }
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        async with httpx.AsyncClient(verify=with_client_cert(certs)) as client:
            assert (await client.get(base, headers=forged)).status_code == 200
            seen = stub.hits[-1]["headers"]
            view = (await client.get(admin_url(gw, "/config"))).json()["tls"]
        assert view["forward_client_cert"] == ["hash", "cert", "subject", "uri", "dns"]
        pairs = xfcc_pairs(seen["x-forwarded-client-cert"])
        assert [key for key, _ in pairs] == ["Hash", "Cert", "Subject"]  # Envoy's order
        pem = (certs / "client.pem").read_text()
        assert dict(pairs) == {
            "Hash": hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest(),
            "Cert": urllib.parse.quote(
                ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(pem)), safe=""
            ),
            "Subject": "CN=atoll",
        }
        assert "x_forwarded_client_cert" not in seen
        # No certificate: no header, and the client's copy is still dropped.
        async with httpx.AsyncClient(verify=client_context(certs)) as anonymous:
            assert (await anonymous.get(base, headers=forged)).status_code == 200
        assert "x-forwarded-client-cert" not in stub.hits[-1]["headers"]


async def test_alternative_names_are_forwarded_and_quoted(tmp_path, stub, certs):
    issue_client(
        certs,
        "workload",
        subject=[],
        san=[
            x509.UniformResourceIdentifier("spiffe://shop.test/ns/prod/sa/billing"),
            x509.UniformResourceIdentifier("urn:x;y=1,2"),
            x509.DNSName("billing.shop.test"),
        ],
    )
    issue_client(
        certs,
        "quoted",
        subject=[
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, 'Shop "Inc"'),
            x509.NameAttribute(NameOID.COMMON_NAME, "a,b"),
        ],
    )
    config = xfcc_config(tmp_path, stub, ["subject", "uri", "dns"])
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        async with httpx.AsyncClient(verify=with_client_cert(certs, "workload")) as client:
            assert (await client.get(base)).status_code == 200
        value = stub.hits[-1]["headers"]["x-forwarded-client-cert"]
        assert value == (
            'Subject="";URI=spiffe://shop.test/ns/prod/sa/billing;URI="urn:x;y=1,2"'
            ";DNS=billing.shop.test"
        )
        assert xfcc_pairs(value)[2] == ("URI", "urn:x;y=1,2")
        async with httpx.AsyncClient(verify=with_client_cert(certs, "quoted")) as client:
            assert (await client.get(base)).status_code == 200
        pairs = xfcc_pairs(stub.hits[-1]["headers"]["x-forwarded-client-cert"])
        assert pairs == [("Subject", 'CN=a\\,b,O=Shop \\"Inc\\"')]  # RFC 4514, then quoted


async def test_a_reload_changes_the_forwarded_fields_on_open_connections(tmp_path, stub, certs):
    config = xfcc_config(tmp_path, stub, ["subject"])
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=with_client_cert(certs)) as client,
    ):
        base = f"https://127.0.0.1:{gw.port}/catalog"
        assert (await client.get(base)).status_code == 200
        assert stub.hits[-1]["headers"]["x-forwarded-client-cert"] == 'Subject="CN=atoll"'
        config.write_text(config.read_text().replace("- subject", "- hash"))
        assert await gw.reload(), gw.last_reload_error
        assert (await client.get(base)).status_code == 200  # the same connection
        assert stub.hits[-1]["headers"]["x-forwarded-client-cert"].startswith("Hash=")
        document = yaml.safe_load(config.read_text())
        del document["server"]["tls"]["forward_client_cert"]
        config.write_text(yaml.safe_dump(document))
        assert await gw.reload(), gw.last_reload_error
        assert (await client.get(base)).status_code == 200
        assert "x-forwarded-client-cert" not in stub.hits[-1]["headers"]


@pytest.mark.parametrize(
    ("tls", "problem"),
    [
        ({"forward_client_cert": ["hash"]}, "needs server.tls.client_ca"),
        (
            {"client_ca": "certs/ca.pem", "forward_client_cert": ["hash", "chain"]},
            "unknown field 'chain'",
        ),
        ({"client_ca": "certs/ca.pem", "forward_client_cert": [1]}, "must be a non-empty string"),
    ],
)
def test_bad_forward_client_cert_settings_name_the_key(tmp_path, certs, tls, problem):
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"tls": {"cert": "certs/server.pem", "key": "certs/server.key", **tls}},
                "upstreams": {"a": {"targets": ["127.0.0.1:9"]}},
                "routes": [{"name": "r", "match": {"prefix": "/"}, "upstream": "a"}],
            }
        )
    )
    with pytest.raises(ConfigError) as info:
        load_gateway_config(path)
    assert info.value.key.startswith("server.tls.forward_client_cert")
    assert problem in str(info.value)


def blocking_get(port, context, session=None):
    """One ``GET /catalog`` on a new TLS connection, resuming ``session`` if given:
    (the status line or the error, the session, whether it was resumed)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
            context.wrap_socket(sock, server_hostname="127.0.0.1", session=session) as tls,
        ):
            tls.sendall(b"GET /catalog HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            status = data.split(b"\r\n", 1)[0].decode() or "closed"
            return status, tls.session, tls.session_reused
    except (OSError, ssl.SSLError) as exc:
        return f"error: {exc}", None, False


async def test_sessions_checked_against_old_lists_are_not_resumed(tmp_path, stub, certs):
    write_crl(certs, "crl.pem")
    config = crl_config(tmp_path, stub, "crl.pem")
    tls12 = with_client_cert(certs)
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    tls13 = with_client_cert(certs)
    tls13.minimum_version = ssl.TLSVersion.TLSv1_3
    async with running_gateway(config) as gw:
        status, session12, _ = await asyncio.to_thread(blocking_get, gw.port, tls12)
        assert status == "HTTP/1.1 200 OK"
        # Resumption works while nothing changed (TLS 1.2 session ids)...
        status, _, reused = await asyncio.to_thread(blocking_get, gw.port, tls12, session12)
        assert (status, reused) == ("HTTP/1.1 200 OK", True)
        # ...and TLS 1.3 has nothing to resume: the listener issues no tickets.
        status, session13, _ = await asyncio.to_thread(blocking_get, gw.port, tls13)
        status, _, reused = await asyncio.to_thread(blocking_get, gw.port, tls13, session13)
        assert (status, reused) == ("HTTP/1.1 200 OK", False)
        write_crl(certs, "crl.pem", revoked=["client"])
        assert await gw.reload(), gw.last_reload_error
        # The session was checked against the old list: its resumption fails, and
        # OpenSSL forgets it, so the next attempt is a full handshake, which the list
        # refuses.
        for _ in range(2):
            status, _, _ = await asyncio.to_thread(blocking_get, gw.port, tls12, session12)
            assert status.startswith("error"), status
        assert gw.tls_failures == {
            "session resumed after the trusted CAs or revocation lists changed": 1,
            "certificate revoked": 1,
        }
        # A colleague's full handshake after the change, resumed: fine.
        issue_client(certs, "colleague")
        other = with_client_cert(certs, "colleague")
        other.maximum_version = ssl.TLSVersion.TLSv1_2
        status, session, _ = await asyncio.to_thread(blocking_get, gw.port, other)
        status, _, reused = await asyncio.to_thread(blocking_get, gw.port, other, session)
        assert (status, reused) == ("HTTP/1.1 200 OK", True)


async def test_open_connections_with_certificates_end_when_the_lists_change(tmp_path, stub, certs):
    write_crl(certs, "crl.pem")
    config = crl_config(tmp_path, stub, "crl.pem")
    async with running_gateway(config) as gw:
        base = f"https://127.0.0.1:{gw.port}/catalog"
        async with httpx.AsyncClient(verify=with_client_cert(certs)) as client:
            assert (await client.get(base)).status_code == 200
            # A reload that changes nothing about client certificates keeps them open.
            assert await gw.reload()
            assert not any(conn.closed for conn in gw.state.connections)
            write_crl(certs, "crl.pem", revoked=["client"])
            assert await gw.reload(), gw.last_reload_error
            (conn,) = gw.state.connections
            assert conn.closed  # closed while idle (the TLS close may still be going on)
            with pytest.raises(httpx.HTTPError):
                await client.get(base)  # a new connection: a full, refused handshake


async def test_a_name_with_control_characters_names_no_one(tmp_path, stub, certs):
    issue_client(
        certs,
        "tricky",
        subject=[],
        san=[
            x509.UniformResourceIdentifier("spiffe://shop.test/sa/bill\ring"),
            x509.UniformResourceIdentifier("spiffe://shop.test/sa/tricky"),
        ],
    )
    config = xfcc_config(tmp_path, stub, ["uri"])
    config.write_text(
        config.read_text().replace("upstream: a\n", "upstream: a\n  auth: [client_cert]\n", 1)
    )
    async with (
        running_gateway(config) as gw,
        httpx.AsyncClient(verify=with_client_cert(certs, "tricky")) as client,
    ):
        assert (await client.get(f"https://127.0.0.1:{gw.port}/internal/x")).status_code == 200
        seen = stub.hits[-1]["headers"]
        assert seen["x-forwarded-client-cert"] == "URI=spiffe://shop.test/sa/tricky"
        assert seen["x-auth-subject"] == "spiffe://shop.test/sa/tricky"


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        ("certificate", "holds a CERTIFICATE block"),
        ("future", "its last update is in the future"),
        ("text", "holds no revocation list"),
    ],
)
def test_crl_files_that_would_trust_or_refuse_too_much_are_refused(
    tmp_path, stub, certs, make, problem
):
    crl = write_crl(certs, "crl.pem")
    if make == "certificate":  # a CA smuggled in with the lists would be trusted
        crl.write_bytes(crl.read_bytes() + (certs / "other-ca.pem").read_bytes())
    elif make == "text":
        crl.write_text("not a revocation list")
    else:
        write_crl(certs, "crl.pem", hours=24, last_update_hours=1)
    with pytest.raises(ConfigError) as info:
        Gateway(crl_config(tmp_path, stub, "crl.pem"), port=0, admin_port=0)
    assert info.value.key == "server.tls.client_crl"
    assert problem in str(info.value)


def test_an_issuer_spelled_otherwise_is_matched_as_openssl_does(tmp_path, stub, certs, caplog):
    write_crl(certs, "crl.pem", issuer_name="  CA ", signer="ca")
    with caplog.at_level(logging.WARNING, logger="atoll.gateway"):
        gateway = Gateway(crl_config(tmp_path, stub, "crl.pem"), port=0, admin_port=0)
    assert gateway.tls_crl is not None
    assert gateway.tls_crl.uncovered == ()
    assert not any("no revocation list" in r.getMessage() for r in caplog.records)
    write_crl(certs, "crl.pem", issuer_name="CA", signer="other-ca")
    with pytest.raises(ConfigError) as info:
        Gateway(crl_config(tmp_path, stub, "crl.pem"), port=0, admin_port=0)
    assert "is not signed by the key of that CA" in str(info.value)


async def test_failed_handshakes_are_counted_and_logged_by_reason(tmp_path, stub, certs, caplog):
    write_crl(certs, "crl.pem", revoked=["client"])
    async with running_gateway(crl_config(tmp_path, stub, "crl.pem")) as gw:
        url = f"https://127.0.0.1:{gw.port}/catalog"
        with caplog.at_level(logging.WARNING, logger="atoll.gateway"):
            for _ in range(3):
                assert await refused(certs, "client", url)
            assert await refused(certs, "stranger", url)
            with pytest.raises(httpx.HTTPError):
                async with httpx.AsyncClient(verify=client_context(certs)) as anonymous:
                    await anonymous.get(url)
            await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", read_timeout=1)
        await asyncio.sleep(0.05)
        assert gw.tls_failures == {
            "certificate revoked": 3,
            "unable to get local issuer certificate": 1,
            "peer did not return a certificate": 1,
            "http request": 1,
        }
        lines = [r.getMessage() for r in caplog.records if "handshake failed" in r.getMessage()]
        assert len(lines) == 4  # once per reason, not once per handshake
        async with httpx.AsyncClient() as plain:
            metrics = (await plain.get(admin_url(gw, "/metrics"))).text
        assert (
            'atoll_gateway_tls_handshake_failures_total{reason="certificate revoked"} 3.0'
            in metrics
        )


async def test_a_websocket_with_a_client_certificate_ends_when_the_lists_change(
    tmp_path, stub, certs
):
    write_crl(certs, "crl.pem")
    config = crl_config(tmp_path, stub, "crl.pem")
    document = yaml.safe_load(config.read_text())
    document["routes"].insert(
        0, {"name": "ws", "match": {"prefix": "/ws"}, "upstream": "a", "websocket": True}
    )
    config.write_text(yaml.safe_dump(document))
    async with running_gateway(config) as gw:
        url = f"wss://127.0.0.1:{gw.port}/ws"
        async with websockets.connect(url, ssl=with_client_cert(certs)) as ws:
            await ws.send("hello")
            assert await ws.recv() == "a:hello"
            assert await gw.reload()  # nothing changed for certificates: it goes on
            await ws.send("again")
            assert await ws.recv() == "a:again"
            write_crl(certs, "crl.pem", revoked=["client"])
            assert await gw.reload(), gw.last_reload_error
            with pytest.raises(websockets.ConnectionClosed):
                async with asyncio.timeout(5):
                    await ws.send("after")
                    await ws.recv()
