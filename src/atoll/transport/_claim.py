"""Choosing which deliveries a consumer may take without breaking per-key order."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from atoll.transport._base import BatchHandler, Delivery, Outcome, Retry


class Candidate(NamedTuple):
    """A delivery at the head of a group's queue, in publish order."""

    seq: int
    key: str | None
    available_at: float
    lease_until: float | None


def claimable(rows: Iterable[Candidate], now: float, limit: int) -> list[int]:
    """The seqs a consumer may claim now, in order, at most ``limit`` of them.

    A row is claimable if it is due and not leased (or its lease expired), and no earlier
    row with the same key is unclaimable: a key whose head is in flight elsewhere or
    waiting for redelivery blocks every later message of that key. Several messages of
    one key may be claimed together; the consumer handles them in order.
    """
    blocked: set[str] = set()
    chosen: list[int] = []
    for row in rows:
        free = row.available_at <= now and (row.lease_until is None or row.lease_until <= now)
        if row.key is not None:
            if row.key in blocked:
                continue
            if not free:
                blocked.add(row.key)
                continue
        elif not free:
            continue
        chosen.append(row.seq)
        if len(chosen) >= limit:
            break
    return chosen


async def call_handler(handler: BatchHandler, batch: Sequence[Delivery]) -> Sequence[Outcome]:
    """Run a batch handler; a failure or a wrong number of outcomes retries the whole batch."""
    try:
        outcomes = await handler(batch)
    except Exception as exc:
        return [Retry(error=f"batch handler failed: {exc!r}")] * len(batch)
    if len(outcomes) != len(batch):
        return [
            Retry(error=f"batch handler returned {len(outcomes)} outcomes for {len(batch)}")
        ] * len(batch)
    return outcomes
