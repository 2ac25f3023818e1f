"""Typed events to stored bytes and back: upcasting, unknown types, personal fields."""

from __future__ import annotations

import base64
import binascii
import logging
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from atoll.eventstore._base import Transaction
from atoll.eventstore._crypto import Personal, SubjectKeys, decrypt, encrypt
from atoll.eventstore._errors import CorruptEventError, KeyStoreError, UpcastFailedError
from atoll.eventstore._model import (
    EventData,
    RawEvent,
    decode_metadata,
    encode_metadata,
    normalize_event_id,
)
from atoll.messages import Event, MessageRegistry
from atoll.messages._errors import MessageError, MessageValidationError
from atoll.persistence import Session

log = logging.getLogger("atoll.eventstore")

E_co = TypeVar("E_co", covariant=True)

#: The key under which a payload carries its encrypted personal fields.
PERSONAL_KEY = "_personal"
_PERSONAL_MARK = b'"_personal"'

_encoder = msgspec.json.Encoder()
_dict_decoder = msgspec.json.Decoder(dict[str, Any])


class UnknownEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event whose type this code does not know, kept as its raw JSON data."""

    type: str
    version: int
    data: Any


@dataclass(frozen=True, slots=True)
class EventRecord(Generic[E_co]):
    """A typed event with where and when it was recorded.

    ``type_version`` is the version the event was written with (before upcasting).
    ``erased`` names the personal fields that read as erased because their data
    subject was forgotten.
    """

    event: E_co
    stream_id: str
    version: int
    position: int
    event_id: str
    recorded_at: float
    type: str
    type_version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    erased: frozenset[str] = frozenset()


def _is_personal(annotation: Any) -> bool:
    return typing.get_origin(annotation) is typing.Annotated and any(
        marker is Personal for marker in getattr(annotation, "__metadata__", ())
    )


def _erased_value(info: msgspec.inspect.Field, owner: str) -> Any:
    """What a personal field reads as once its subject is forgotten."""
    if info.default is not msgspec.NODEFAULT:
        return msgspec.to_builtins(info.default)
    if info.default_factory is not msgspec.NODEFAULT:
        return msgspec.to_builtins(info.default_factory())
    kind = info.type
    if isinstance(kind, msgspec.inspect.UnionType) and any(
        isinstance(t, msgspec.inspect.NoneType) for t in kind.types
    ):
        return None
    zeros: dict[type[msgspec.inspect.Type], Any] = {
        msgspec.inspect.StrType: "",
        msgspec.inspect.BytesType: "",
        msgspec.inspect.IntType: 0,
        msgspec.inspect.FloatType: 0.0,
        msgspec.inspect.BoolType: False,
        msgspec.inspect.ListType: [],
        msgspec.inspect.DictType: {},
    }
    for kind_type, zero in zeros.items():
        if isinstance(kind, kind_type):
            return zero
    raise TypeError(
        f"personal field {owner}.{info.name} must have a default, allow None, or be a str, "
        "bytes, number, bool, list or dict, so that it can read as erased"
    )


@dataclass(frozen=True, slots=True)
class Shape:
    """How one struct class is stored: its personal fields and what they read as erased."""

    cls: type[msgspec.Struct]
    decoder: msgspec.json.Decoder[Any]
    #: attribute name -> encoded (JSON) name
    personal: dict[str, str]
    subject: str | None
    erased: dict[str, Any]


def shape_of(
    cls: type[msgspec.Struct], subject: str | None, *, external_subject: bool = False
) -> Shape:
    """Inspect ``cls`` (fields marked ``Annotated[..., Personal]``).

    ``subject`` names the field that identifies the data subject; with
    ``external_subject`` the subject is given when sealing instead (an aggregate's id).
    """
    personal = {f.name: f.encode_name for f in msgspec.structs.fields(cls) if _is_personal(f.type)}
    if PERSONAL_KEY in {f.encode_name for f in msgspec.structs.fields(cls)}:
        raise TypeError(f"{cls.__qualname__}: the field name {PERSONAL_KEY!r} is reserved")
    erased: dict[str, Any] = {}
    if personal and not external_subject:
        if subject is None:
            raise TypeError(
                f"{cls.__qualname__} has personal fields {sorted(personal)} but no "
                "data_subject: name the field that identifies whose data they are"
            )
        if subject in personal:
            raise TypeError(
                f"{cls.__qualname__}.{subject} names the subject: it cannot be personal"
            )
        if subject not in {f.name for f in msgspec.structs.fields(cls)}:
            raise TypeError(f"{cls.__qualname__}.data_subject names no field: {subject!r}")
    if personal:
        info = msgspec.inspect.type_info(cls)
        assert isinstance(info, msgspec.inspect.StructType)
        by_name = {f.name: f for f in info.fields}
        erased = {personal[n]: _erased_value(by_name[n], cls.__qualname__) for n in personal}
    return Shape(
        cls=cls,
        decoder=msgspec.json.Decoder(cls),
        personal=personal,
        subject=subject if personal else None,
        erased=erased,
    )


class EventCodec:
    """Encodes typed events for the store and decodes them again.

    * Old versions are upcast on read with the registry's upcasters (``v1 -> v2 ->
      v3``); a payload newer than the code raises
      :class:`~atoll.eventstore.UpcastFailedError`.
    * An unknown type is kept as :class:`UnknownEvent` (with a logged warning), never
      dropped; an invalid payload raises :class:`~atoll.eventstore.CorruptEventError`
      naming the stream, version and position.
    * Fields marked ``Annotated[T, Personal]`` are encrypted with the key of the data
      subject named by the class's ``data_subject`` field (needs ``keys``).
    """

    def __init__(
        self, registry: MessageRegistry | None = None, *, keys: SubjectKeys | None = None
    ) -> None:
        self.registry = registry if registry is not None else MessageRegistry()
        self.keys = keys
        self._shapes: dict[type[msgspec.Struct], Shape] = {}
        self._warned: set[str] = set()

    def register(self, *classes: type[Event]) -> None:
        """Register event classes (and check their personal-field declarations)."""
        for cls in classes:
            if cls.message_type not in self.registry:
                self.registry.register(cls)
            self.shape(cls)

    def shape(
        self,
        cls: type[msgspec.Struct],
        subject: str | None = None,
        *,
        external_subject: bool = False,
    ) -> Shape:
        """The (cached) :class:`Shape` of a struct class."""
        shape = self._shapes.get(cls)
        if shape is None:
            if subject is None:
                subject = getattr(cls, "data_subject", None)
            shape = shape_of(cls, subject, external_subject=external_subject)
            self._shapes[cls] = shape
        return shape

    @staticmethod
    def dump(value: msgspec.Struct) -> bytes:
        """``value`` as JSON (no personal fields)."""
        return _encoder.encode(value)

    @staticmethod
    def parse(raw: RawEvent) -> dict[str, Any]:
        """The JSON object of ``raw``'s payload, or :class:`CorruptEventError`."""
        return _parse(raw)

    @staticmethod
    def sealed_subjects(data: dict[str, Any]) -> set[str]:
        """The data subject whose key opens ``data``'s personal fields, if any."""
        sealed = data.get(PERSONAL_KEY)
        return {str(sealed.get("s"))} if isinstance(sealed, dict) else set()

    # -- encoding -------------------------------------------------------------------------

    async def encode(
        self,
        event: Event,
        *,
        event_id: str,
        metadata: dict[str, Any] | None = None,
        tx: Transaction | None = None,
    ) -> EventData:
        """``event`` as :class:`~atoll.eventstore.EventData`.

        Personal fields need ``tx``: the subject's key is created in the transaction that
        stores the event.
        """
        cls = type(event)
        if cls.message_type not in self.registry:
            self.registry.register(cls)
        event_id = normalize_event_id(event_id)
        shape = self.shape(cls)
        if shape.personal:
            if tx is None:
                raise ValueError(
                    f"{cls.message_type} has personal fields: encode it inside the transaction "
                    "that appends it (tx=)"
                )
            subject = str(getattr(event, shape.subject or ""))
            data = await self.seal(event, shape, subject, b"event:" + event_id.encode(), tx)
        else:
            data = _encoder.encode(event)
        return EventData(
            event_id=event_id,
            type=cls.message_type,
            type_version=cls.message_version,
            data=data,
            metadata=encode_metadata(metadata or {}),
        )

    async def seal(
        self, value: msgspec.Struct, shape: Shape, subject: str, aad: bytes, tx: Transaction
    ) -> bytes:
        """JSON of ``value`` with its personal fields encrypted under ``subject``'s key."""
        if self.keys is None:
            raise KeyStoreError(
                f"{type(value).__qualname__} has personal fields, but the codec has no "
                "SubjectKeys: pass EventCodec(keys=SubjectKeys(store))"
            )
        payload = msgspec.to_builtins(value)
        secret = {name: payload.pop(name) for name in shape.personal.values()}
        key_id, key = await self.keys.key_for(subject, tx)
        blob = encrypt(key, _encoder.encode(secret), aad, self.keys.entropy)
        payload[PERSONAL_KEY] = {
            "s": subject,
            "k": key_id,
            "f": sorted(secret),
            "c": base64.b64encode(blob).decode("ascii"),
        }
        return _encoder.encode(payload)

    # -- decoding -------------------------------------------------------------------------

    async def decode(
        self, raws: Sequence[RawEvent], *, session: Session | Transaction | None = None
    ) -> list[EventRecord[Event | UnknownEvent]]:
        """Typed records for ``raws``; personal-data keys are read through ``session``."""
        parsed: dict[int, dict[str, Any]] = {}
        subjects: set[str] = set()
        for index, raw in enumerate(raws):
            if _PERSONAL_MARK in raw.data:
                data = _parse(raw)
                sealed = data.get(PERSONAL_KEY)
                if isinstance(sealed, dict):
                    subjects.add(str(sealed.get("s")))
                parsed[index] = data
        keys = await self.keys_for(subjects, session)
        return [self._decode_one(raw, parsed.get(i), keys) for i, raw in enumerate(raws)]

    async def keys_for(
        self, subjects: set[str], session: Session | Transaction | None
    ) -> dict[str, tuple[str, bytes]]:
        """The keys of ``subjects`` that still exist (forgotten ones are missing)."""
        if not subjects:
            return {}
        if self.keys is None:
            raise KeyStoreError(
                "these events carry personal data, but the codec has no SubjectKeys to read it"
            )
        return await self.keys.keys_for(subjects, session)

    def _decode_one(
        self, raw: RawEvent, data: dict[str, Any] | None, keys: dict[str, tuple[str, bytes]]
    ) -> EventRecord[Event | UnknownEvent]:
        cls = self.registry.get(raw.type)
        erased: frozenset[str] = frozenset()
        if cls is None:
            value: Event | UnknownEvent = UnknownEvent(
                type=raw.type, version=raw.type_version, data=_parse(raw) if data is None else data
            )
            if raw.type not in self._warned:
                self._warned.add(raw.type)
                log.warning(
                    "unknown event type %r (first seen at %r v%d): kept as UnknownEvent; "
                    "register its class to read it",
                    raw.type,
                    raw.stream_id,
                    raw.version,
                )
        else:
            if not issubclass(cls, Event):
                raise CorruptEventError(
                    raw.stream_id, raw.version, raw.position, f"{raw.type!r} is not an Event type"
                )
            shape = self.shape(cls)
            current = cls.message_version
            if raw.type_version > current:
                raise UpcastFailedError(
                    raw.stream_id,
                    raw.version,
                    raw.position,
                    f"it was written as {raw.type!r} v{raw.type_version}, newer than this "
                    f"code's v{current}",
                )
            if data is None and not shape.personal and raw.type_version == current:
                value = _typed(raw, shape.decoder)
            else:
                struct, erased = self.open_sealed(
                    raw,
                    shape,
                    _parse(raw) if data is None else data,
                    keys,
                    b"event:" + raw.event_id.encode(),
                )
                assert isinstance(struct, Event)
                value = struct
        return EventRecord(
            event=value,
            stream_id=raw.stream_id,
            version=raw.version,
            position=raw.position,
            event_id=raw.event_id,
            recorded_at=raw.recorded_at,
            type=raw.type,
            type_version=raw.type_version,
            metadata=decode_metadata(raw.metadata),
            erased=erased,
        )

    def open_sealed(
        self,
        raw: RawEvent,
        shape: Shape,
        data: dict[str, Any],
        keys: dict[str, tuple[str, bytes]],
        aad: bytes,
    ) -> tuple[msgspec.Struct, frozenset[str]]:
        """Decrypt (or erase) the personal fields of ``data``, upcast, and convert."""
        sealed = data.pop(PERSONAL_KEY, None)
        erased = False
        if sealed is not None:
            subject, key_id, names, blob = _sealed_parts(raw, sealed)
            found = keys.get(subject)
            if found is None or found[0] != key_id:
                # Forgotten (perhaps with a new key since): erased for good.
                erased = True
                data.update(dict.fromkeys(names))
            else:
                try:
                    secret = _dict_decoder.decode(decrypt(found[1], blob, aad))
                except Exception as exc:
                    raise CorruptEventError(
                        raw.stream_id,
                        raw.version,
                        raw.position,
                        "its personal data failed authentication (tampered with or moved)",
                    ) from exc
                data.update(secret)
        cls = shape.cls
        version = getattr(cls, "message_version", raw.type_version)
        if raw.type_version < version:
            try:
                data = self.registry.upcast(raw.type, raw.type_version, _encoder.encode(data))
            except MessageValidationError as exc:
                raise CorruptEventError(raw.stream_id, raw.version, raw.position, str(exc)) from exc
            except MessageError as exc:
                raise UpcastFailedError(raw.stream_id, raw.version, raw.position, str(exc)) from exc
        names_erased: frozenset[str] = frozenset()
        if erased:
            data.update(shape.erased)
            names_erased = frozenset(shape.personal)
        try:
            return msgspec.convert(data, cls), names_erased
        except msgspec.ValidationError as exc:
            raise CorruptEventError(raw.stream_id, raw.version, raw.position, str(exc)) from exc


def _parse(raw: RawEvent) -> dict[str, Any]:
    try:
        return _dict_decoder.decode(raw.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptEventError(
            raw.stream_id, raw.version, raw.position, f"its payload is not a JSON object: {exc}"
        ) from exc


def _typed(raw: RawEvent, decoder: msgspec.json.Decoder[Any]) -> Event:
    try:
        value = decoder.decode(raw.data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptEventError(raw.stream_id, raw.version, raw.position, str(exc)) from exc
    assert isinstance(value, Event)
    return value


def _sealed_parts(raw: RawEvent, sealed: Any) -> tuple[str, str, list[str], bytes]:
    malformed = CorruptEventError(
        raw.stream_id, raw.version, raw.position, "its sealed personal data is malformed"
    )
    if not isinstance(sealed, dict):
        raise malformed
    subject, key_id = sealed.get("s"), sealed.get("k")
    names, blob = sealed.get("f"), sealed.get("c")
    if not (
        isinstance(subject, str)
        and isinstance(key_id, str)
        and isinstance(names, list)
        and isinstance(blob, str)
    ):
        raise malformed
    try:
        return subject, key_id, [str(n) for n in names], base64.b64decode(blob, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise malformed from exc
