"""Dead letters on NATS: one stream per namespace, one message per parked delivery."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from nats.aio.msg import Msg

from atoll.transport._base import DeadLetterRecord, DeadLetterStore
from atoll.transport.nats._link import ERR_NO_MESSAGE, ERR_STORE_EOF, NatsApiError
from atoll.transport.nats._names import from_header, header_value, partition_of, token

if TYPE_CHECKING:
    from atoll.transport.nats._transport import NatsTransport


class NatsDeadLetters(DeadLetterStore):
    """Dead letters kept in the ``ATOLL_<ns>_DLQ`` stream.

    A record is a message on ``atoll.<ns>.dlq.<group>`` whose body is the original body
    and whose headers hold the group, topic, message id, key, reason, attempts, time
    and original subject (readable with ``nats stream view``). Its id is its stream
    sequence. Replay publishes the message to its group again (a new stream message, so
    its attempts start at 1) and then deletes the record; a replay repeated after a
    crash in between is suppressed as a duplicate by its ``Nats-Msg-Id`` within the
    stream's duplicate window, and after it the inbox of the consumer drops it.
    """

    def __init__(self, transport: NatsTransport) -> None:
        self._t = transport

    async def list(self, *, group: str | None = None, limit: int = 100) -> list[DeadLetterRecord]:
        names = self._t.names
        link = self._t._sub
        subject = names.dlq_filter if group is None else names.dlq_subject(token(group))
        found: list[DeadLetterRecord] = []
        seq = 1
        while len(found) < limit:
            msg = await link.direct_get(names.dlq_stream, {"seq": seq, "next_by_subj": subject})
            if msg is None:
                break
            record = _record(msg)
            seq = int(record.id) + 1
            if group is None or record.group == group:
                found.append(record)
        return found

    async def get(self, record_id: str) -> DeadLetterRecord | None:
        if not record_id.isdigit() or int(record_id) < 1:
            return None
        names = self._t.names
        msg = await self._t._sub.direct_get(names.dlq_stream, {"seq": int(record_id)})
        if msg is None:
            return None
        return _record(msg)

    async def replay(self, record_id: str) -> bool:
        record = await self.get(record_id)
        if record is None:
            return False
        t = self._t
        gtok = token(record.group)
        headers = {
            "Nats-Msg-Id": f"{header_value(record.message_id)}:{gtok}:replay:{record.id}",
            "Atoll-Topic": header_value(record.topic),
            "Atoll-Id": header_value(record.message_id),
        }
        if record.key is not None:
            headers["Atoll-Key"] = header_value(record.key)
        partition = partition_of(record.key, record.message_id, t.partitions)
        # Publish first: a crash before the delete leaves the record to replay again
        # (suppressed as a duplicate), never a message lost.
        await t._sub.store(t.names.subject(gtok, partition), record.body, headers)
        return await self._delete(int(record.id))

    async def purge(self, record_id: str) -> bool:
        if not record_id.isdigit() or int(record_id) < 1:
            return False
        return await self._delete(int(record_id))

    async def _delete(self, seq: int) -> bool:
        names = self._t.names
        try:
            # Not repeated after a lost connection: a repeat would report a deletion that
            # happened as "no such record".
            await self._t._sub.api(
                f"STREAM.MSG.DELETE.{names.dlq_stream}", {"seq": seq}, idempotent=False
            )
        except NatsApiError as exc:
            if exc.code in (ERR_NO_MESSAGE, ERR_STORE_EOF):
                return False
            raise
        return True


def _record(msg: Msg) -> DeadLetterRecord:
    headers = msg.headers or {}
    subject = headers.get("Nats-Subject", "")
    seq = headers.get("Nats-Sequence", "0")

    def text(name: str, default: str = "") -> str:
        value = headers.get(name)
        return default if value is None else from_header(value)

    key = headers.get("Atoll-Key")
    attempts = 0
    with contextlib.suppress(ValueError):
        attempts = int(headers.get("Atoll-Attempts", "0"))
    dead_at = 0.0
    with contextlib.suppress(ValueError):
        dead_at = float(headers.get("Atoll-Dead-At", "0"))
    return DeadLetterRecord(
        id=seq,
        group=text("Atoll-Group", from_header(subject.rsplit(".", 1)[-1].replace("=", "%"))),
        topic=text("Atoll-Topic"),
        message_id=text("Atoll-Id"),
        key=None if key is None else from_header(key),
        body=msg.data,
        reason=text("Atoll-Reason", "put in dead letters by another system"),
        attempts=attempts,
        dead_at=dead_at,
    )
