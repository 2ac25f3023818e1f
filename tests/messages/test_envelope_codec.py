from datetime import UTC, datetime

import msgspec
import pytest

from atoll.messages import (
    Command,
    Envelope,
    Event,
    MalformedEnvelopeError,
    MessageRegistry,
    MessageValidationError,
    UnknownMessageTypeError,
    UpcastError,
    decode_envelope,
    encode_envelope,
    encode_payload,
)


class Item(msgspec.Struct):
    sku: str
    qty: int


class Reserve(Command):
    message_type = "inventory.Reserve"
    message_version = 3
    order_id: str
    items: list[Item]
    priority: str


class Shipped(Event):
    order_id: str


def envelope_for(message_type, version, payload):
    return Envelope(
        id="m1",
        type=message_type,
        version=version,
        kind="command",
        source="orders",
        destination="inventory",
        correlation_id="c1",
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        payload=msgspec.Raw(msgspec.json.encode(payload)),
    )


def registry():
    reg = MessageRegistry([Reserve, Shipped])

    @reg.upcaster("inventory.Reserve", from_version=1)
    def v1_to_v2(data):
        # v1 had a single sku and qty
        return {"order_id": data["order_id"], "items": [{"sku": data["sku"], "qty": data["qty"]}]}

    @reg.upcaster("inventory.Reserve", from_version=2)
    def v2_to_v3(data):
        return {**data, "priority": "normal"}

    return reg


def test_the_envelope_round_trips_with_every_field():
    original = Envelope(
        id="m1",
        type="inventory.Reserve",
        version=3,
        kind="command",
        source="orders",
        destination="inventory",
        correlation_id="c1",
        causation_id="m0",
        created_at=datetime(2026, 1, 1, 12, 0, tzinfo=UTC),
        key="order-1",
        reply_to="orders",
        deadline=datetime(2026, 1, 1, 12, 1, tzinfo=UTC),
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        headers={"x": "y"},
        payload=encode_payload(Reserve(order_id="o1", items=[Item("a", 1)], priority="high")),
    )
    decoded = decode_envelope(encode_envelope(original))
    assert decoded == original
    assert registry().decode(decoded) == Reserve(
        order_id="o1", items=[Item("a", 1)], priority="high"
    )


def test_default_type_name_is_the_class_name():
    assert Shipped.message_type == "Shipped"
    assert Shipped.message_kind == "event"
    assert Reserve.message_kind == "command"


def test_upcasting_applies_the_chain_from_any_old_version():
    reg = registry()
    v1 = envelope_for("inventory.Reserve", 1, {"order_id": "o1", "sku": "apple", "qty": 2})
    v2 = envelope_for(
        "inventory.Reserve", 2, {"order_id": "o1", "items": [{"sku": "apple", "qty": 2}]}
    )
    expected = Reserve(order_id="o1", items=[Item("apple", 2)], priority="normal")
    assert reg.decode(v1) == expected
    assert reg.decode(v2) == expected


def test_a_missing_upcaster_is_an_error_not_a_guess():
    reg = MessageRegistry([Reserve])
    with pytest.raises(UpcastError, match=r"no upcaster for 'inventory\.Reserve' from v1 to v2"):
        reg.decode(envelope_for("inventory.Reserve", 1, {"order_id": "o1"}))


def test_a_newer_version_than_the_code_knows_is_refused():
    with pytest.raises(UpcastError, match="newer"):
        registry().decode(envelope_for("inventory.Reserve", 4, {}))


def test_bad_input_names_what_was_wrong():
    reg = registry()
    with pytest.raises(UnknownMessageTypeError, match=r"'nope\.Unknown'"):
        reg.decode(envelope_for("nope.Unknown", 1, {}))
    with pytest.raises(MessageValidationError, match=r"inventory.Reserve.*items"):
        reg.decode(
            envelope_for("inventory.Reserve", 3, {"order_id": "o1", "items": "x", "priority": "p"})
        )
    with pytest.raises(MalformedEnvelopeError):
        decode_envelope(b"{not json")
    with pytest.raises(MalformedEnvelopeError, match="id"):
        decode_envelope(b'{"type": "x"}')


def test_registering_two_classes_under_one_name_is_refused():
    class Other(Command):
        message_type = "inventory.Reserve"

    with pytest.raises(ValueError, match="already registered"):
        MessageRegistry([Reserve, Other])
