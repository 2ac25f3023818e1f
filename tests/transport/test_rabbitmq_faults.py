"""The RabbitMQ transport under faults and bad input, on the real server.

The shared server is never restarted: a broker restart looks to clients like every
connection being cut (``TcpProxy.cut``) and new ones refused for a while (``block``).
"""

import asyncio
import logging
from collections import defaultdict

import aiormq
import pytest
from rabbitmq_helpers import (
    BASE_URL,
    delete_namespace,
    new_namespace,
    queue_exists,
    server_address,
    url,
)

from atoll._urls import URLError
from atoll.determinism import SystemClock
from atoll.testing import Recorder, TcpProxy, wait_until
from atoll.testing._transport_kit import message, number
from atoll.transport import (
    Ack,
    DeadLetter,
    Delivery,
    RedeliveryPolicy,
    Retry,
    TransportError,
    TransportUnavailableError,
    transport_from_url,
)
from atoll.transport.rabbitmq import RabbitMQSettings, RabbitMQTransport
from atoll.transport.rabbitmq._dead_letters import parse_dead_letter
from atoll.transport.rabbitmq._topology import Names, routing_key, slot_of
from support import write_certificates

pytestmark = pytest.mark.rabbitmq

clock = SystemClock()
PASSWORD = "s3cret-Passw0rd"


@pytest.fixture
async def namespace():
    """A namespace whose exchanges and queues are deleted after the test."""
    ns = new_namespace()
    groups: set[str] = set()
    yield ns, groups
    await delete_namespace(ns, groups)


@pytest.fixture
async def proxy():
    proxy = TcpProxy(*server_address())
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
async def transports():
    """Transports closed after the test."""
    made: list[RabbitMQTransport] = []
    yield made
    for transport in made:
        await transport.close()


def make(made, address, namespace, **options):
    transport = RabbitMQTransport.from_url(address(namespace, **options))
    made.append(transport)
    return transport


async def raw_channel():
    connection = await aiormq.connect(BASE_URL)
    return connection, await connection.channel(publisher_confirms=True)


# -- configuration by URL ---------------------------------------------------------------


def test_url_options_credentials_and_defaults(tmp_path, monkeypatch):
    settings = RabbitMQSettings.from_url(
        "amqp://alice:p%40ss@broker.example:5673/prod%2Feu?namespace=shop&partitions=8"
        "&prefetch=50&queue_type=classic&heartbeat=10"
    )
    assert (settings.host, settings.port, settings.vhost) == ("broker.example", 5673, "prod/eu")
    assert (settings.user, settings.password) == ("alice", "p@ss")
    assert (settings.namespace, settings.partitions, settings.prefetch) == ("shop", 8, 50)
    assert (settings.queue_type, settings.heartbeat, settings.tls) == ("classic", 10, None)
    assert "p@ss" not in repr(settings)
    assert settings.redacted == (
        "amqp://alice:***@broker.example:5673/prod%2Feu?namespace=shop"
        "&partitions=8&prefetch=50&queue_type=classic&heartbeat=10"
    )

    defaults = RabbitMQSettings.from_url("amqp://host", environ={})
    assert (defaults.user, defaults.password, defaults.port, defaults.vhost) == (
        "guest",
        "guest",
        5672,
        "/",
    )
    assert (defaults.namespace, defaults.partitions, defaults.queue_type) == ("atoll", 4, "quorum")

    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    from_file = RabbitMQSettings.from_url(f"amqp://bob@host/?password_file={secret}", environ={})
    assert (from_file.user, from_file.password) == ("bob", PASSWORD)

    monkeypatch.setenv("ATOLL_RABBITMQ_USER", "carol")
    monkeypatch.setenv("ATOLL_RABBITMQ_PASSWORD", PASSWORD)
    from_env = RabbitMQSettings.from_url("amqps://host")
    assert (from_env.user, from_env.password, from_env.port) == ("carol", PASSWORD, 5671)
    assert from_env.tls is not None, "amqps verifies the server with the system's CAs"


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("amqp://u:pw-in-url@h/?partitions=3", "partitions='3' is invalid"),
        ("amqp://u:pw-in-url@h/?partitions=32", "partitions='32' is invalid"),
        ("amqp://u:pw-in-url@h/?colour=blue", "unknown option(s) colour"),
        ("amqp://u:pw-in-url@h/?tls_ca=/ca.pem", "need amqps://"),
        ("amqps://u:pw-in-url@h/?tls_ca=/nonexistent/ca.pem", "TLS file not found"),
        ("amqps://u:pw-in-url@h/?tls_key=/k.pem", "tls_key needs tls_cert"),
        ("amqp://u:pw-in-url@h/?password_file=/etc/hostname", "not both"),
        ("amqp://u:pw-in-url@h/?user_file=/etc/hostname", "not both"),
        ("amqp://u:pw-in-url@h/?queue_type=stream", "queue_type='stream' is invalid"),
    ],
)
def test_bad_urls_name_the_problem_without_the_password(bad, says):
    with pytest.raises(URLError) as raised:
        RabbitMQSettings.from_url(bad)
    assert says in str(raised.value)
    assert "pw-in-url" not in str(raised.value)
    assert "u:***@h" in str(raised.value)


def test_an_unreadable_password_file_is_named():
    with pytest.raises(URLError, match="cannot read password_file /nonexistent"):
        RabbitMQSettings.from_url("amqp://u@h/?password_file=/nonexistent")


def test_transport_from_url_builds_the_rabbitmq_transport(tmp_path):
    transport = transport_from_url(url("ns-x"), base_dir=tmp_path)
    assert isinstance(transport, RabbitMQTransport)
    assert transport.names.exchange == "ns-x.topics"


# -- bad input: servers that are down, refuse us, or are not RabbitMQ ---------------------


async def test_an_unreachable_server_at_start_gives_one_clear_line_then_retries(
    proxy, namespace, caplog, tmp_path
):
    ns, _ = namespace
    secret = tmp_path / "password"
    secret.write_text("guest\n")  # the shared server's account, read from a file
    host, port = "127.0.0.1", proxy.port
    address = f"amqp://guest@{host}:{port}/?namespace={ns}&password_file={secret}"
    proxy.block()
    transport = RabbitMQTransport.from_url(address)
    caplog.set_level(logging.DEBUG)
    connecting = asyncio.get_running_loop().create_task(transport.connect())
    try:
        await wait_until(
            lambda: any(r.levelno >= logging.WARNING for r in caplog.records),
            timeout=10,
            what="the log line about the unreachable server",
        )
        await clock.sleep(1.0)  # several retries happen meanwhile
        assert not connecting.done()
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(lines) == 1, lines
        assert address in lines[0]
        assert f"tried {host}:{port}" in lines[0]
        assert "retrying" in lines[0]
        attempts = [r for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(attempts) >= 3, "it retries (quietly) while the server is down"
        proxy.unblock()
        await asyncio.wait_for(connecting, 15)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        connecting.cancel()
        await transport.close()


async def test_a_wrong_password_is_refused_at_once_with_a_clear_error(namespace, caplog):
    ns, _ = namespace
    transport = RabbitMQTransport.from_url(
        f"amqp://guest:{PASSWORD}@{server_address()[0]}:{server_address()[1]}/?namespace={ns}"
    )
    started = clock.monotonic()
    with pytest.raises(TransportError) as raised:
        await transport.connect()
    assert clock.monotonic() - started < 5, "a refusal is not retried"
    text = str(raised.value)
    assert "ACCESS_REFUSED" in text
    assert "user 'guest'" in text
    assert "password" in text
    assert PASSWORD not in text
    assert not isinstance(raised.value, TransportUnavailableError)
    assert not any(PASSWORD in r.getMessage() for r in caplog.records)
    await transport.close()


async def test_an_unknown_virtual_host_is_refused_with_a_clear_error(namespace):
    ns, _ = namespace
    host, port = server_address()
    transport = RabbitMQTransport.from_url(
        f"amqp://guest:guest@{host}:{port}/no-such-vhost?namespace={ns}"
    )
    with pytest.raises(TransportError, match="virtual host 'no-such-vhost'"):
        await transport.connect()
    await transport.close()


async def test_publishing_while_the_server_is_down_fails_fast_and_names_the_server(
    proxy, namespace, transports
):
    ns, groups = namespace
    groups.add("g")
    transport = make(transports, lambda n, **o: url(n, host="127.0.0.1", port=proxy.port, **o), ns)
    await transport.connect()
    await transport.declare("g", ["t"])
    proxy.block()
    started = clock.monotonic()
    with pytest.raises(TransportUnavailableError) as raised:
        await transport.publish([message("t", 1)])
    assert clock.monotonic() - started < 5
    assert f"127.0.0.1:{proxy.port}" in str(raised.value)
    assert "guest:***@" in str(raised.value)
    proxy.unblock()
    await transport.publish([message("t", 2)])


# -- topology -----------------------------------------------------------------------------


async def test_commands_wait_for_a_group_that_never_ran(namespace, transports):
    ns, groups = namespace
    groups.add("billing")
    transport = make(transports, url, ns)
    await transport.connect()
    await transport.publish([message("service.billing", n, key="k") for n in range(3)])
    assert await queue_exists(transport.names.partition("billing", 0))
    recorder = Recorder()
    await transport.subscribe("billing", ["service.billing"], recorder)
    await wait_until(lambda: len(recorder.acked) == 3, timeout=10, what="three commands")
    assert [number(d) for d in recorder.acked] == [0, 1, 2]


async def test_a_group_keeps_the_partition_count_it_was_created_with(namespace, transports):
    ns, groups = namespace
    groups.add("g")
    four = make(transports, url, ns, partitions=4)
    await four.connect()
    await four.declare("g", ["t"])
    eight = make(transports, url, ns, partitions=8)
    await eight.connect()
    with pytest.raises(TransportError, match="partitions=8"):
        await eight.declare("g", ["t"])
    two = make(transports, url, ns, partitions=2)
    await two.connect()
    with pytest.raises(TransportError, match="same partitions option"):
        await two.subscribe("g", ["t"], Recorder())
    # Declaring again with the same count is harmless (idempotent topology).
    again = make(transports, url, ns, partitions=4)
    await again.connect()
    await again.declare("g", ["t", "u"])


async def test_processes_creating_one_group_at_once_agree(namespace, transports):
    """A producer declaring a command's group while its service starts is no mismatch."""
    ns, groups = namespace
    racers = [make(transports, url, ns) for _ in range(3)]
    for racer in racers:
        await racer.connect()

    async def declare(racer, group, delay):
        await clock.sleep(delay)
        await racer.declare(group, ["t"])

    for round_ in range(12):
        group = f"g{round_}"
        groups.add(group)
        # Staggered so that one process looks while another is half-way through.
        await asyncio.gather(*(declare(r, group, i * round_ * 0.002) for i, r in enumerate(racers)))


async def test_routing_keys_spread_keys_over_slots_and_keep_each_key_in_one():
    assert slot_of("order-1", "a") == slot_of("order-1", "b")
    assert len({slot_of(f"k{i}", "x") for i in range(200)}) == 16
    assert routing_key("event.shop.OrderPlaced", 7) == "event.shop.OrderPlaced@7"
    names = Names("ns")
    assert names.group_of(names.partition("orders.v2", 3)) == "orders.v2"
    assert names.group_of(names.members("orders")) is None


# -- a foreign message on the queue -------------------------------------------------------


async def test_a_foreign_message_is_dead_lettered_by_the_runtime_and_the_consumer_goes_on(
    namespace, tmp_path
):
    from atoll.persistence import SQLiteDatabase  # noqa: PLC0415
    from atoll.service import ServiceRuntime  # noqa: PLC0415
    from atoll.testing._crash_kit import effects_done  # noqa: PLC0415
    from atoll.testing._crash_system import consumer, produce, producer  # noqa: PLC0415

    ns, groups = namespace
    groups.update({consumer.name, producer.name})

    def runtime(service):
        return ServiceRuntime(
            service,
            database=SQLiteDatabase(tmp_path / f"{service.name}.db"),
            transport=RabbitMQTransport.from_url(url(ns)),
            max_batch=16,
        )

    cons, prod = runtime(consumer), runtime(producer)
    await cons.start()
    await prod.start()
    connection, channel = await raw_channel()
    try:
        names = Names(ns)
        await produce(prod, 5)
        # Another system writes straight into a partition queue: not JSON, no message
        # id, odd header types.
        for index, (body, headers) in enumerate(
            [
                (b"\xff\xfe not an atoll envelope", None),
                (b'{"json": "but not an envelope"}', {"x-atoll-key": 42, "x-delivery-count": "x"}),
                (b"", {"x-atoll-topic": bytearray(b"\xff"), "x-atoll-key": bytearray(b"k1")}),
            ]
        ):
            await channel.basic_publish(
                body,
                routing_key=names.partition(consumer.name, index),
                properties=aiormq.spec.Basic.Properties(headers=headers, delivery_mode=2),
            )
        await produce(prod, 10)

        async def three_dead():
            return len(await cons.transport.dead_letters.list()) == 3

        await wait_until(three_dead, timeout=15, what="three dead letters")
        await wait_until(lambda: effects_done(cons.database, 10), timeout=15, what="10 effects")
        dead = await cons.transport.dead_letters.list()
        assert {d.group for d in dead} == {consumer.name}
        assert all(d.attempts == 1 for d in dead)
        assert all("envelope" in d.reason or "JSON" in d.reason for d in dead), [
            d.reason for d in dead
        ]
        assert {d.body for d in dead} == {
            b"\xff\xfe not an atoll envelope",
            b'{"json": "but not an envelope"}',
            b"",
        }
        assert cons.stats.dead_lettered == 3
        for record in dead:
            assert await cons.transport.dead_letters.purge(record.id)
    finally:
        await connection.close()
        await prod.stop()
        await cons.stop()


# -- the broker restarts mid-stream -------------------------------------------------------


class Inbox:
    """A handler that applies each message once (as a service's inbox does) and checks
    that each key's messages are applied in order."""

    def __init__(self, decide=None):
        self.applied: dict[str, Delivery] = {}
        self.order: dict[str, list[int]] = defaultdict(list)
        self.calls = 0
        self.duplicates = 0
        self._decide = decide

    async def __call__(self, batch):
        self.calls += 1
        outcomes = []
        failed = set()
        for d in batch:
            if d.key in failed:
                outcomes.append(Retry(error="held behind an earlier failure", count=False))
                continue
            if d.message_id in self.applied:
                self.duplicates += 1
                outcomes.append(Ack())
                continue
            outcome = await self._decide(self, d) if self._decide else Ack()
            if isinstance(outcome, Ack):
                self.applied[d.message_id] = d
                self.order[d.key].append(number(d))
            else:
                failed.add(d.key)
            outcomes.append(outcome)
        return outcomes

    def check(self, sent):
        assert set(self.applied) == {m.message_id for m in sent}, "a message was lost"
        for key, numbers in self.order.items():
            assert numbers == sorted(numbers), f"key {key} applied out of order: {numbers}"


async def test_a_broker_restart_while_a_batch_is_in_flight_and_a_retry_is_held(
    proxy, namespace, transports
):
    """The consumer's connection is cut while its handler runs a batch and while it holds a
    retry: the batch's effects are kept once (its redelivery is a duplicate), the held
    message comes back before any later message of its key, nothing is lost."""
    ns, groups = namespace
    groups.add("g")
    via_proxy = make(transports, lambda n, **o: url(n, host="127.0.0.1", port=proxy.port, **o), ns)
    direct = make(transports, url, ns)
    await via_proxy.connect()
    await direct.connect()
    held, in_batch, release = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def decide(inbox, d):
        if number(d) == 1 and d.attempt == 1:
            held.set()
            return Retry(error="not yet", delay=30.0)  # held far longer than the test
        if held.is_set() and not in_batch.is_set():
            # The first batch after the retry is held: block it until the cut.
            in_batch.set()
            await release.wait()
        return Ack()

    inbox = Inbox(decide)
    policy = RedeliveryPolicy(max_attempts=5)
    await via_proxy.subscribe("g", ["t"], inbox, policy=policy, max_batch=4)
    sent = [message("t", n, key=f"k{n % 3}") for n in range(60)]
    await direct.publish(sent)
    await asyncio.wait_for(in_batch.wait(), 10)
    proxy.cut()
    release.set()
    await wait_until(lambda: len(inbox.applied) == 60, timeout=20, what="every message applied")
    inbox.check(sent)
    assert inbox.duplicates >= 1, "the batch handled during the cut was not redelivered"
    first = inbox.applied[sent[1].message_id]
    assert first.attempt == 2, "the held retry came back from the broker, counted once"


async def test_a_broker_restart_while_publishing_loses_nothing(proxy, namespace, transports):
    """A publish cut before its confirms fails; publishing it again (as the outbox relay
    does) delivers every message, each key in order (duplicates are the inbox's job)."""
    ns, groups = namespace
    groups.add("g")
    via_proxy = make(transports, lambda n, **o: url(n, host="127.0.0.1", port=proxy.port, **o), ns)
    direct = make(transports, url, ns)
    await via_proxy.connect()
    await direct.connect()
    inbox = Inbox()
    await direct.subscribe("g", ["t"], inbox, max_batch=100)
    sent = [message("t", n, key=f"k{n % 5}") for n in range(3000)]
    failures = 0
    for start in range(0, len(sent), 1000):
        batch = sent[start : start + 1000]
        while True:
            publishing = asyncio.get_running_loop().create_task(via_proxy.publish(batch))
            if start == 1000 and not failures:
                # Cut while this batch is on its way: some confirmed, some not.
                await wait_until(
                    lambda: via_proxy._channel is not None and via_proxy._channel.confirmations,
                    timeout=5,
                    interval=0,
                    what="unconfirmed publishes",
                )
                proxy.cut()
            try:
                await publishing
                break
            except TransportUnavailableError:
                failures += 1
    assert failures == 1
    await wait_until(lambda: len(inbox.applied) == 3000, timeout=30, what="3000 messages")
    inbox.check(sent)


async def test_instances_take_over_the_partitions_of_one_that_stops(namespace, transports):
    ns, groups = namespace
    groups.add("g")
    transport = make(transports, url, ns, rebalance_interval=0.2)
    await transport.connect()
    log: list[Delivery] = []
    a, b = Recorder(log=log, pause=0.005), Recorder(log=log, pause=0.005)
    first = await transport.subscribe("g", ["t"], a, max_batch=5)
    await transport.subscribe("g", ["t"], b, max_batch=5)
    await transport.publish([message("t", n, key=f"k{n}") for n in range(100)])
    await wait_until(lambda: len(log) == 100, timeout=10, what="100 deliveries")
    assert a.acked, "the first instance handled nothing"
    assert b.acked, "the second instance was never given a partition"
    await first.stop()
    await transport.publish([message("t", n, key=f"k{n}") for n in range(100, 200)])
    await wait_until(lambda: len(log) == 200, timeout=10, what="100 more after one stopped")
    assert len({d.message_id for d in log}) == 200


# -- dead letters -------------------------------------------------------------------------


async def dead_count(transport):
    return len(await transport.dead_letters.list(limit=10_000))


async def test_listing_dead_letters_concurrently_loses_none(namespace, transports):
    ns, groups = namespace
    groups.add("g")
    parker = make(transports, url, ns)
    await parker.connect()
    recorder = Recorder(lambda d: DeadLetter(reason=f"bad {number(d)}"))
    await parker.subscribe("g", ["t"], recorder)
    await parker.publish([message("t", n) for n in range(20)])
    await wait_until(
        lambda: _equals(dead_count(parker), 20), timeout=10, what="twenty dead letters"
    )
    listers = [make(transports, url, ns, lock_timeout=20) for _ in range(3)]
    for lister in listers:
        await lister.connect()
    results = await asyncio.gather(
        *(lister.dead_letters.list(limit=100) for lister in listers for _ in range(3))
    )
    assert all(len(r) == 20 for r in results), [len(r) for r in results]
    assert {r.reason for r in results[0]} == {f"bad {n}" for n in range(20)}
    assert [r.dead_at for r in results[0]] == sorted(r.dead_at for r in results[0])
    assert await dead_count(parker) == 20


async def _equals(awaitable, expected):
    return await awaitable == expected


async def test_a_message_parked_twice_is_one_record_and_purged_whole(namespace, transports):
    """A crash between parking and acknowledging parks a message twice; both copies are
    one record, and purging it removes both."""
    ns, groups = namespace
    groups.add("g")
    transport = make(transports, url, ns)
    await transport.connect()
    recorder = Recorder(lambda _d: DeadLetter(reason="malformed"))
    await transport.subscribe("g", ["t"], recorder)
    twice = message("t", 1, key="k")
    await transport.publish([twice])
    await wait_until(lambda: len(recorder.deliveries) == 1, timeout=10, what="one delivery")
    await transport.publish([twice])  # the relay published it again after a crash
    await wait_until(lambda: len(recorder.deliveries) == 2, timeout=10, what="the duplicate")

    async def parked_twice():
        connection, channel = await raw_channel()
        try:
            declared = await channel.queue_declare(transport.names.dead_queue, passive=True)
            return declared.message_count == 2
        finally:
            await connection.close()

    await wait_until(parked_twice, timeout=10, what="two copies in the dead-letter queue")
    [record] = await transport.dead_letters.list()
    assert record.message_id == twice.message_id
    assert await transport.dead_letters.purge(record.id)
    assert await transport.dead_letters.list() == []
    assert not await parked_twice()


async def test_replay_delivers_to_the_dead_letters_group_only(namespace, transports):
    ns, groups = namespace
    groups.update({"a", "b"})
    transport = make(transports, url, ns)
    await transport.connect()
    fixed = False
    a = Recorder(lambda _d: Ack() if fixed else DeadLetter(reason="not yet"))
    b = Recorder()
    await transport.subscribe("a", ["t"], a)
    await transport.subscribe("b", ["t"], b)
    await transport.publish([message("t", 1, key="k")])

    async def parked():
        return len(await transport.dead_letters.list(group="a")) == 1

    await wait_until(parked, timeout=10, what="a dead letter of group a")
    [record] = await transport.dead_letters.list()
    fixed = True
    assert await transport.dead_letters.replay(record.id)
    await wait_until(lambda: len(a.acked) == 1, timeout=10, what="the replay")
    await clock.sleep(0.3)
    assert len(b.deliveries) == 1, "the replay reached another group"
    assert a.acked[0].attempt == 1
    assert a.acked[0].key == "k"


async def test_what_the_broker_dead_letters_itself_is_listed_with_its_reason(namespace, transports):
    """A message the broker drops (here: its TTL expired in the queue) lands with the dead
    letters, with the broker's reason and its group, and can be replayed to that group."""
    ns, groups = namespace
    groups.add("g")
    transport = make(transports, url, ns)
    await transport.connect()
    await transport.declare("g", ["t"])
    connection, channel = await raw_channel()
    try:
        await channel.basic_publish(
            b"payload",
            routing_key=transport.names.partition("g", 2),
            properties=aiormq.spec.Basic.Properties(
                message_id="m-expired",
                expiration="1",
                delivery_mode=2,
                headers={"x-atoll-topic": "t", "x-atoll-key": "k"},
            ),
        )
    finally:
        await connection.close()

    async def listed():
        return len(await transport.dead_letters.list()) == 1

    await wait_until(listed, timeout=10, what="the expired message in the dead letters")
    [record] = await transport.dead_letters.list()
    assert (record.group, record.topic, record.key) == ("g", "t", "k")
    assert record.message_id == "m-expired"
    assert "expired" in record.reason
    assert record.dead_at > 0
    recorder = Recorder()
    await transport.subscribe("g", ["t"], recorder)
    assert await transport.dead_letters.replay(record.id)
    await wait_until(lambda: len(recorder.acked) == 1, timeout=10, what="the replayed message")
    assert recorder.acked[0].body == b"payload"


async def test_a_busy_dead_letter_lock_is_waited_for_and_freed_by_a_dead_holder(
    namespace, transports
):
    ns, _ = namespace
    transport = make(transports, url, ns, lock_timeout=0.5)
    await transport.connect()
    holder = await aiormq.connect(BASE_URL)
    channel = await holder.channel()
    await channel.queue_declare(transport.names.dead_lock, exclusive=True)
    with pytest.raises(TransportError, match="busy: another process has held them"):
        await transport.dead_letters.list()
    await holder.close()  # the holder dies: the broker frees its exclusive queue
    assert await transport.dead_letters.list() == []


def test_dead_letter_records_are_read_from_any_message():
    names = Names("ns")
    odd = parse_dead_letter(names, {"x-atoll-key": 5}, None, b"raw")
    assert odd.id
    assert odd.message_id.startswith("amqp-")
    assert (odd.group, odd.key, odd.attempts) == ("", None, 0)
    assert "did not park" in odd.reason


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
async def tls_proxy(tmp_path):
    """A TLS endpoint (client certificate required) in front of the plain test server."""
    import ssl  # noqa: PLC0415

    write_certificates(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tmp_path / "ca.pem")
    context.load_cert_chain(tmp_path / "server.pem", tmp_path / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    pipes: set[asyncio.Task] = set()

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def accept(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection(*server_address())
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.ensure_future(pipe(reader, up_writer)),
            asyncio.ensure_future(pipe(up_reader, writer)),
        ):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(accept, "127.0.0.1", 0, ssl=context)
    yield tmp_path, server.sockets[0].getsockname()[1]
    server.close()
    for task in list(pipes):
        task.cancel()
    await asyncio.gather(*pipes, return_exceptions=True)
    await server.wait_closed()


async def test_amqps_with_a_private_ca_and_a_client_certificate(tls_proxy, namespace, transports):
    directory, port = tls_proxy
    ns, groups = namespace
    groups.add("g")
    address = (
        f"amqps://guest:guest@127.0.0.1:{port}/?namespace={ns}&tls_ca={directory / 'ca.pem'}"
        f"&tls_cert={directory / 'client.pem'}&tls_key={directory / 'client.key'}"
    )
    transport = RabbitMQTransport.from_url(address)
    transports.append(transport)
    await transport.connect()
    recorder = Recorder()
    await transport.subscribe("g", ["t"], recorder)
    await transport.publish([message("t", 1)])
    await wait_until(lambda: len(recorder.acked) == 1, timeout=10, what="a message over TLS")


async def test_amqps_refuses_a_server_its_ca_did_not_sign(tls_proxy, namespace):
    directory, port = tls_proxy
    ns, _ = namespace
    transport = RabbitMQTransport.from_url(
        f"amqps://guest:guest@127.0.0.1:{port}/?namespace={ns}"
        f"&tls_ca={directory / 'other-ca.pem'}&tls_cert={directory / 'client.pem'}"
        f"&tls_key={directory / 'client.key'}"
    )
    started = clock.monotonic()
    with pytest.raises(TransportError, match="TLS certificate was not accepted"):
        await transport.connect()
    assert clock.monotonic() - started < 5, "a refused certificate is not retried"
    await transport.close()


# -- a silent network ---------------------------------------------------------------------


class StallingProxy:
    """Forwards to the test server until :meth:`stall`; then nothing moves either way
    (not even a close), as on a network that silently drops packets."""

    def __init__(self):
        self.port = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self._server = None
        self._tasks: set[asyncio.Task] = set()
        self._writers = []

    async def start(self):
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _accept(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection(*server_address())
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src, dst):
        try:
            while data := await src.read(65536):
                await self.flowing.wait()
                dst.write(data)
                await dst.drain()
            await self.flowing.wait()
        except (ConnectionError, OSError):
            pass
        finally:
            dst.close()

    def stall(self):
        self.flowing.clear()

    def cut(self):
        """Reset every open connection (new ones still hang while stalled)."""
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def close(self):
        for writer in self._writers:
            writer.transport.abort()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def test_a_consumer_cut_off_silently_hands_out_nothing_the_broker_gave_away(
    namespace, transports
):
    """The broker drops a silent connection and gives its messages to the next instance;
    the silent instance must not go on handing out what it had buffered."""
    ns, groups = namespace
    groups.add("g")
    proxy = StallingProxy()
    await proxy.start()
    try:
        silent = make(
            transports,
            lambda n, **o: url(n, host="127.0.0.1", port=proxy.port, **o),
            ns,
            partitions=1,
            heartbeat=2,
        )
        healthy = make(transports, url, ns, partitions=1)
        await silent.connect()
        await healthy.connect()
        started, release = asyncio.Event(), asyncio.Event()
        handled: dict[str, list[int]] = {"silent": [], "healthy": []}

        async def slow(batch):
            handled["silent"].extend(number(d) for d in batch)
            started.set()
            await release.wait()
            return [Ack() for _ in batch]

        async def quick(batch):
            handled["healthy"].extend(number(d) for d in batch)
            return [Ack() for _ in batch]

        await silent.subscribe("g", ["t"], slow, max_batch=1)
        await healthy.subscribe("g", ["t"], quick)
        await healthy.publish([message("t", n, key="k") for n in range(6)])
        await asyncio.wait_for(started.wait(), 10)
        # 1..5 are in the silent instance's buffer now (prefetch); then the network dies.
        await clock.sleep(0.3)
        proxy.stall()
        await clock.sleep(2.0)  # past three quarters of the heartbeat timeout
        release.set()
        await wait_until(
            lambda: sorted(set(handled["healthy"])) == [0, 1, 2, 3, 4, 5],
            timeout=20,
            what="the healthy instance to take over the partition",
        )
        assert handled["silent"] == [0], "the silent instance handed out messages it had lost"
    finally:
        await proxy.close()


async def test_stopping_while_reconnecting_to_a_silent_network_does_not_wait(namespace, transports):
    ns, groups = namespace
    groups.add("g")
    proxy = StallingProxy()
    await proxy.start()
    try:
        transport = make(
            transports,
            lambda n, **o: url(n, host="127.0.0.1", port=proxy.port, **o),
            ns,
            connect_timeout=30,
        )
        await transport.connect()
        consumer = await transport.subscribe("g", ["t"], Recorder())
        proxy.stall()
        proxy.cut()
        await wait_until(lambda: consumer._rebuilding, timeout=10, what="a reconnection")
        await clock.sleep(0.2)  # now inside a connection attempt that hangs
        started = clock.monotonic()
        await asyncio.wait_for(consumer.stop(), 5)
        assert clock.monotonic() - started < 2
    finally:
        await proxy.close()


async def test_a_deleted_dead_letter_queue_is_an_error_then_declared_again(namespace, transports):
    ns, _ = namespace
    transport = make(transports, url, ns)
    await transport.connect()
    connection, channel = await raw_channel()
    await channel.queue_delete(transport.names.dead_queue)
    await connection.close()
    with pytest.raises(TransportError, match="NOT_FOUND"):
        await transport.dead_letters.list()
    assert await transport.dead_letters.list() == []
    assert await queue_exists(transport.names.dead_queue)


async def test_a_consumer_declares_its_queues_again_if_they_are_deleted(namespace, transports):
    ns, groups = namespace
    groups.add("g")
    transport = make(transports, url, ns)
    await transport.connect()
    recorder = Recorder()
    consumer = await transport.subscribe("g", ["t"], recorder)
    await transport.publish([message("t", 0)])
    await wait_until(lambda: len(recorder.acked) == 1, timeout=10, what="the first message")
    connection, channel = await raw_channel()
    for index in range(4):  # an operator deletes the group's queues
        await channel.queue_delete(transport.names.partition("g", index))
    await connection.close()

    async def consuming_again():
        if consumer._broken is not None:
            return False
        return all([await queue_exists(transport.names.partition("g", i)) for i in range(4)])

    await wait_until(consuming_again, timeout=10, what="the queues declared again")
    await transport.publish([message("t", n) for n in range(1, 6)])
    await wait_until(lambda: len(recorder.acked) == 6, timeout=10, what="messages after that")
