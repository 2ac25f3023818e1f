"""The message registry and codec: type names to classes, bytes to typed messages."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

import msgspec

from atoll.messages._envelope import Envelope
from atoll.messages._errors import (
    MalformedEnvelopeError,
    MessageValidationError,
    UnknownMessageTypeError,
    UpcastError,
)
from atoll.messages._model import Message

M = TypeVar("M", bound=Message)
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]

_envelope_decoder = msgspec.json.Decoder(Envelope)
_encoder = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


def encode_envelope(envelope: Envelope) -> bytes:
    """Encode an envelope as JSON bytes."""
    return _encoder.encode(envelope)


def decode_envelope(data: bytes | memoryview) -> Envelope:
    """Decode JSON bytes into an envelope, or raise :class:`MalformedEnvelopeError`."""
    try:
        return _envelope_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise MalformedEnvelopeError(f"malformed envelope: {exc}") from exc


def encode_payload(message: Message) -> msgspec.Raw:
    """Encode a message's fields as the raw JSON payload of an envelope."""
    return msgspec.Raw(_encoder.encode(message))


def utc_from_timestamp(seconds: float) -> datetime:
    """A timezone-aware UTC datetime from Unix seconds."""
    return datetime.fromtimestamp(seconds, tz=UTC)


class MessageRegistry:
    """Maps wire type names to message classes and brings old payloads up to date.

    Upcasters are registered per ``(type, from_version)`` and must return the payload as
    it looks at ``from_version + 1``. Decoding an envelope at version ``v`` of a class
    now at version ``n`` applies the chain ``v -> v+1 -> ... -> n``; a missing link is an
    :class:`UpcastError`, never a silent guess.
    """

    def __init__(self, classes: Iterable[type[Message]] = ()) -> None:
        self._classes: dict[str, type[Message]] = {}
        self._decoders: dict[str, msgspec.json.Decoder[Any]] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: type[M]) -> type[M]:
        """Register a message class under its ``message_type``. Usable as a decorator."""
        existing = self._classes.get(cls.message_type)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"message type {cls.message_type!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}"
            )
        self._classes[cls.message_type] = cls
        self._decoders[cls.message_type] = msgspec.json.Decoder(cls)
        return cls

    def upcaster(self, message_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Register ``fn`` to upcast ``message_type`` payloads from ``from_version``."""

        def decorator(fn: Upcaster) -> Upcaster:
            self.add_upcaster(message_type, from_version, fn)
            return fn

        return decorator

    def add_upcaster(self, message_type: str, from_version: int, fn: Upcaster) -> None:
        """Register ``fn`` to upcast ``message_type`` payloads from ``from_version``."""
        key = (message_type, from_version)
        if key in self._upcasters:
            raise ValueError(f"an upcaster for {message_type!r} v{from_version} already exists")
        self._upcasters[key] = fn

    def get(self, message_type: str) -> type[Message] | None:
        """The class registered for ``message_type``, or ``None``."""
        return self._classes.get(message_type)

    def __contains__(self, message_type: object) -> bool:
        return message_type in self._classes

    def merge(self, other: MessageRegistry) -> None:
        """Add every class and upcaster of ``other`` to this registry."""
        for cls in other._classes.values():
            self.register(cls)
        for (message_type, version), fn in other._upcasters.items():
            if (message_type, version) not in self._upcasters:
                self._upcasters[(message_type, version)] = fn

    def decode(self, envelope: Envelope) -> Message:
        """The typed message in ``envelope``, upcast to the current version of its class."""
        cls = self._classes.get(envelope.type)
        if cls is None:
            raise UnknownMessageTypeError(envelope.type)
        if envelope.version == cls.message_version:
            try:
                return self._decoders[envelope.type].decode(envelope.payload)  # type: ignore[no-any-return]
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise MessageValidationError(envelope.type, envelope.version, str(exc)) from exc
        payload = self.upcast(envelope.type, envelope.version, envelope.payload)
        try:
            return msgspec.convert(payload, cls)
        except msgspec.ValidationError as exc:
            raise MessageValidationError(envelope.type, cls.message_version, str(exc)) from exc

    def upcast(self, message_type: str, version: int, payload: bytes | msgspec.Raw) -> dict[str, Any]:
        """Apply the upcaster chain to a raw payload, returning it as a dict."""
        cls = self._classes.get(message_type)
        if cls is None:
            raise UnknownMessageTypeError(message_type)
        if version > cls.message_version:
            raise UpcastError(
                f"{message_type!r} v{version} is newer than this code's v{cls.message_version}"
            )
        try:
            data = _dict_decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MessageValidationError(message_type, version, str(exc)) from exc
        while version < cls.message_version:
            fn = self._upcasters.get((message_type, version))
            if fn is None:
                raise UpcastError(
                    f"no upcaster for {message_type!r} from v{version} to v{version + 1}"
                )
            try:
                data = fn(data)
            except Exception as exc:
                raise UpcastError(
                    f"upcaster for {message_type!r} v{version} failed: {exc!r}"
                ) from exc
            version += 1
        return data
