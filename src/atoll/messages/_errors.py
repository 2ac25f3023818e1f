"""Errors raised while decoding messages. Each names what was wrong."""

from __future__ import annotations

from atoll._errors import AtollError


class MessageError(AtollError):
    """A message could not be turned into a typed value."""


class MalformedEnvelopeError(MessageError):
    """The bytes are not a valid envelope."""


class UnknownMessageTypeError(MessageError):
    """No class is registered for the envelope's type."""

    def __init__(self, message_type: str) -> None:
        super().__init__(f"unknown message type {message_type!r}")
        self.message_type = message_type


class MessageValidationError(MessageError):
    """The payload does not match the declared schema of its type."""

    def __init__(self, message_type: str, version: int, detail: str) -> None:
        super().__init__(f"payload of {message_type!r} v{version} is invalid: {detail}")
        self.message_type = message_type
        self.version = version
        self.detail = detail


class UpcastError(MessageError):
    """An older payload could not be brought to the current version."""
