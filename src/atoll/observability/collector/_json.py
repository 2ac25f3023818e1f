"""A fast path for OTLP/JSON: the forms SDKs send, straight to rows.

protobuf's JSON parser is pure Python and costs about 100 µs per span. This walks the
decoded document directly for what the OTLP JSON mapping and real exporters produce:
lowerCamelCase or proto field names, hex (or base64) ids, enums as integers or names,
64-bit integers as strings or numbers. On anything else (a null, a float where an
integer belongs, a string where a number belongs, a oneof with two members, a field of
the wrong type) it raises :class:`Fallback`, and the caller hands the whole document to
protobuf's parser instead, which then accepts it or says exactly what is wrong. So this
path only ever accepts what the reference parser accepts, and produces the same rows
(a test compares the two on generated requests).
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, Final

from google.protobuf import json_format
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

_MAX_UINT32: Final = (1 << 32) - 1
_MAX_UINT64: Final = (1 << 64) - 1
_MIN_INT64: Final = -(1 << 63)
_MAX_INT64: Final = (1 << 63) - 1
#: The protobuf path cuts nested values at this depth; so must this one.
MAX_VALUE_DEPTH: Final = 16
#: Deeper than protobuf's parser goes (100): let it say so.
_MAX_DEPTH: Final = 90

SPAN_KINDS: Final = {
    "SPAN_KIND_UNSPECIFIED": 0,
    "SPAN_KIND_INTERNAL": 1,
    "SPAN_KIND_SERVER": 2,
    "SPAN_KIND_CLIENT": 3,
    "SPAN_KIND_PRODUCER": 4,
    "SPAN_KIND_CONSUMER": 5,
}
STATUS_CODES: Final = {"STATUS_CODE_UNSET": 0, "STATUS_CODE_OK": 1, "STATUS_CODE_ERROR": 2}


class Fallback(Exception):  # noqa: N818 - a signal to the caller, not an error
    """This document needs protobuf's own JSON parser."""


def field(obj: dict[str, Any], camel: str, snake: str) -> Any:
    """A field by its JSON name or its proto name (None when absent)."""
    if camel in obj:
        if snake != camel and snake in obj:
            raise Fallback
        return obj[camel]
    return obj.get(snake)


def as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if type(value) is not list:
        raise Fallback
    return value


def as_dict(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise Fallback
    return value


def as_str(value: Any) -> str:
    if value is None:
        raise Fallback
    if type(value) is not str:
        raise Fallback
    return value


def opt_str(value: Any) -> str:
    return "" if value is None else as_str(value)


def as_int(value: Any, low: int, high: int) -> int:
    """An integer given as a JSON number or a decimal string, within [low, high]."""
    if type(value) is int:
        number = value
    elif type(value) is str and value.isascii() and value.removeprefix("-").isdigit():
        number = int(value)
    else:
        raise Fallback
    if not low <= number <= high:
        raise Fallback
    return number


def opt_uint32(value: Any) -> int:
    return 0 if value is None else as_int(value, 0, _MAX_UINT32)


def opt_uint64(value: Any) -> int:
    return 0 if value is None else as_int(value, 0, _MAX_UINT64)


def opt_enum(value: Any, names: dict[str, int]) -> int:
    if value is None:
        return 0
    if type(value) is int and 0 <= value < len(names):
        return value
    if type(value) is str and value in names:
        return names[value]
    raise Fallback


def _bytes(text: str) -> bytes:
    padded = text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)
    try:
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        raise Fallback from None


def as_id(value: Any, size: int) -> bytes:
    """An id in hex (the OTLP JSON mapping) or base64; one byte, so invalid, if neither."""
    if value is None:
        return b""
    text = as_str(value)
    if len(text) == size * 2:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    try:
        return _bytes(text)
    except Fallback:
        return b"\x00"


def any_value(value: Any, depth: int = 0) -> Any:  # noqa: C901, PLR0911, PLR0912 - one per kind
    """An OTLP/JSON ``AnyValue`` as stored (as ``_decode.any_value`` makes it)."""
    if type(value) is not dict or depth > _MAX_DEPTH:
        raise Fallback
    if not value:
        return None
    if len(value) != 1:
        raise Fallback
    ((kind, inner),) = value.items()
    if kind in ("stringValue", "string_value"):
        return as_str(inner)
    if kind in ("intValue", "int_value"):
        return as_int(inner, _MIN_INT64, _MAX_INT64)
    if kind in ("boolValue", "bool_value"):
        if type(inner) is not bool:
            raise Fallback
        return inner
    if kind in ("doubleValue", "double_value"):
        if type(inner) not in (int, float):
            raise Fallback
        try:
            number = float(inner)
        except OverflowError:
            raise Fallback from None
        return number if math.isfinite(number) else str(number)
    if kind in ("arrayValue", "array_value"):
        items = as_list(as_dict(inner).get("values"))
        if depth >= MAX_VALUE_DEPTH:
            for item in items:
                any_value(item, depth + 1)  # still validated, as protobuf parses it all
            return "…"
        return [any_value(item, depth + 1) for item in items]
    if kind in ("kvlistValue", "kvlist_value"):
        pairs = as_list(as_dict(inner).get("values"))
        converted = attributes(pairs, depth + 1)
        return "…" if depth >= MAX_VALUE_DEPTH else converted
    if kind in ("bytesValue", "bytes_value"):
        return base64.b64encode(_bytes(as_str(inner))).decode("ascii")
    raise Fallback


def attributes(value: Any, depth: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in as_list(value):
        pair = as_dict(item)
        key = opt_str(pair.get("key"))
        inner = pair.get("value")
        out[key] = None if inner is None else any_value(inner, depth)
    return out


def resource(value: Any) -> Resource:
    """The resource, by protobuf's parser: once per request, and its digest must match the
    protobuf path's exactly."""
    message = Resource()
    if value is not None:
        try:
            json_format.ParseDict(as_dict(value), message, ignore_unknown_fields=True)
        except Exception:
            raise Fallback from None
    return message


def scope(value: Any) -> InstrumentationScope:
    message = InstrumentationScope()
    if value is not None:
        try:
            json_format.ParseDict(as_dict(value), message, ignore_unknown_fields=True)
        except Exception:
            raise Fallback from None
    return message
