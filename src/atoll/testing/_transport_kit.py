"""The transport conformance kit: every backend's tests subclass :class:`TransportConformance`."""

from __future__ import annotations

import abc
import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from atoll.determinism import RandomSource, SystemClock
from atoll.testing._waiting import wait_until
from atoll.transport import (
    Ack,
    DeadLetter,
    Delivery,
    Outcome,
    OutgoingMessage,
    RedeliveryPolicy,
    Retry,
    Transport,
)

_clock = SystemClock()
_random = RandomSource()


class Recorder:
    """A batch handler that records deliveries and answers with a chosen outcome."""

    def __init__(
        self,
        decide: Callable[[Delivery], Outcome] | None = None,
        *,
        pause: float = 0.0,
        log: list[Delivery] | None = None,
    ) -> None:
        self.deliveries: list[Delivery] = []
        self.acked: list[Delivery] = []
        #: Acknowledged deliveries in handling order, shareable between recorders.
        self.log: list[Delivery] = log if log is not None else []
        self._decide = decide or (lambda _d: Ack())
        self._pause = pause

    async def __call__(self, batch: Sequence[Delivery]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        failed_keys: set[str] = set()
        for d in batch:
            if d.key is not None and d.key in failed_keys:
                # A batch may hold several messages of one key: after one fails, the rest
                # go back untried, as the Transport contract asks of handlers.
                outcomes.append(Retry(error="held behind an earlier failure", count=False))
                continue
            self.deliveries.append(d)
            outcome = self._decide(d)
            if not isinstance(outcome, Ack) and d.key is not None:
                failed_keys.add(d.key)
            if isinstance(outcome, Ack):
                self.acked.append(d)
                self.log.append(d)
            outcomes.append(outcome)
        if self._pause:
            await _clock.sleep(self._pause)
        return outcomes

    def ids(self) -> list[str]:
        """Message ids of every delivery, in order."""
        return [d.message_id for d in self.deliveries]


def message(topic: str, n: int, key: str | None = None) -> OutgoingMessage:
    """A test message whose body records its number."""
    return OutgoingMessage(topic, f"m-{n}-{_random.new_id()}", key, f"body-{n}".encode())


def number(delivery: Delivery) -> int:
    """The number a :func:`message` body carries."""
    return int(delivery.body.decode().rsplit("-", 1)[1])


class TransportConformance(abc.ABC):
    """Checks every point of the :class:`atoll.transport.Transport` contract.

    Subclass it in a test module and implement :meth:`make_transport`::

        class TestSQLiteTransport(TransportConformance):
            async def make_transport(self, tmp_path):
                return SQLiteTransport(tmp_path / "bus.db", lease=1.0)

    The transport's lease (or ack wait) should be short (about one second) so that the
    test of a consumer dying without settling runs quickly.
    """

    #: Seconds to wait for deliveries before a test fails.
    timeout: float = 15.0

    @abc.abstractmethod
    async def make_transport(self, tmp_path: Path) -> Transport:
        """A new, unconnected transport with its own empty topics and groups."""

    @pytest.fixture
    async def transport(self, tmp_path: Path) -> AsyncIterator[Transport]:
        """A connected transport, closed after the test."""
        transport = await self.make_transport(tmp_path)
        await transport.connect()
        try:
            yield transport
        finally:
            await transport.close()

    def topic(self, name: str) -> str:
        """A topic name unique to this test run (brokers may share state across tests)."""
        return f"{name}-{self._run_id}"

    def group(self, name: str) -> str:
        """A group name unique to this test run."""
        return f"{name}-{self._run_id}"

    @pytest.fixture(autouse=True)
    def _unique_names(self) -> None:
        self._run_id = _random.new_id()[-10:]

    async def wait_for(self, condition: Callable[[], bool], what: str) -> None:
        """Wait for ``condition`` within this kit's timeout."""
        await wait_until(condition, timeout=self.timeout, what=what)

    # -- delivery -------------------------------------------------------------------------

    async def test_delivers_a_published_message(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        recorder = Recorder()
        await transport.subscribe(group, [topic], recorder)
        sent = message(topic, 1, key="k")
        await transport.publish([sent])
        await self.wait_for(lambda: len(recorder.acked) == 1, "one delivery")
        got = recorder.deliveries[0]
        assert (got.message_id, got.key, got.body, got.topic, got.group, got.attempt) == (
            sent.message_id,
            "k",
            sent.body,
            topic,
            group,
            1,
        )

    async def test_messages_wait_for_a_subscribed_group_that_is_down(
        self, transport: Transport
    ) -> None:
        topic, group = self.topic("t"), self.group("g")
        first = Recorder()
        consumer = await transport.subscribe(group, [topic], first)
        await consumer.stop()
        await transport.publish([message(topic, n) for n in range(5)])
        second = Recorder()
        await transport.subscribe(group, [topic], second)
        await self.wait_for(lambda: len(second.acked) == 5, "five deliveries after restart")
        assert first.deliveries == []

    async def test_fans_out_to_every_group(self, transport: Transport) -> None:
        topic = self.topic("t")
        a, b = Recorder(), Recorder()
        await transport.subscribe(self.group("a"), [topic], a)
        await transport.subscribe(self.group("b"), [topic], b)
        sent = [message(topic, n) for n in range(20)]
        await transport.publish(sent)
        await self.wait_for(lambda: len(a.acked) == 20 and len(b.acked) == 20, "both groups")
        assert sorted(a.ids()) == sorted(m.message_id for m in sent) == sorted(b.ids())

    async def test_a_group_gets_only_its_topics(self, transport: Transport) -> None:
        mine, other = self.topic("mine"), self.topic("other")
        recorder = Recorder()
        await transport.subscribe(self.group("g"), [mine], recorder)
        await transport.subscribe(self.group("h"), [other], Recorder())
        await transport.publish([message(other, 1), message(mine, 2)])
        await self.wait_for(lambda: len(recorder.acked) == 1, "the one message on my topic")
        await _clock.sleep(0.2)
        assert [number(d) for d in recorder.deliveries] == [2]

    async def test_competing_consumers_share_a_group_without_overlap(
        self, transport: Transport
    ) -> None:
        topic, group = self.topic("t"), self.group("g")
        a, b = Recorder(pause=0.005), Recorder(pause=0.005)
        await transport.subscribe(group, [topic], a, max_batch=5)
        await transport.subscribe(group, [topic], b, max_batch=5)
        sent = [message(topic, n, key=f"k{n}") for n in range(200)]
        await transport.publish(sent)
        await self.wait_for(lambda: len(a.acked) + len(b.acked) == 200, "200 deliveries")
        await _clock.sleep(0.2)
        ids_a, ids_b = set(a.ids()), set(b.ids())
        assert not ids_a & ids_b, "a message went to two consumers of one group"
        assert ids_a | ids_b == {m.message_id for m in sent}
        assert len(a.deliveries) + len(b.deliveries) == 200, "redelivered without a failure"
        assert a.deliveries, "the first consumer got nothing"
        assert b.deliveries, "the second consumer got nothing"

    # -- ordering -------------------------------------------------------------------------

    async def test_per_key_order_holds_across_competing_consumers_and_retries(
        self, transport: Transport
    ) -> None:
        topic, group = self.topic("t"), self.group("g")
        decisions = RandomSource(seed=7)

        def flaky(d: Delivery) -> Outcome:
            if d.attempt == 1 and decisions.random() < 0.2:
                return Retry(error="flaky", delay=0.01)
            return Ack()

        policy = RedeliveryPolicy(max_attempts=10, backoff_base=0.01, backoff_cap=0.05)
        log: list[Delivery] = []
        a, b = Recorder(flaky, pause=0.002, log=log), Recorder(flaky, pause=0.002, log=log)
        await transport.subscribe(group, [topic], a, policy=policy, max_batch=7)
        await transport.subscribe(group, [topic], b, policy=policy, max_batch=7)
        keys = [f"k{i}" for i in range(8)]
        sent = [message(topic, n, key=keys[n % len(keys)]) for n in range(240)]
        for start in range(0, len(sent), 40):
            await transport.publish(sent[start : start + 40])
        await self.wait_for(lambda: len(a.acked) + len(b.acked) == 240, "240 acknowledged")
        assert len({d.message_id for d in log}) == 240
        assert a.acked, "the first consumer handled nothing"
        assert b.acked, "the second consumer handled nothing"
        # The shared log is in handling order across both consumers.
        seen_per_key: dict[str, list[int]] = defaultdict(list)
        for d in log:
            assert d.key is not None
            seen_per_key[d.key].append(number(d))
        for key, numbers in seen_per_key.items():
            assert numbers == sorted(numbers), f"key {key} handled out of order: {numbers}"

    async def test_a_key_is_never_in_flight_twice(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        in_flight: dict[str, int] = defaultdict(int)
        violations: list[str] = []

        async def handler(batch: Sequence[Delivery]) -> list[Outcome]:
            keys = {d.key for d in batch if d.key is not None}
            for key in keys:
                in_flight[key] += 1
                if in_flight[key] > 1:
                    violations.append(key)
            await _clock.sleep(0.003)
            for key in keys:
                in_flight[key] -= 1
            handled.extend(batch)
            return [Ack() for _ in batch]

        handled: list[Delivery] = []
        for _ in range(3):
            await transport.subscribe(group, [topic], handler, max_batch=4)
        await transport.publish([message(topic, n, key=f"k{n % 3}") for n in range(90)])
        await self.wait_for(lambda: len(handled) == 90, "90 deliveries")
        assert not violations, f"keys handled by two consumers at once: {violations[:5]}"

    # -- redelivery and dead letters ------------------------------------------------------

    async def test_retry_redelivers_after_the_delay(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        times: list[float] = []

        def decide(d: Delivery) -> Outcome:
            times.append(_clock.monotonic())
            return Retry(error="not yet", delay=0.3) if d.attempt < 3 else Ack()

        recorder = Recorder(decide)
        policy = RedeliveryPolicy(max_attempts=5)
        await transport.subscribe(group, [topic], recorder, policy=policy)
        await transport.publish([message(topic, 1)])
        await self.wait_for(lambda: len(recorder.acked) == 1, "success on the third attempt")
        assert [d.attempt for d in recorder.deliveries] == [1, 2, 3]
        assert times[1] - times[0] >= 0.25
        assert times[2] - times[1] >= 0.25

    async def test_handler_exception_retries_the_batch(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        calls: list[int] = []

        async def handler(batch: Sequence[Delivery]) -> list[Outcome]:
            calls.append(batch[0].attempt)
            if batch[0].attempt == 1:
                raise RuntimeError("boom")
            return [Ack() for _ in batch]

        policy = RedeliveryPolicy(max_attempts=3, backoff_base=0.01, backoff_cap=0.01)
        await transport.subscribe(group, [topic], handler, policy=policy)
        await transport.publish([message(topic, 1)])
        await self.wait_for(lambda: calls[-1:] == [2], "the retry after an exception")

    async def test_dead_letters_after_max_attempts_then_replay(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        fixed = False

        def decide(_d: Delivery) -> Outcome:
            return Ack() if fixed else Retry(error="ValueError: bad thing")

        recorder = Recorder(decide)
        policy = RedeliveryPolicy(max_attempts=3, backoff_base=0.01, backoff_cap=0.02)
        await transport.subscribe(group, [topic], recorder, policy=policy)
        sent = message(topic, 1, key="k")
        await transport.publish([sent])
        dead = transport.dead_letters

        async def parked() -> bool:
            return len(await dead.list(group=group)) == 1

        await wait_until(parked, timeout=self.timeout, what="a dead letter")
        [record] = await dead.list(group=group)
        assert record.message_id == sent.message_id
        assert record.body == sent.body
        assert record.attempts == 3
        assert "bad thing" in record.reason
        assert record.group == group
        assert record.topic == topic
        assert await dead.get(record.id) == record
        assert [d.attempt for d in recorder.deliveries] == [1, 2, 3]
        fixed = True
        assert await dead.replay(record.id)
        await self.wait_for(lambda: len(recorder.acked) == 1, "the replayed message")
        assert recorder.acked[0].attempt == 1
        assert await dead.list(group=group) == []
        assert not await dead.replay(record.id)

    async def test_dead_letter_outcome_parks_at_once(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        recorder = Recorder(lambda _d: DeadLetter(reason="malformed envelope: not JSON"))
        await transport.subscribe(group, [topic], recorder)
        await transport.publish([message(topic, 1)])
        dead = transport.dead_letters

        async def parked() -> bool:
            return len(await dead.list(group=group)) == 1

        await wait_until(parked, timeout=self.timeout, what="a dead letter")
        [record] = await dead.list(group=group)
        assert (record.attempts, record.reason) == (1, "malformed envelope: not JSON")
        assert len(recorder.deliveries) == 1
        assert await dead.purge(record.id)
        assert await dead.list(group=group) == []

    async def test_a_failed_message_blocks_its_key_only(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")

        def decide(d: Delivery) -> Outcome:
            if d.key == "stuck" and d.attempt == 1:
                return Retry(error="wait", delay=0.5)
            return Ack()

        recorder = Recorder(decide)
        await transport.subscribe(group, [topic], recorder, max_batch=1)
        await transport.publish(
            [
                message(topic, 1, key="stuck"),
                message(topic, 2, key="stuck"),
                message(topic, 3, key="free"),
            ]
        )
        await self.wait_for(lambda: len(recorder.acked) == 3, "all three")
        order = [(number(d), d.attempt) for d in recorder.deliveries]
        assert order.index((3, 1)) < order.index((1, 2)), "another key waited for a stuck one"
        assert order.index((1, 2)) < order.index((2, 1)), "a key overtook its stuck head"

    # -- consumers that stop or die -------------------------------------------------------

    async def test_stop_settles_the_batch_in_hand(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        started = asyncio.Event()

        async def slow(batch: Sequence[Delivery]) -> list[Outcome]:
            started.set()
            await _clock.sleep(0.3)
            return [Ack() for _ in batch]

        consumer = await transport.subscribe(group, [topic], slow)
        await transport.publish([message(topic, 1)])
        await asyncio.wait_for(started.wait(), self.timeout)
        await consumer.stop()
        again = Recorder()
        await transport.subscribe(group, [topic], again)
        await _clock.sleep(0.5)
        assert again.deliveries == [], "a message acknowledged during stop() came back"

    async def test_a_consumer_that_dies_unsettled_gets_its_messages_redelivered(
        self, transport: Transport
    ) -> None:
        topic, group = self.topic("t"), self.group("g")
        started = asyncio.Event()

        async def hang(batch: Sequence[Delivery]) -> list[Outcome]:
            started.set()
            await asyncio.Event().wait()
            return [Ack() for _ in batch]

        dying: Any = await transport.subscribe(group, [topic], hang)
        await transport.publish([message(topic, 1)])
        await asyncio.wait_for(started.wait(), self.timeout)
        dying.abandon()
        survivor = Recorder()
        await transport.subscribe(group, [topic], survivor)
        await self.wait_for(lambda: len(survivor.acked) == 1, "the redelivered message")
        assert survivor.deliveries[0].attempt == 2

    async def test_republished_ids_are_tolerated(self, transport: Transport) -> None:
        topic, group = self.topic("t"), self.group("g")
        recorder = Recorder()
        await transport.subscribe(group, [topic], recorder)
        first = message(topic, 1, key="k")
        await transport.publish([first, message(topic, 2, key="k")])
        await transport.publish([first])
        await self.wait_for(lambda: len(recorder.acked) >= 2, "both messages")
        await _clock.sleep(0.2)
        numbers = [number(d) for d in recorder.acked]
        assert numbers[:2] == [1, 2]
        assert set(numbers) == {1, 2}
