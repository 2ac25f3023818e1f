"""OTLP/HTTP trace, log and metric export, as opentelemetry-proto's
``docs/specification.md`` says.

* ``POST /v1/traces``, ``POST /v1/logs`` and ``POST /v1/metrics`` (with a
  :class:`~atoll.observability.collector._metrics.MetricStore`) with ``application/x-protobuf`` or
  ``application/json``, optionally ``Content-Encoding: gzip`` (or ``deflate``).
* 200 with an ``ExportTraceServiceResponse`` (``ExportLogsServiceResponse``) in the
  request's encoding; when some spans (log records) are invalid, ``partial_success`` says
  how many were rejected and why, and the valid ones are stored.
* 400 when the body cannot be decoded, 413 when it (or what it decompresses to) is over
  the limit, 415 for a content type or encoding the collector does not read. The body of
  an error is a ``google.rpc.Status`` in the request's encoding (JSON when the encoding
  itself is what is unsupported). The spec says clients must not retry 400 and 413.
* 503 with ``Retry-After`` when the write queue is full or the store failed: the spec
  makes 503 retryable, and nothing of the request was kept.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, Literal

import msgspec
from google.rpc import status_pb2
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceResponse,
)

from atoll.observability.collector._decode import DecodedBatch, OTLPDecoder
from atoll.observability.collector._errors import (
    CollectorClosedError,
    CollectorOverloadedError,
    CollectorStorageError,
    MalformedRequestError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from atoll.observability.collector._metrics import MetricsOutcome, MetricStore, parse_metrics
from atoll.observability.collector._store import SpanStore
from atoll.persistence import DatabaseError

log = logging.getLogger("atoll.collector")

Encoding = Literal["protobuf", "json"]
#: The OTLP signals the collector takes.
Signal = Literal["traces", "logs", "metrics"]

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_MEDIA_TYPES: Final[dict[str, Encoding]] = {
    "application/x-protobuf": "protobuf",
    "application/protobuf": "protobuf",
    "application/json": "json",
}
_CONTENT_TYPES: Final[dict[Encoding, str]] = {"protobuf": PROTOBUF, "json": JSON}

#: google.rpc.Code values.
_INVALID_ARGUMENT: Final = 3
_UNAVAILABLE: Final = 14

DEFAULT_MAX_BODY_BYTES: Final = 20 * 1024 * 1024
_CLIENT_ERRORS: Final[dict[type[Exception], int]] = {
    UnsupportedMediaTypeError: 415,
    PayloadTooLargeError: 413,
    MalformedRequestError: 400,
}


@dataclass(frozen=True, slots=True)
class OTLPResponse:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def media_encoding(content_type: str | None) -> Encoding | None:
    """``protobuf`` or ``json`` for a Content-Type header (parameters ignored), else None."""
    if not content_type:
        return None
    return _MEDIA_TYPES.get(content_type.split(";", 1)[0].strip().lower())


def status_body(encoding: Encoding, code: int, message: str) -> bytes:
    """A ``google.rpc.Status``, as the spec wants for the body of a failed export."""
    if encoding == "protobuf":
        result: bytes = status_pb2.Status(code=code, message=message).SerializeToString()
        return result
    return msgspec.json.encode({"code": code, "message": message})


def success_body(encoding: Encoding, batch: DecodedBatch, signal: Signal = "traces") -> bytes:
    response: ExportTraceServiceResponse | ExportLogsServiceResponse
    if signal == "logs":
        response = ExportLogsServiceResponse()
        if batch.rejected:
            response.partial_success.rejected_log_records = batch.rejected
            response.partial_success.error_message = batch.error_message()
    else:
        response = ExportTraceServiceResponse()
        if batch.rejected:
            response.partial_success.rejected_spans = batch.rejected
            response.partial_success.error_message = batch.error_message()
    if encoding == "protobuf":
        return response.SerializeToString()
    if not batch.rejected:
        return b"{}"
    # int64 as a string, as protobuf's JSON mapping writes it; OTLP/JSON accepts both.
    rejected = "rejectedLogRecords" if signal == "logs" else "rejectedSpans"
    return msgspec.json.encode(
        {"partialSuccess": {rejected: str(batch.rejected), "errorMessage": batch.error_message()}}
    )


def metrics_success_body(encoding: Encoding, outcome: MetricsOutcome) -> bytes:
    """An ``ExportMetricsServiceResponse``: ``partial_success`` counts refused points."""
    if encoding == "protobuf":
        response = ExportMetricsServiceResponse()
        if outcome.rejected:
            response.partial_success.rejected_data_points = outcome.rejected
            response.partial_success.error_message = outcome.error_message()
        return response.SerializeToString()
    if not outcome.rejected:
        return b"{}"
    return msgspec.json.encode(
        {
            "partialSuccess": {
                "rejectedDataPoints": str(outcome.rejected),
                "errorMessage": outcome.error_message(),
            }
        }
    )


def decompress(data: bytes, encoding: str, limit: int) -> bytes:
    """Inflate a gzip or deflate body, refusing to produce more than ``limit`` bytes."""
    # gzip (header and trailer checked) or zlib; gzip bodies may hold several members.
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    out = bytearray()
    rest = data
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise MalformedRequestError(f"the {encoding} body is corrupt: {exc}") from exc
        if len(out) > limit:
            raise PayloadTooLargeError(
                f"the body decompresses to more than the limit of {limit} bytes"
            )
        if not inflater.eof:
            raise MalformedRequestError(f"the {encoding} body is truncated")
        rest = inflater.unused_data
        if not rest or encoding != "gzip":
            if rest:
                raise MalformedRequestError(f"the {encoding} body has trailing data")
            return bytes(out)


class OTLPReceiver:
    """Decodes export requests off the event loop and hands them to the store."""

    def __init__(
        self,
        store: SpanStore,
        *,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_in_flight: int = 64,
        retry_after: int = 1,
        metrics: MetricStore | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, not {max_body_bytes}")
        self.store = store
        #: Where ``/v1/metrics`` goes; without one, metrics are answered 404.
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.retry_after = retry_after
        #: Requests being read, decoded or written at once; more get 503 before their
        #: body is read, which bounds the memory that bodies in flight can take.
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self.decoder = OTLPDecoder(
            store.resources, store.scopes, collect_terms=store.index_attributes
        )
        self._executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._executor is None:
            # One thread: decoding holds the GIL, so more threads would not decode faster;
            # off the loop it overlaps with SQLite, which releases the GIL while it works.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="atoll-collector-decode")

    def stop(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _decode(
        self, body: bytes, encoding: Encoding, content_encoding: str | None, signal: Signal
    ) -> DecodedBatch:
        if content_encoding is not None:
            body = decompress(body, content_encoding, self.max_body_bytes)
        if signal == "logs":
            now_ns = int(self.store.clock.time() * 1e9)
            if encoding == "protobuf":
                return self.decoder.decode_logs_protobuf(body, now_ns)
            return self.decoder.decode_logs_json(body, now_ns)
        if encoding == "protobuf":
            return self.decoder.decode_protobuf(body)
        return self.decoder.decode_json(body)

    async def export(
        self,
        content_type: str | None,
        content_encoding: str | None,
        content_length: str | None,
        chunks: AsyncIterator[bytes],
        signal: Signal = "traces",
    ) -> OTLPResponse:
        """Handle one ``POST /v1/traces`` (or ``/v1/logs``, with ``signal="logs"``); never
        raises for anything the client sent."""
        encoding = media_encoding(content_type)
        if encoding is None:
            return self._error(
                "json",
                415,
                f"unsupported content type {content_type or '(none)'!r}; send {PROTOBUF} or {JSON}",
            )
        if self._in_flight >= self.max_in_flight:
            return self._unavailable(
                encoding, f"{self._in_flight} export requests are in progress; try again shortly"
            )
        self._in_flight += 1
        try:
            if signal == "metrics":
                outcome = await self._accept_metrics(
                    encoding, content_encoding, content_length, chunks
                )
                answer = metrics_success_body(encoding, outcome)
            else:
                batch = await self._accept(
                    encoding, content_encoding, content_length, chunks, signal
                )
                await self.store.write(batch)
                answer = success_body(encoding, batch, signal)
        except (UnsupportedMediaTypeError, PayloadTooLargeError, MalformedRequestError) as exc:
            status = _CLIENT_ERRORS[type(exc)]
            if status == 400:
                log.info("rejected an export request: %s", exc)
            return self._error(encoding, status, str(exc))
        except CollectorOverloadedError as exc:
            return self._unavailable(encoding, str(exc))
        except (CollectorStorageError, CollectorClosedError, DatabaseError) as exc:
            return self._unavailable(encoding, str(exc), retry_after=max(5, self.retry_after))
        finally:
            self._in_flight -= 1
        return OTLPResponse(200, _CONTENT_TYPES[encoding], answer)

    async def _accept(
        self,
        encoding: Encoding,
        content_encoding: str | None,
        content_length: str | None,
        chunks: AsyncIterator[bytes],
        signal: Signal,
    ) -> DecodedBatch:
        compression = _content_encoding(content_encoding)
        body = await self._read(content_length, chunks)
        executor = self._executor
        if executor is None:
            raise CollectorClosedError("the collector is not running")
        return await asyncio.get_running_loop().run_in_executor(
            executor, self._decode, body, encoding, compression, signal
        )

    async def _accept_metrics(
        self,
        encoding: Encoding,
        content_encoding: str | None,
        content_length: str | None,
        chunks: AsyncIterator[bytes],
    ) -> MetricsOutcome:
        metrics = self.metrics
        if metrics is None:
            raise CollectorClosedError("this collector takes no metrics")
        compression = _content_encoding(content_encoding)
        body = await self._read(content_length, chunks)
        executor = self._executor
        if executor is None:
            raise CollectorClosedError("the collector is not running")

        def decode_and_apply() -> MetricsOutcome:
            if compression is not None:
                raw = decompress(body, compression, self.max_body_bytes)
            else:
                raw = body
            return metrics.apply(parse_metrics(raw, encoding))

        return await asyncio.get_running_loop().run_in_executor(executor, decode_and_apply)

    async def _read(self, content_length: str | None, chunks: AsyncIterator[bytes]) -> bytes:
        limit = self.max_body_bytes
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise MalformedRequestError(f"invalid Content-Length {content_length!r}") from None
            if declared > limit:
                raise PayloadTooLargeError(
                    f"the body of {declared} bytes is over the limit of {limit} bytes"
                )
        body = bytearray()
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                raise PayloadTooLargeError(f"the body is over the limit of {limit} bytes")
        return bytes(body)

    def _error(self, encoding: Encoding, status: int, message: str) -> OTLPResponse:
        return OTLPResponse(
            status, _CONTENT_TYPES[encoding], status_body(encoding, _INVALID_ARGUMENT, message)
        )

    def _unavailable(
        self, encoding: Encoding, message: str, *, retry_after: int | None = None
    ) -> OTLPResponse:
        log.warning("asked an exporter to retry: %s", message)
        return OTLPResponse(
            503,
            _CONTENT_TYPES[encoding],
            status_body(encoding, _UNAVAILABLE, message),
            (("retry-after", str(retry_after or self.retry_after)),),
        )


def _content_encoding(header: str | None) -> str | None:
    """``gzip``, ``deflate`` or None (identity) for a Content-Encoding header."""
    if header is None:
        return None
    codings = [c.strip().lower() for c in header.split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) > 1:
        raise UnsupportedMediaTypeError(f"unsupported Content-Encoding {header!r}")
    coding = codings[0]
    if coding in ("gzip", "x-gzip"):
        return "gzip"
    if coding == "deflate":
        return "deflate"
    raise UnsupportedMediaTypeError(
        f"unsupported Content-Encoding {header!r}; send gzip, deflate or none"
    )
