"""Configuring the Redis transport by URL (no server needed)."""

from __future__ import annotations

import pytest

from atoll._urls import URLError
from atoll.transport import transport_from_url
from atoll.transport.redis import RedisSettings, RedisTransport


def test_the_parts_and_options_of_a_url():
    s = RedisSettings.from_url(
        "redis://app:p%40ss@cache.internal:6380/3?namespace=shop&lease=5&poll_interval=0.5"
        "&trim_interval=2&connect_timeout=0&socket_timeout=3"
    )
    assert (s.host, s.port, s.db, s.username, s.password) == (
        "cache.internal",
        6380,
        3,
        "app",
        "p@ss",
    )
    assert (s.namespace, s.lease, s.poll_interval, s.trim_interval) == ("shop", 5, 0.5, 2)
    assert (s.connect_timeout, s.socket_timeout, s.tls) == (0, 3, False)
    assert s.display_url == (
        "redis://app:***@cache.internal:6380/3?namespace=shop&lease=5&poll_interval=0.5"
        "&trim_interval=2&connect_timeout=0&socket_timeout=3"
    )
    assert "p@ss" not in repr(s)


def test_defaults():
    s = RedisSettings.from_url("redis://localhost")
    assert (s.host, s.port, s.db, s.username, s.password) == ("localhost", 6379, 0, None, None)
    assert (s.namespace, s.lease, s.tls) == ("atoll", 30.0, False)


def test_the_password_from_a_file_or_the_environment(tmp_path, monkeypatch):
    secret = tmp_path / "redis-password"
    secret.write_text("from-file\n")
    assert RedisSettings.from_url(f"redis://h?password_file={secret}").password == "from-file"
    monkeypatch.setenv("SHOP_REDIS_PASSWORD", "from-env")
    s = RedisSettings.from_url("redis://app@h?password_env=SHOP_REDIS_PASSWORD")
    assert (s.username, s.password) == ("app", "from-env")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://:pw@h?password_env=X", "give the password one way"),
        ("redis://h?password_env=ATOLL_NO_SUCH_VARIABLE", "ATOLL_NO_SUCH_VARIABLE is not set"),
        ("redis://h?password_file=/nonexistent/secret", "cannot read password_file"),
        ("redis://h?tls_ca=/ca.pem", "need a rediss:// URL"),
        ("rediss://h?tls_cert=/c.pem", "tls_cert and tls_key go together"),
        ("redis://:pw@h?lease=0", "option lease='0' is invalid"),
        ("redis://:pw@h?namespace=a|b", "option namespace='a|b' is invalid"),
        ("redis://:pw@h?queue=x", "unknown option(s) queue"),
        ("redis://:pw@h/orders", "database number"),
    ],
)
def test_bad_urls_say_what_is_wrong_without_the_password(url, complaint):
    with pytest.raises(URLError) as caught:
        RedisSettings.from_url(url)
    assert complaint in str(caught.value)
    assert ":pw@" not in str(caught.value)


def test_rediss_takes_tls_files():
    s = RedisSettings.from_url("rediss://h:6390?tls_ca=/ca.pem&tls_cert=/c.pem&tls_key=/k.pem")
    assert (s.tls, s.tls_ca, s.tls_cert, s.tls_key) == (True, "/ca.pem", "/c.pem", "/k.pem")


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_transport_from_url_builds_the_redis_transport(tmp_path, scheme):
    transport = transport_from_url(f"{scheme}://u:secret@h:1/2?lease=2", base_dir=tmp_path)
    assert isinstance(transport, RedisTransport)
    assert transport.settings.lease == 2
    assert "secret" not in repr(transport)
