"""Messages: typed commands, events and replies, the envelope and the codec."""

from atoll.messages._envelope import Envelope
from atoll.messages._errors import (
    MalformedEnvelopeError,
    MessageError,
    MessageValidationError,
    UnknownMessageTypeError,
    UpcastError,
)
from atoll.messages._model import Command, Event, Message, MessageKind, Reply
from atoll.messages._registry import (
    MessageRegistry,
    Upcaster,
    decode_envelope,
    encode_envelope,
    encode_payload,
    utc_from_timestamp,
)

__all__ = [
    "Command",
    "Envelope",
    "Event",
    "MalformedEnvelopeError",
    "Message",
    "MessageError",
    "MessageKind",
    "MessageRegistry",
    "MessageValidationError",
    "Reply",
    "UnknownMessageTypeError",
    "UpcastError",
    "Upcaster",
    "decode_envelope",
    "encode_envelope",
    "encode_payload",
    "utc_from_timestamp",
]
