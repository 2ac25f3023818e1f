"""Faults of the Redis server itself, each on a redis-server of the test's own.

The shared server on 6379 keeps nothing on disk and is never restarted by tests.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis_support import RedisServer, free_port, redis_server, url_for

from atoll.persistence import SQLiteDatabase
from atoll.service import ServiceRuntime
from atoll.testing import Recorder, wait_until
from atoll.testing._crash_kit import check_exactly_once, effects_done
from atoll.testing._crash_system import consumer, produce, producer
from atoll.testing._transport_kit import message
from atoll.transport import TransportError, TransportUnavailableError
from atoll.transport.redis import RedisTransport
from support import write_certificates

pytestmark = pytest.mark.redis

NS = "atoll-fault"


def runtime(role: str, tmp_path, url: str, max_batch: int = 16) -> ServiceRuntime:
    return ServiceRuntime(
        producer if role == "producer" else consumer,
        database=SQLiteDatabase(tmp_path / f"{role}.db"),
        transport=RedisTransport.from_url(url),
        max_batch=max_batch,
        relay_batch=16,
    )


async def test_the_server_is_killed_and_restarts_mid_stream_and_nothing_is_lost_or_doubled(
    tmp_path,
):
    count = 300
    with redis_server(tmp_path / "redis", appendonly=True) as server:
        url = url_for(NS, server.url, lease=1)
        cons, prod = runtime("consumer", tmp_path, url), runtime("producer", tmp_path, url)
        await cons.start()
        await prod.start()
        try:
            producing = asyncio.get_running_loop().create_task(produce(prod, count))
            await wait_until(lambda: effects_done(cons.database, 30), what="the stream to run")
            # The consumer goes away for a while: the rest piles up in Redis, published
            # and gone from the producer's outbox, so only Redis has it.
            await cons.stop()
            await asyncio.wait_for(producing, 60)

            async def outbox_empty() -> bool:
                pending, _, _ = await prod.database.outbox_stats()
                return pending == 0

            await wait_until(outbox_empty, what="everything published")
            # Back with one message per batch, so it is still working through the
            # backlog (entries in flight, keys locked) when Redis dies.
            cons = runtime("consumer", tmp_path, url, max_batch=1)
            await cons.start()
            await wait_until(lambda: effects_done(cons.database, 60), what="the backlog to start")
            await server.akill()
            assert not await effects_done(cons.database, count), "nothing was left in Redis"
            await asyncio.sleep(0.3)  # the consumer and relay fail and back off meanwhile
            await server.astart()
            await wait_until(
                lambda: effects_done(cons.database, count),
                timeout=60,
                what="every message after the restart",
            )
            await check_exactly_once(cons.database, count, cons.transport)
        finally:
            await prod.stop()
            await cons.stop()


async def test_a_server_without_an_append_only_file_is_reported_and_survived(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="atoll.transport")
    with redis_server(tmp_path / "redis", appendonly=False) as server:
        transport = RedisTransport.from_url(url_for(NS, server.url, lease=1))
        await transport.connect()
        try:
            warnings = [r.getMessage() for r in caplog.records if "appendonly no" in r.getMessage()]
            assert len(warnings) == 1
            assert server.url in warnings[0]
            recorder = Recorder()
            await transport.subscribe("g", ["event.e"], recorder)
            await transport.publish([message("event.e", 1)])
            await wait_until(lambda: len(recorder.acked) == 1, what="the first message")
            # A restart that kept nothing: streams, groups and locks are gone. What was
            # handled stays handled; the consumer recreates its group and goes on.
            await server.akill()
            await server.astart()

            async def publish_again() -> bool:
                try:
                    await transport.publish([message("event.e", 2)])
                except TransportUnavailableError:
                    return False
                return True

            await wait_until(publish_again, what="publishing after the restart")
            await wait_until(lambda: len(recorder.acked) == 2, what="the message after it")
        finally:
            await transport.close()


async def test_an_unreachable_server_is_reported_once_then_retried_until_it_comes(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="atoll.transport")
    port = free_port()
    secret = "s3cret-pw"
    transport = RedisTransport.from_url(
        f"redis://:{secret}@127.0.0.1:{port}/0?namespace={NS}&connect_timeout=30"
    )
    connecting = asyncio.get_running_loop().create_task(transport.connect())
    try:

        def reported() -> bool:
            return any("cannot reach Redis" in r.getMessage() for r in caplog.records)

        await wait_until(reported, what="the unreachable server to be reported")
        await asyncio.sleep(0.5)  # several attempts fail meanwhile
        server = RedisServer(tmp_path / "redis", port=port, extra=("--requirepass", secret))
        await server.astart()
        try:
            await asyncio.wait_for(connecting, 30)
            await transport.publish([message("event.e", 1)])
        finally:
            server.kill()
    finally:
        await transport.close()
    lines = [r.getMessage() for r in caplog.records if "cannot reach Redis" in r.getMessage()]
    assert len(lines) == 1, lines
    assert f"redis://:***@127.0.0.1:{port}/0" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0].split(";")[0].split(": ", 1)[1], "what was tried"
    assert "retrying with backoff" in lines[0]
    assert any("reached Redis" in r.getMessage() for r in caplog.records)
    assert not [r for r in caplog.records if secret in r.getMessage()]


async def test_giving_up_on_an_unreachable_server_names_it_without_the_password():
    port = free_port()
    transport = RedisTransport.from_url(
        f"redis://app:hunter2@127.0.0.1:{port}/0?namespace={NS}&connect_timeout=0.3"
    )
    with pytest.raises(TransportUnavailableError) as caught:
        await transport.connect()
    text = str(caught.value)
    assert f"redis://app:***@127.0.0.1:{port}/0" in text
    assert "unreachable" in text
    assert "tried" in text
    assert "hunter2" not in text


@pytest.mark.parametrize(
    ("credentials", "error"), [(":wrong-pw@", "WRONGPASS"), ("", "NOAUTH")], ids=["wrong", "none"]
)
async def test_a_wrong_or_missing_password_is_a_clear_error_at_once(tmp_path, credentials, error):
    with redis_server(tmp_path / "redis", extra=("--requirepass", "right-pw")) as server:
        url = f"redis://{credentials}127.0.0.1:{server.port}/0?namespace={NS}&connect_timeout=30"
        transport = RedisTransport.from_url(url)
        with pytest.raises(TransportError) as caught:
            await asyncio.wait_for(transport.connect(), 5)
    assert not isinstance(caught.value, TransportUnavailableError), "retrying cannot fix this"
    text = str(caught.value)
    assert "refused the credentials" in text
    assert error in text
    assert "wrong-pw" not in text
    assert "right-pw" not in text


async def test_tls_with_client_certificates(tmp_path):
    directory = tmp_path / "certs"
    directory.mkdir()
    write_certificates(directory)  # a CA, a server (127.0.0.1) and a client certificate
    certs = {
        "ca.crt": directory / "ca.pem",
        "server.crt": directory / "server.pem",
        "server.key": directory / "server.key",
        "client.crt": directory / "client.pem",
        "client.key": directory / "client.key",
    }
    tls = (
        "--tls-cert-file", str(certs["server.crt"]),
        "--tls-key-file", str(certs["server.key"]),
        "--tls-ca-cert-file", str(certs["ca.crt"]),
        "--tls-auth-clients", "yes",
    )  # fmt: skip
    with redis_server(tmp_path / "redis", tls=True, extra=tls) as server:
        url = url_for(
            NS,
            server.url,
            tls_ca=certs["ca.crt"],
            tls_cert=certs["client.crt"],
            tls_key=certs["client.key"],
        )
        transport = RedisTransport.from_url(url)
        await transport.connect()
        try:
            recorder = Recorder()
            await transport.subscribe("g", ["event.e"], recorder)
            await transport.publish([message("event.e", 1)])
            await wait_until(lambda: len(recorder.acked) == 1, what="a message over TLS")
        finally:
            await transport.close()
        # Without a client certificate the server refuses the handshake.
        anonymous = RedisTransport.from_url(
            url_for(NS, server.url, tls_ca=certs["ca.crt"], connect_timeout=0.3)
        )
        with pytest.raises(TransportUnavailableError, match="unreachable"):
            await anonymous.connect()
