"""``nats://`` URLs: options, credentials and what is shown of them (no server needed)."""

import pytest

from atoll._urls import URLError
from atoll.transport import transport_from_url
from atoll.transport.nats import NatsSettings, NatsTransport
from atoll.transport.nats._names import from_header, header_value, partition_of, token
from atoll.transport.nats._settings import display_url


def test_defaults():
    s = NatsSettings.from_url("nats://127.0.0.1:4222", environ={})
    assert (s.server, s.namespace, s.partitions, s.ack_wait, s.lease) == (
        "nats://127.0.0.1:4222",
        "atoll",
        None,
        30.0,
        None,
    )
    assert s.credentials() == {}
    assert s.auth_method() == "no credentials"
    assert s.ssl_context() is None


def test_options():
    s = NatsSettings.from_url(
        "nats://h:5000?namespace=shop-1&partitions=4&ack_wait=1.5&lease=3&max_ack_pending=64"
        "&replicas=3&storage=memory&duplicate_window=30&connect_timeout=2&publish_timeout=4",
        environ={},
    )
    assert s.server == "nats://h:5000"
    assert (s.namespace, s.partitions, s.ack_wait, s.lease, s.max_ack_pending) == (
        "shop-1",
        4,
        1.5,
        3.0,
        64,
    )
    assert (s.replicas, s.storage, s.duplicate_window) == (3, "memory", 30.0)
    assert (s.connect_timeout, s.publish_timeout) == (2.0, 4.0)


@pytest.mark.parametrize(
    "query",
    [
        "namespace=has.dot",
        "namespace=",
        "partitions=0",
        "ack_wait=-1",
        "lease=zero",
        "storage=tape",
        "replicas=9",
        "tls=maybe",
        "colour=blue",
    ],
)
def test_bad_options_name_the_url_without_the_password(query):
    with pytest.raises(URLError) as raised:
        NatsSettings.from_url(f"nats://u:hunter2@h:4222?{query}", environ={})
    assert "hunter2" not in str(raised.value)
    assert "nats://u:***@h:4222" in str(raised.value)


def test_credentials_from_the_url():
    s = NatsSettings.from_url("nats://app:p%40ss@h:4222", environ={})
    assert s.credentials() == {"user": "app", "password": "p@ss"}
    assert "p@ss" not in repr(s)
    assert s.display == "nats://app:***@h:4222"


def test_a_bare_user_part_is_a_token_and_is_hidden():
    s = NatsSettings.from_url("nats://s3cr3t-token@h:4222", environ={})
    assert s.credentials() == {"token": "s3cr3t-token"}
    assert s.display == "nats://***@h:4222"
    assert display_url("nats://s3cr3t-token@h:4222") == "nats://***@h:4222"


def test_credentials_from_files_and_the_environment(tmp_path):
    (tmp_path / "pw").write_text("from-file\n")
    (tmp_path / "token").write_text("tok-file\n")
    (tmp_path / "app.creds").write_text("-----BEGIN NATS USER JWT-----\n")
    s = NatsSettings.from_url(f"nats://app@h?password_file={tmp_path}/pw", environ={})
    assert s.credentials() == {"user": "app", "password": "from-file"}
    s = NatsSettings.from_url("nats://app@h", environ={"ATOLL_NATS_PASSWORD": "envpw"})
    assert s.credentials() == {"user": "app", "password": "envpw"}
    assert s.display == "nats://***@h"  # a bare user part may be a token: never shown
    s = NatsSettings.from_url(f"nats://h?token_file={tmp_path}/token", environ={})
    assert s.credentials() == {"token": "tok-file"}
    s = NatsSettings.from_url(f"nats://h?creds={tmp_path}/app.creds", environ={})
    assert s.credentials() == {"user_credentials": f"{tmp_path}/app.creds"}
    assert s.auth_method() == f"credentials file {tmp_path}/app.creds"
    env = {"ATOLL_NATS_USER": "envuser", "ATOLL_NATS_PASSWORD": "envpw"}
    assert NatsSettings.from_url("nats://h", environ=env).credentials() == {
        "user": "envuser",
        "password": "envpw",
    }
    env = {"ATOLL_NATS_TOKEN": "envtok"}
    assert NatsSettings.from_url("nats://h", environ=env).credentials() == {"token": "envtok"}
    env = {"ATOLL_NATS_TOKEN": "envtok"}
    url_wins = NatsSettings.from_url("nats://u:p@h", environ=env)
    assert url_wins.credentials() == {"user": "u", "password": "p"}


def test_missing_files_are_named():
    with pytest.raises(URLError, match=r"creds file /nope/app\.creds does not exist"):
        NatsSettings.from_url("nats://h?creds=/nope/app.creds", environ={})
    with pytest.raises(URLError, match=r"tls_ca file /nope/ca\.pem does not exist"):
        NatsSettings.from_url("nats://h?tls_ca=/nope/ca.pem", environ={})
    with pytest.raises(URLError, match="tls_cert and tls_key go together"):
        NatsSettings.from_url("nats://h?tls_cert=/nope/c.pem", environ={})


def test_tls_options(tmp_path):
    s = NatsSettings.from_url("nats://h:4222?tls=true", environ={})
    assert s.tls
    assert s.server == "tls://h:4222"
    assert s.ssl_context() is not None
    (tmp_path / "ca.pem").write_text("not a certificate")
    s = NatsSettings.from_url(f"nats://h:4222?tls_ca={tmp_path}/ca.pem", environ={})
    assert s.tls
    with pytest.raises(Exception, match="cannot load the TLS files"):
        s.ssl_context()


def test_transport_from_url_builds_a_nats_transport(tmp_path):
    transport = transport_from_url("nats://u:pw@h:4222?namespace=x", base_dir=tmp_path)
    assert isinstance(transport, NatsTransport)
    assert transport.settings.namespace == "x"
    assert "pw" not in repr(transport)


def test_names_round_trip():
    assert token("crash-consumer") == "crash-consumer"
    assert token("a.b c") == "a=2Eb=20c"
    assert "." not in token("x" * 200)
    assert len(token("x" * 200)) <= 48
    assert token("x" * 200) != token("x" * 199)
    for value in ["plain", " edges ", "new\nline", "per%cent", "ünïcode", ""]:
        assert from_header(header_value(value)) == value
        assert "\n" not in header_value(value)
    assert partition_of("k", "id-1", 16) == partition_of("k", "id-2", 16)
    assert {partition_of(None, f"id-{n}", 16) for n in range(200)} == set(range(16))
