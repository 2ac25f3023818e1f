"""The message model: msgspec Structs against pydantic v2 models for the envelope path.

    .venv/bin/python benchmarks/codec.py [--quick]

One round trip is what a message costs between services: build the payload, encode
it into an envelope, encode the envelope; then decode the envelope and decode its
payload into the typed message. Same fields, same JSON, both libraries' fastest path.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pydantic

from atoll.messages import (
    Command,
    Envelope,
    MessageRegistry,
    decode_envelope,
    encode_envelope,
    encode_payload,
)


class Line(msgspec.Struct):
    sku: str
    qty: int


class ReserveStock(Command):
    message_type = "inventory.ReserveStock"
    order_id: str
    items: list[Line]


class PLine(pydantic.BaseModel):
    sku: str
    qty: int


class PReserveStock(pydantic.BaseModel):
    order_id: str
    items: list[PLine]


class PEnvelope(pydantic.BaseModel):
    id: str
    type: str
    version: int
    kind: str
    source: str
    destination: str
    correlation_id: str
    created_at: datetime
    payload: dict[str, Any]
    causation_id: str | None = None
    key: str | None = None
    trace: dict[str, str] = {}
    headers: dict[str, str] = {}


ITEMS = [("apple", 2), ("banana", 1), ("cherry", 3)]
NOW = datetime(2026, 1, 1, tzinfo=UTC)
REGISTRY = MessageRegistry([ReserveStock])


def atoll_round_trip() -> object:
    message = ReserveStock(order_id="o-1", items=[Line(s, q) for s, q in ITEMS])
    body = encode_envelope(
        Envelope(
            id="m-1",
            type=message.message_type,
            version=1,
            kind="command",
            source="orders",
            destination="inventory",
            correlation_id="c-1",
            created_at=NOW,
            key="o-1",
            payload=encode_payload(message),
        )
    )
    return REGISTRY.decode(decode_envelope(body))


def pydantic_round_trip() -> object:
    message = PReserveStock(order_id="o-1", items=[PLine(sku=s, qty=q) for s, q in ITEMS])
    body = PEnvelope(
        id="m-1",
        type="inventory.ReserveStock",
        version=1,
        kind="command",
        source="orders",
        destination="inventory",
        correlation_id="c-1",
        created_at=NOW,
        key="o-1",
        payload=message.model_dump(),
    ).model_dump_json()
    envelope = PEnvelope.model_validate_json(body)
    return PReserveStock.model_validate(envelope.payload)


def rate(fn: Any, n: int) -> float:
    for _ in range(1000):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    n = 20_000 if parser.parse_args().quick else 200_000
    assert atoll_round_trip() == ReserveStock(order_id="o-1", items=[Line(s, q) for s, q in ITEMS])
    ours = rate(atoll_round_trip, n)
    theirs = rate(pydantic_round_trip, n)
    print(f"msgspec: {ours:,.0f} round trips/s; pydantic v2: {theirs:,.0f} round trips/s")
    print(
        json.dumps(
            {
                "benchmark": "codec",
                "cases": {
                    "envelope-round-trip-vs-pydantic": {
                        "atoll": round(ours),
                        "peer": round(theirs),
                        "unit": "round trips/s",
                        "ratio": round(ours / theirs, 2),
                    }
                },
            }
        )
    )


if __name__ == "__main__":
    main()
