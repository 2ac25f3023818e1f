"""One member of a consumer group on NATS: partition leases, per-key order, pulls, settling.

A group's messages are spread over partitions by key; each partition has one durable
pull consumer, and one member of the group at a time owns it (a lease in the
coordination stream). The owner pulls the partition's messages, hands them out in
per-key order (the rule of :func:`atoll.transport._claim.claimable`), and settles them:
``+ACK``, ``-NAK`` with the backoff as delay, or a dead letter then ``+ACK``.

Taking over a partition is safe while the previous owner's deliveries are still
pending: the new owner hands out nothing until every message the server counts as
pending is known to it (``num_ack_pending`` equals what it holds, and no other pull
is waiting). Until then a later message of a key could overtake an earlier one that the
old owner held.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from atoll._crash import crashpoint
from atoll.determinism import Clock
from atoll.transport._base import (
    Ack,
    BatchHandler,
    DeadLetter,
    Delivery,
    Outcome,
    RedeliveryPolicy,
)
from atoll.transport._claim import Candidate, call_handler, claimable
from atoll.transport.nats._link import ERR_WRONG_LAST_SEQUENCE, NatsApiError
from atoll.transport.nats._names import from_header, header_value, token

if TYPE_CHECKING:
    from atoll.transport.nats._transport import NatsTransport

log = logging.getLogger("atoll.transport.nats")

_INF = float("inf")
_HELD, _IN_FLIGHT, _WAITING = 0, 1, 2
_RECOVERING, _ACTIVE, _RELEASING = "recovering", "active", "releasing"

#: Most messages one pull request asks for.
PULL_BATCH = 256
#: Pull expiry while taking over (short, so the takeover check runs often) and after
#: (at most half the ack wait, see :meth:`NatsConsumer._refill`).
RECOVERY_PULL = 0.05
ACTIVE_PULL = 5.0
#: Settled sequence numbers remembered per partition, to re-ack a redelivery at once.
SETTLED_MEMORY = 4096


@dataclass(slots=True, eq=False)
class _Entry:
    partition: _Partition
    seq: int
    key: str | None
    topic: str
    message_id: str
    body: bytes
    subject: str
    reply: str
    #: The attempt this entry is handed out as, and the server's delivery count.
    attempt: int
    server: int
    touched: float
    state: int = _HELD
    due: float = 0.0


@dataclass(slots=True, eq=False)
class _Partition:
    index: int
    consumer: str
    lease_subject: str
    lease_seq: int = 0
    renewed_at: float = 0.0
    valid_until: float = 0.0
    mode: str = _RECOVERING
    entries: dict[int, _Entry] = field(default_factory=dict)
    ordered: bool = True
    max_seq: int = 0
    settled: dict[int, None] = field(default_factory=dict)
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    sub: Subscription | None = None
    inbox: str = ""
    pull_open: bool = False
    pull_left: int = 0
    pull_deadline: float = 0.0
    pull_retry_at: float = 0.0
    pull_done: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    #: The highest stream sequence delivered before this member took the partition over
    #: (``None`` until the first look at the consumer's state).
    delivered_before: int | None = None
    #: Deliveries that were not attempts, by stream sequence, from the previous owner's
    #: handoff note (messages it held, then put back untried).
    offsets: dict[int, int] = field(default_factory=dict)

    def remember(self, seq: int) -> None:
        self.settled[seq] = None
        if len(self.settled) > SETTLED_MEMORY:
            del self.settled[next(iter(self.settled))]

    def waiting(self) -> int:
        return sum(1 for e in self.entries.values() if e.state == _WAITING)


def _ack_metadata(reply: str) -> tuple[int, int]:
    """(times delivered, stream sequence) from a JetStream ack subject."""
    tokens = reply.split(".")
    if len(tokens) >= 11:  # $JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<n>.<sseq>...
        return int(tokens[6]), int(tokens[7])
    return int(tokens[4]), int(tokens[5])


class NatsConsumer:
    """A running subscription of one group member (see the module docstring)."""

    def __init__(
        self,
        transport: NatsTransport,
        group: str,
        handler: BatchHandler,
        policy: RedeliveryPolicy,
        max_batch: int,
    ) -> None:
        self._t = transport
        self.group = group
        self._gtok = token(group)
        self._handler = handler
        self._policy = policy
        self._max_batch = max_batch
        self.member = transport._random.new_id().replace("-", "")[-20:]
        self._partitions: dict[int, _Partition] = {}
        self._stopping = False
        self._stopped = asyncio.Event()
        self._wake = asyncio.Event()
        self._tick_now = asyncio.Event()
        self._target = 0
        self._rotation = 0
        self._member_seq = 0
        self._member_renewed = -_INF
        self._hint_sub: Subscription | None = None
        self._runner: asyncio.Task[None] | None = None
        self._coordinator: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._logged: dict[str, str] = {}
        self.handled = 0

    def __repr__(self) -> str:
        return f"NatsConsumer({self.group!r}, member={self.member!r})"

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group, take a fair share of its partitions (waiting briefly), consume."""
        nc = self._t._sub.client()
        names = self._t.names
        self._hint_sub = await nc.subscribe(names.hint_subject(self._gtok), cb=self._on_hint)
        loop = asyncio.get_running_loop()
        try:
            await self._tick()
        except Exception as exc:
            self._log("coordination", exc)
        self._runner = loop.create_task(self._run())
        self._coordinator = loop.create_task(self._coordinate())
        self._maintainer = loop.create_task(self._maintain())
        # Joining moves partitions from the members that hold them: wait a little for
        # this member's share, so that work spreads from the first message on.
        clock = self._t.clock
        deadline = clock.monotonic() + min(self._t.lease, 3.0)
        while self._owned() < self._target and clock.monotonic() < deadline:
            await clock.sleep(0.02)

    async def stop(self) -> None:
        """Stop fetching, settle the batch in hand, give the partitions back, leave."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._wake.set()
        self._tick_now.set()
        for p in self._partitions.values():
            p.pull_done.set()  # a takeover in progress gives up at once
        try:
            # The batch in hand is handled and settled; a tick in progress finishes.
            for task in (self._runner, self._coordinator):
                if task is not None:
                    await asyncio.wait([task])
            if self._maintainer is not None:
                self._maintainer.cancel()
                await asyncio.wait([self._maintainer])
            await self._drain_background()
            await asyncio.gather(
                *(self._let_go(p, delete=True) for p in list(self._partitions.values())),
                return_exceptions=True,
            )
            await self._leave()
        finally:
            self._t._forget(self)
            self._stopped.set()

    def abandon(self) -> None:
        """Die without settling or giving anything back, as a killed process would.

        The pulls' subscriptions go (a dead process's connection would take them), so
        the server stops delivering here; its leases and deliveries lapse on their own.
        """
        self._stopping = True
        for task in (self._runner, self._coordinator, self._maintainer, *self._background):
            if task is not None:
                task.cancel()
        subs = [p.sub for p in self._partitions.values() if p.sub is not None]
        if self._hint_sub is not None:
            subs.append(self._hint_sub)
        for sub in subs:
            self._t._spawn(_quietly(sub.unsubscribe()))
        self._t._forget(self)
        self._stopped.set()

    async def _leave(self) -> None:
        link = self._t._sub
        names = self._t.names
        if self._member_seq and link.connected:
            await _quietly(
                link.api(
                    f"STREAM.MSG.DELETE.{names.coord_stream}",
                    {"seq": self._member_seq},
                    idempotent=False,
                )
            )
        await self._hint()
        if self._hint_sub is not None:
            await _quietly(self._hint_sub.unsubscribe())

    def on_reconnect(self) -> None:
        """The connection came back: the server forgot our pulls."""
        for p in self._partitions.values():
            self._close_pull(p)
        self._tick_now.set()
        self._wake.set()

    def _is_stopping(self) -> bool:
        # A method, not the attribute: other tasks set it while this one awaits.
        return self._stopping

    def _owned(self) -> int:
        return sum(1 for p in self._partitions.values() if p.mode != _RELEASING)

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_background(self) -> None:
        while self._background:
            await asyncio.wait(list(self._background))

    def _log(self, what: str, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        if self._logged.get(what) != text:
            self._logged[what] = text
            log.warning("group %s, member %s: %s failed: %s", self.group, self.member, what, text)

    # -- coordination: members, leases, rebalancing ---------------------------------------

    async def _on_hint(self, _msg: Msg) -> None:
        self._tick_now.set()

    async def _hint(self) -> None:
        nc = self._t._sub.nc
        if nc is not None and nc.is_connected:
            await _quietly(nc.publish(self._t.names.hint_subject(self._gtok), b""))

    async def _coordinate(self) -> None:
        clock = self._t.clock
        interval = self._t.lease / 4
        while not self._stopping:
            sleeper = asyncio.ensure_future(clock.sleep(interval))
            waiter = asyncio.ensure_future(self._tick_now.wait())
            try:
                await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleeper.cancel()
                waiter.cancel()
            self._tick_now.clear()
            if self._is_stopping():
                return
            try:
                await self._tick()
            except Exception as exc:
                self._log("coordination", exc)
            else:
                self._logged.pop("coordination", None)

    async def _tick(self) -> None:
        """Renew what is due, look at the group, then give back or take partitions."""
        await self._renew_due()
        members, leased = await self._view()
        ordered = sorted(members)
        partitions = self._t.partitions
        rank = ordered.index(self.member)
        self._target = partitions // len(ordered) + (1 if rank < partitions % len(ordered) else 0)
        if self._is_stopping():
            return
        owned = [p for p in self._partitions.values() if p.mode != _RELEASING]
        if len(owned) > self._target:
            # Give back the partitions with the least in hand (nothing awaiting a retry,
            # which would hold the next owner up until it comes back).
            owned.sort(key=lambda p: (p.waiting(), len(p.entries)))
            for p in owned[: len(owned) - self._target]:
                self._spawn(self._let_go(p, delete=True))
        elif len(owned) < self._target:
            free = [i for i in range(partitions) if i not in leased and i not in self._partitions]
            for i in range(len(free) - 1, 0, -1):  # shuffle: members try different ones
                j = self._t._random.randrange(i + 1)
                free[i], free[j] = free[j], free[i]
            need = self._target - len(owned)
            await asyncio.gather(*(self._acquire(i) for i in free[:need]))

    async def _renew_due(self) -> None:
        """Drop leases that ran out; renew the membership and the leases that are due."""
        t = self._t
        now = t.clock.monotonic()
        for p in list(self._partitions.values()):
            if p.mode != _RELEASING and p.valid_until <= now:
                log.warning(
                    "group %s: member %s lost partition %d (its lease ran out unrenewed)",
                    self.group,
                    self.member,
                    p.index,
                )
                self._spawn(self._let_go(p, delete=False))
        if now - self._member_renewed >= t.lease / 4:
            first = not self._member_seq
            ack = await t._sub.store(t.names.member_subject(self._gtok, self.member), b"")
            self._member_seq = int(ack["seq"])
            self._member_renewed = now
            if first:
                await self._hint()
        due = [
            p
            for p in self._partitions.values()
            if p.mode != _RELEASING and now - p.renewed_at >= t.lease / 4
        ]
        if due:
            await asyncio.gather(*(self._renew(p) for p in due))

    async def _view(self) -> tuple[set[str], set[int]]:
        """The group's live members and leased partitions, from one stream-info request."""
        names = self._t.names
        info = await self._t._sub.api(
            f"STREAM.INFO.{names.coord_stream}", {"subjects_filter": names.coord_filter(self._gtok)}
        )
        members = {self.member}
        leased: set[int] = set()
        for subject in info.get("state", {}).get("subjects") or {}:
            _, kind, ident = subject.rsplit(".", 2)
            if kind == "m":
                members.add(ident)
            elif kind == "l" and ident.isdigit():
                leased.add(int(ident))
        return members, leased

    def _valid_until(self, sent_at: float) -> float:
        # The server's expiry counts from when it stored the write, after ``sent_at``.
        lease = self._t.lease
        return sent_at + lease - min(1.0, lease * 0.1)

    async def _renew(self, p: _Partition) -> None:
        sent = self._t.clock.monotonic()
        try:
            ack = await self._t._sub.store(
                p.lease_subject,
                self.member.encode(),
                {"Nats-Expected-Last-Subject-Sequence": str(p.lease_seq)},
            )
        except NatsApiError as exc:
            if exc.code == ERR_WRONG_LAST_SEQUENCE:
                log.warning(
                    "group %s: member %s lost partition %d (its lease expired and was taken)",
                    self.group,
                    self.member,
                    p.index,
                )
                self._spawn(self._let_go(p, delete=False))
                return
            raise
        p.lease_seq = int(ack["seq"])
        if p.mode != _RELEASING:
            p.renewed_at = sent
            p.valid_until = self._valid_until(sent)
        elif p.closed:
            # Renewed while being given back, after the lease was deleted: delete the
            # renewal too, or the next owner waits for it to expire.
            await _quietly(
                self._t._sub.api(
                    f"STREAM.MSG.DELETE.{self._t.names.coord_stream}",
                    {"seq": p.lease_seq},
                    idempotent=False,
                )
            )

    async def _acquire(self, index: int) -> None:
        t = self._t
        sent = t.clock.monotonic()
        subject = t.names.lease_subject(self._gtok, index)
        try:
            ack = await t._sub.store(
                subject, self.member.encode(), {"Nats-Expected-Last-Subject-Sequence": "0"}
            )
        except NatsApiError as exc:
            if exc.code == ERR_WRONG_LAST_SEQUENCE:
                return  # another member was quicker
            raise
        p = _Partition(
            index=index, consumer=t.names.consumer(self._gtok, index), lease_subject=subject
        )
        p.lease_seq = int(ack["seq"])
        p.renewed_at = sent
        p.valid_until = self._valid_until(sent)
        p.idle.set()
        if self._stopping:
            await _quietly(
                t._sub.api(f"STREAM.MSG.DELETE.{t.names.coord_stream}", {"seq": p.lease_seq})
            )
            return
        try:
            note = await t._sub.direct_get(
                t.names.meta_stream, t.names.handoff_subject(self._gtok, index)
            )
            if note is not None:
                p.offsets = {int(k): int(v) for k, v in json.loads(note.data).items()}
        except Exception as exc:
            self._log(f"reading the handoff note of partition {index}", exc)
        self._partitions[index] = p
        try:
            nc = t._sub.client()
            p.inbox = nc.new_inbox()
            p.sub = await nc.subscribe(p.inbox, cb=partial(self._on_message, p))
        except Exception:
            self._spawn(self._let_go(p, delete=True))
            raise
        self._spawn(self._recover(p))

    async def _recover(self, p: _Partition) -> None:
        """Hand out nothing until every message pending on the server is known here."""
        t = self._t
        api = f"CONSUMER.INFO.{t.names.stream}.{p.consumer}"
        while p.mode == _RECOVERING and not self._stopping:
            if p.pull_open:
                await _wait_event(p.pull_done, t.clock, RECOVERY_PULL + 2.0)
                if p.pull_open and t.clock.monotonic() > p.pull_deadline:
                    self._close_pull(p)
                continue
            known = len(p.entries)
            try:
                info = await t._sub.api(api)
            except Exception as exc:
                self._log(f"taking over partition {p.index}", exc)
                await t.clock.sleep(0.5)
                continue
            if p.mode != _RECOVERING:
                return
            if p.delivered_before is None:
                p.delivered_before = int(info.get("delivered", {}).get("stream_seq", 0))
            if not p.pull_open and info["num_ack_pending"] == known and info["num_waiting"] == 0:
                p.mode = _ACTIVE
                self._logged.pop(f"taking over partition {p.index}", None)
                self._wake.set()
                await self._refill(p)
                return
            if not await self._open_pull(p, RECOVERY_PULL):
                await t.clock.sleep(0.05)

    async def _let_go(self, p: _Partition, *, delete: bool) -> None:
        """Stop pulling, wait for the batch in hand, put held messages back, give up the lease.

        With ``delete`` the lease is still ours and is removed, so that the next owner
        need not wait for it to expire.
        """
        if p.mode == _RELEASING:
            return
        p.mode = _RELEASING
        sub, p.sub = p.sub, None
        link = self._t._sub
        if sub is not None:
            await _stop_listening(sub, drain=link.connected)
        self._close_pull(p)
        if link.connected:
            # Asking for the consumer's state makes the server drop the pull nobody
            # listens to any more (see _refill) before anything is delivered to it.
            await _quietly(
                link.api(f"CONSUMER.INFO.{self._t.names.stream}.{p.consumer}", idempotent=False)
            )
        await p.idle.wait()
        nc = link.nc
        note: dict[str, int] = {}
        for entry in list(p.entries.values()):
            # The next delivery is one more for the server; say which attempt it is.
            upcoming = entry.attempt + (1 if entry.state == _WAITING else 0)
            if entry.server + 1 != upcoming:
                note[str(entry.seq)] = entry.server + 1 - upcoming
            if entry.state == _HELD and nc is not None:
                # Buffered while disconnected and sent on reconnecting; if it is lost,
                # the ack wait brings the message back all the same.
                await _quietly(nc.publish(entry.reply, b"-NAK"))
        p.entries.clear()
        p.closed = True
        if self._partitions.get(p.index) is p:
            del self._partitions[p.index]
        if delete and link.connected:
            # The handoff note goes before the lease: the next owner reads it on taking
            # over. (Offline, the lease just expires and the next owner counts one
            # attempt too many for what was held here.)
            await _quietly(
                link.store(
                    self._t.names.handoff_subject(self._gtok, p.index),
                    json.dumps(note).encode(),
                )
            )
            await _quietly(
                link.api(
                    f"STREAM.MSG.DELETE.{self._t.names.coord_stream}",
                    {"seq": p.lease_seq},
                    idempotent=False,
                )
            )
        await self._hint()
        self._wake.set()

    # -- pulling --------------------------------------------------------------------------

    async def _open_pull(self, p: _Partition, expires: float) -> bool:
        t = self._t
        if p.pull_open or p.sub is None or p.mode == _RELEASING or self._stopping:
            return False
        now = t.clock.monotonic()
        if now < p.pull_retry_at:
            return False
        room = t.settings.max_ack_pending - len(p.entries)
        if room <= 0:
            return False
        nc = t._sub.nc
        if nc is None or not nc.is_connected:
            return False
        batch = min(room, PULL_BATCH)
        p.pull_open = True
        p.pull_left = batch
        p.pull_deadline = now + expires + 2.0
        p.pull_done.clear()
        request = {"batch": batch, "expires": int(expires * 1e9)}
        try:
            await nc.publish(
                f"$JS.API.CONSUMER.MSG.NEXT.{t.names.stream}.{p.consumer}",
                json.dumps(request).encode(),
                reply=p.inbox,
            )
        except Exception as exc:
            self._log(f"pulling partition {p.index}", exc)
            p.pull_retry_at = now + 0.5
            self._close_pull(p)
            return False
        return True

    async def _refill(self, p: _Partition) -> None:
        # A pull outlives a member that dies; nats-server 2.9 mishandles a delivery to a
        # pull whose requester is gone (it rewinds the consumer and miscounts deliveries).
        # Pulls shorter than the ack wait are gone before the dead member's deliveries
        # come due again.
        if p.mode == _ACTIVE:
            await self._open_pull(p, min(ACTIVE_PULL, self._t.settings.ack_wait / 2))

    @staticmethod
    def _close_pull(p: _Partition) -> None:
        p.pull_open = False
        p.pull_done.set()

    async def _on_message(self, p: _Partition, msg: Msg) -> None:
        reply = msg.reply
        if not reply.startswith("$JS.ACK."):
            await self._on_status(p, msg)
            return
        try:
            delivered, seq = _ack_metadata(reply)
        except (ValueError, IndexError):
            log.warning("group %s: ignoring a message with ack subject %r", self.group, reply)
            return
        if p.pull_open:
            p.pull_left -= 1
            if p.pull_left <= 0:
                self._close_pull(p)
        if p.closed or seq in p.settled:
            # Given back already: back to the server. Or settled here already, and the
            # ack was lost on the way: say it again.
            nc = self._t._sub.nc
            if nc is not None:
                await _quietly(nc.publish(reply, b"-NAK" if p.closed else b"+ACK"))
            return
        self._store(p, msg, seq, delivered)
        if p.mode == _ACTIVE:
            self._wake.set()
            if not p.pull_open:
                await self._refill(p)

    def _store(self, p: _Partition, msg: Msg, seq: int, delivered: int) -> None:
        """Record a delivery; work out which attempt it is.

        The server's count includes deliveries that were no attempt: messages a member
        held behind their key and put back when it let the partition go (its handoff
        note says how many), and those a dead member held. nats-server 2.9 can also
        under-count after a member died (it takes back the count of a redelivery it
        tried on a pull nobody listened to any more).
        """
        now = self._t.clock.monotonic()
        entry = p.entries.get(seq)
        if entry is not None:
            entry.reply = msg.reply
            entry.touched = now
            entry.server = delivered
            if entry.state == _WAITING:  # back from a retry's delay: the next attempt
                entry.state = _HELD
                entry.due = 0.0
                entry.attempt += 1
            return  # else the ack timer ran out while it was held or in flight
        if seq in p.offsets:
            attempt = max(1, delivered - p.offsets[seq])
        elif p.delivered_before is not None and seq <= p.delivered_before:
            attempt = max(delivered, 2)  # delivered to the previous owner, which died
        else:
            attempt = delivered
        p.entries[seq] = self._entry(p, msg, seq, attempt, delivered, now)
        if seq < p.max_seq:
            p.ordered = False
        else:
            p.max_seq = seq

    def _entry(  # noqa: PLR0917 - private, called from one place
        self, p: _Partition, msg: Msg, seq: int, attempt: int, server: int, now: float
    ) -> _Entry:
        headers = msg.headers or {}
        topic = headers.get("Atoll-Topic")
        message_id = headers.get("Atoll-Id") or headers.get("Nats-Msg-Id")
        key = headers.get("Atoll-Key")
        return _Entry(
            partition=p,
            seq=seq,
            key=None if key is None else from_header(key),
            # A message another system published here is handed out as it is: the
            # runtime dead-letters what it cannot decode.
            topic=msg.subject if topic is None else from_header(topic),
            message_id=(
                f"nats:{self._t.names.stream}:{seq}"
                if message_id is None
                else from_header(message_id)
            ),
            body=msg.data,
            subject=msg.subject,
            reply=msg.reply,
            attempt=attempt,
            server=server,
            touched=now,
        )

    async def _on_status(self, p: _Partition, msg: Msg) -> None:
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None or status == "100":
            return  # not ours, or an idle heartbeat
        self._close_pull(p)
        if status not in ("404", "408"):
            description = str(headers.get("Description", ""))
            now = self._t.clock.monotonic()
            if status == "409" and "MaxWaiting" in description:
                # Another pull (the previous owner's) is still open; it ends soon.
                p.pull_retry_at = now + 0.1
            else:
                p.pull_retry_at = now + 1.0
                self._log(
                    f"pulling partition {p.index}",
                    RuntimeError(f"NATS answered {status} {description}"),
                )
        await self._refill(p)

    # -- handing out and settling ---------------------------------------------------------

    async def _run(self) -> None:
        clock = self._t.clock
        while True:
            self._wake.clear()
            if self._stopping:
                return
            batch, next_due = self._claim()
            if not batch:
                timeout = 1.0 if next_due is None else max(0.0, next_due - clock.monotonic())
                await _wait_event(self._wake, clock, min(timeout, 1.0))
                continue
            outcomes = await call_handler(self._handler, batch)
            crashpoint("consumer.before_ack")
            await self._settle(batch, outcomes)

    def _claim(self) -> tuple[list[Delivery], float | None]:
        now = self._t.clock.monotonic()
        # A lease that may have expired (the coordinator could not renew it in time)
        # hands out nothing more, even before the coordinator lets the partition go.
        parts = [
            p
            for p in self._partitions.values()
            if p.mode == _ACTIVE and p.entries and p.valid_until > now
        ]
        if not parts:
            return [], None
        self._rotation = (self._rotation + 1) % len(parts)
        parts = parts[self._rotation :] + parts[: self._rotation]
        batch: list[Delivery] = []
        for p in parts:
            limit = self._max_batch - len(batch)
            if limit <= 0:
                break
            if not p.ordered:
                p.entries = dict(sorted(p.entries.items()))
                p.ordered = True
            rows = (
                Candidate(
                    e.seq,
                    e.key,
                    e.due if e.state == _HELD else _INF,
                    _INF if e.state == _IN_FLIGHT else None,
                )
                for e in p.entries.values()
            )
            chosen = claimable(rows, now, limit)
            for seq in chosen:
                e = p.entries[seq]
                e.state = _IN_FLIGHT
                batch.append(
                    Delivery(self.group, e.topic, e.message_id, e.key, e.body, e.attempt, e)
                )
            if chosen:
                p.in_flight += len(chosen)
                p.idle.clear()
        if batch:
            return batch, None
        due = [e.due for p in parts for e in p.entries.values() if e.state == _HELD and e.due > now]
        return [], min(due) if due else None

    async def _settle(self, batch: Sequence[Delivery], outcomes: Sequence[Outcome]) -> None:
        now = self._t.clock.monotonic()
        parks: list[tuple[_Entry, str]] = []
        touched: dict[int, _Partition] = {}
        for delivery, outcome in zip(batch, outcomes, strict=True):
            entry = delivery.token
            assert isinstance(entry, _Entry)
            p = entry.partition
            touched[id(p)] = p
            entry.state = _HELD
            p.in_flight -= 1
            if isinstance(outcome, Ack):
                self.handled += 1
                await self._ack(entry)
            elif isinstance(outcome, DeadLetter):
                parks.append((entry, outcome.reason))
            elif not outcome.count:
                # Put back untried (held behind its key's failure, or a busy database):
                # no server round trip, so it does not count as a delivery.
                entry.due = now + (outcome.delay or 0.0)
            elif entry.attempt >= self._policy.max_attempts:
                parks.append((entry, outcome.error))
            else:
                delay = outcome.delay
                if delay is None:
                    delay = self._policy.backoff(entry.attempt, self._t._random.random())
                entry.state = _WAITING
                await self._nak(entry, delay)
        if parks:
            await asyncio.gather(*(self._park(e, reason) for e, reason in parks))
        for p in touched.values():
            if p.in_flight == 0:
                p.idle.set()
            await self._refill(p)

    async def _ack(self, entry: _Entry) -> None:
        p = entry.partition
        p.entries.pop(entry.seq, None)
        p.remember(entry.seq)
        nc = self._t._sub.nc
        if nc is not None:
            # Not awaited by the server: a lost ack means a redelivery, which the
            # settled memory above (or the inbox) absorbs.
            await _quietly(nc.publish(entry.reply, b"+ACK"))

    async def _nak(self, entry: _Entry, delay: float) -> None:
        nc = self._t._sub.nc
        if nc is None:
            return  # the ack timer runs out and the server redelivers it
        payload = b"-NAK" if delay <= 0 else b'-NAK {"delay": %d}' % int(delay * 1e9)
        await _quietly(nc.publish(entry.reply, payload))

    async def _park(self, entry: _Entry, reason: str) -> None:
        """Store a dead letter (confirmed), then ack the message."""
        t = self._t
        headers = {
            # A park repeated after a crash (stored, ack lost) is dropped as a duplicate.
            "Nats-Msg-Id": f"{header_value(entry.message_id)}:{self._gtok}:dead:{entry.seq}",
            "Atoll-Group": header_value(self.group),
            "Atoll-Topic": header_value(entry.topic),
            "Atoll-Id": header_value(entry.message_id),
            "Atoll-Reason": header_value(reason),
            "Atoll-Attempts": str(entry.attempt),
            "Atoll-Dead-At": repr(t.clock.time()),
            "Atoll-Subject": entry.subject,
        }
        if entry.key is not None:
            headers["Atoll-Key"] = header_value(entry.key)
        try:
            await t._sub.store(t.names.dlq_subject(self._gtok), entry.body, headers)
        except Exception as exc:
            self._log("dead-lettering", exc)
            entry.state = _WAITING
            await self._nak(entry, 1.0)
            return
        log.warning(
            "group %s: message %s parked in dead letters after %d attempt(s): %s",
            self.group,
            entry.message_id,
            entry.attempt,
            reason,
        )
        await self._ack(entry)

    # -- keeping deliveries alive ---------------------------------------------------------

    async def _maintain(self) -> None:
        """Keep held and in-flight deliveries from timing out; restart stalled pulls."""
        t = self._t
        clock = t.clock
        ack_wait = t.settings.ack_wait
        interval = max(0.05, min(1.0, ack_wait / 4))
        while True:
            await clock.sleep(interval)
            now = clock.monotonic()
            nc = t._sub.nc
            for p in list(self._partitions.values()):
                if nc is not None and nc.is_connected:
                    for e in list(p.entries.values()):
                        if e.state != _WAITING and now - e.touched >= ack_wait / 3:
                            e.touched = now
                            await _quietly(nc.publish(e.reply, b"+WPI"))
                if p.pull_open and now > p.pull_deadline:
                    self._close_pull(p)
                if not p.pull_open:
                    await self._refill(p)


async def _stop_listening(sub: Subscription, *, drain: bool) -> None:
    """Unsubscribe; with ``drain``, first take what the server already sent.

    The server drops the waiting pull once nobody listens to its inbox. Offline there
    is nothing to drain from.
    """
    if drain:
        try:
            async with asyncio.timeout(2.0):
                await sub.drain()  # type: ignore[no-untyped-call]
        except Exception as exc:
            log.debug("draining a pull subscription failed: %s", exc)
        else:
            return
    await _quietly(sub.unsubscribe())


async def _quietly(awaitable: Coroutine[Any, Any, Any]) -> None:
    """Await and swallow errors: for messages the protocol can afford to lose."""
    try:
        await awaitable
    except Exception as exc:
        log.debug("ignored: %s", exc)


async def _wait_event(event: asyncio.Event, clock: Clock, timeout: float) -> None:
    sleeper = asyncio.ensure_future(clock.sleep(timeout))
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        sleeper.cancel()
        waiter.cancel()
