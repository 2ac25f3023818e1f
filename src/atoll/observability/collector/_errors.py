"""Errors of the embedded collector, rooted at :class:`atoll.AtollError`."""

from __future__ import annotations

from atoll._errors import AtollError


class CollectorError(AtollError):
    """The collector could not do what was asked."""


class MalformedRequestError(CollectorError):
    """An export request could not be decoded (HTTP 400; the client must not retry)."""


class PayloadTooLargeError(CollectorError):
    """An export request, or its decompressed body, exceeds the size limit (HTTP 413)."""


class UnsupportedMediaTypeError(CollectorError):
    """An export request has a content type or content encoding the collector cannot read."""


class CollectorOverloadedError(CollectorError):
    """The write queue is full; the client should retry later (HTTP 503 with Retry-After)."""


class CollectorStorageError(CollectorError):
    """The span store failed; nothing of the failed write was kept (HTTP 503)."""


class CollectorClosedError(CollectorError):
    """The span store is not open (before startup or after shutdown)."""
