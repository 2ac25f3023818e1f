"""Calls between services over HTTP: by service name, with a policy per target service."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import httpx

from atoll._urls import redact
from atoll.determinism import Clock, RandomSource, SystemClock
from atoll.resilience._breaker import CircuitBreaker
from atoll.resilience._classify import CONNECT_ONLY, HTTP
from atoll.resilience._deadline import DEADLINE_HEADER, current_deadline
from atoll.resilience._errors import (
    CallTimeoutError,
    DeadlineExceededError,
    InvalidPolicyError,
    ResilienceError,
)
from atoll.resilience._pipeline import Pipeline
from atoll.resilience._propagation import current_trace_headers
from atoll.resilience._registry import ResilienceRegistry
from atoll.resilience._retry import Retry, RetryBudget
from atoll.resilience._timeout import Timeout
from atoll.resilience._timer import race

#: Methods that may be sent twice without changing the outcome (RFC 9110, 9.2.2).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class UnknownServiceError(ResilienceError, LookupError):
    """No address is known for the service called."""


def default_service_policy(
    service: str, *, clock: Clock | None = None, random: RandomSource | None = None
) -> Pipeline:
    """The policy a :class:`ServiceClient` gives a service it has no policy for.

    10 s for the whole call; up to 3 attempts of at most 3 s each, retrying transient
    HTTP failures with jittered backoff (50 ms doubling, at most 1 s) within a retry
    budget of 20 % of calls; and a breaker named after the service over the last 100
    calls (opening at 50 % failures out of at least 20, for 30 s).
    """
    return Pipeline(
        name=service,
        timeout=Timeout(10.0, name=f"{service}.timeout", clock=clock),
        retry=Retry(
            max_attempts=3,
            base_delay=0.05,
            max_delay=1.0,
            classifier=HTTP,
            budget=RetryBudget(name=service, clock=clock),
            name=service,
            clock=clock,
            random=random,
        ),
        breaker=CircuitBreaker(service, classifier=HTTP, clock=clock),
        attempt_timeout=Timeout(3.0, name=f"{service}.attempt_timeout", clock=clock),
    )


class ServiceClient:
    """An HTTP client for calls to other services, by name.

    * ``addresses`` maps service names to a base URL (``http://127.0.0.1:8001``) or to
      several, one per instance (``atoll run`` gives every instance ``atoll up`` runs):
      each attempt goes to the next instance in turn, so a retry or a hedge reaches
      another one.
    * ``policies`` gives a :class:`Pipeline` per service; a service without one gets
      ``default_policy(service)`` (by default :func:`default_service_policy`), made once.
    * Requests that are not idempotent (POST and PATCH without an ``Idempotency-Key``
      header, or ``idempotent=False``) go through the same pipeline minus its hedge and
      with a retry that only retries errors proving nothing was sent (``CONNECT_ONLY``).
    * Every request carries the current deadline (:data:`DEADLINE_HEADER`) and trace
      headers; ``trace_headers`` is the hook that supplies the latter (default: those
      the :class:`PropagationMiddleware` received). A request is not sent once the
      deadline has passed (:class:`DeadlineExceededError`), and no request waits past it.
    * The pipelines' breakers, retries and the like are added to ``registry`` for metrics
      and ``/atoll/breakers``.

    Responses are returned whatever their status, after the policies have seen them (a
    503 counts as a failure, is retried, and is returned if retrying stops).
    """

    def __init__(
        self,
        addresses: Mapping[str, str | Sequence[str]],
        *,
        policies: Mapping[str, Pipeline] | None = None,
        default_policy: Callable[[str], Pipeline] | None = None,
        registry: ResilienceRegistry | None = None,
        trace_headers: Callable[[], Mapping[str, str]] | None = None,
        headers: Mapping[str, str] | None = None,
        request_timeout: float = 30.0,
        clock: Clock | None = None,
        random: RandomSource | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        limits: httpx.Limits | None = None,
    ) -> None:
        self._addresses: dict[str, tuple[str, ...]] = {}
        self._turns: dict[str, int] = {}
        for service, given in addresses.items():
            bases = (given,) if isinstance(given, str) else tuple(given)
            if not bases:
                raise InvalidPolicyError(f"addresses.{service}", "no address")
            for address in bases:
                parts = urlsplit(address)
                if parts.scheme not in ("http", "https") or not parts.netloc:
                    raise InvalidPolicyError(
                        f"addresses.{service}", f"{redact(address)!r} is not an http(s) URL"
                    )
            self._addresses[service] = tuple(address.rstrip("/") for address in bases)
            self._turns[service] = 0
        self._clock: Clock = clock or SystemClock()
        self._random = random or RandomSource()
        self._default = default_policy or (
            lambda service: default_service_policy(service, clock=self._clock, random=self._random)
        )
        self.registry = registry if registry is not None else ResilienceRegistry()
        self._safe: dict[str, Pipeline] = {}
        self._unsafe: dict[str, Pipeline] = {}
        for service, pipeline in (policies or {}).items():
            self._adopt(service, pipeline)
        self._trace_headers = trace_headers or current_trace_headers
        self._request_timeout = request_timeout
        self._http = httpx.AsyncClient(
            headers=dict(headers or {}),
            timeout=request_timeout,
            transport=transport,
            limits=limits or httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    def _adopt(self, service: str, pipeline: Pipeline) -> None:
        if not isinstance(pipeline, Pipeline):
            raise InvalidPolicyError(f"policies.{service}", f"must be a Pipeline, not {pipeline!r}")
        self.registry.add(pipeline)
        self._safe[service] = pipeline
        retry = pipeline.retry
        self._unsafe[service] = pipeline.replace(
            hedge=None, retry=None if retry is None else retry.with_classifier(CONNECT_ONLY)
        )

    @property
    def http(self) -> httpx.AsyncClient:
        """The underlying connection pool (for instrumentation)."""
        return self._http

    def policy(self, service: str, *, idempotent: bool = True) -> Pipeline:
        """The pipeline requests to ``service`` go through."""
        if service not in self._safe:
            self._adopt(service, self._default(service))
        return self._safe[service] if idempotent else self._unsafe[service]

    def _bases(self, service: str) -> tuple[str, ...]:
        try:
            return self._addresses[service]
        except KeyError:
            known = ", ".join(sorted(self._addresses)) or "none"
            raise UnknownServiceError(
                f"no address for service {service!r} (known: {known})"
            ) from None

    def url(self, service: str, path: str) -> str:
        """The absolute URL of ``path`` on ``service``: on its next instance in turn."""
        bases = self._bases(service)
        if len(bases) == 1:
            base = bases[0]
        else:
            turn = self._turns[service]
            self._turns[service] = turn + 1
            base = bases[turn % len(bases)]
        return f"{base}/{path.lstrip('/')}"

    async def request(
        self,
        service: str,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | str | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send a request to ``service`` through its policy and return the response."""
        method = method.upper()
        self._bases(service)  # an unknown service fails here, before any policy
        if idempotent is None:
            keyed = headers is not None and any(k.lower() == "idempotency-key" for k in headers)
            idempotent = method in IDEMPOTENT_METHODS or keyed
        pipeline = self.policy(service, idempotent=idempotent)
        return await pipeline.call(
            self._send,
            service=service,
            method=method,
            path=path,
            params=params,
            headers=headers,
            json=json,
            content=content,
        )

    async def _send(
        self,
        *,
        service: str,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        headers: Mapping[str, str] | None,
        json: Any,
        content: bytes | str | None,
    ) -> httpx.Response:
        url = self.url(service, path)  # per attempt: a retry goes to the next instance
        outgoing = dict(self._trace_headers())
        if headers:
            outgoing.update(headers)
        limit = self._request_timeout
        by_deadline = False
        deadline = current_deadline()
        if deadline is not None:
            left = deadline.remaining()
            if left <= 0:
                raise DeadlineExceededError(
                    f"{method} {service}: the deadline had passed; the request was not sent"
                )
            outgoing[DEADLINE_HEADER] = deadline.to_header()
            if left < limit:
                limit, by_deadline = left, True
        timer: asyncio.Timeout | None = None
        try:
            async with race(self._clock, limit) as timer:
                return await self._http.request(
                    method, url, params=params, headers=outgoing, json=json, content=content
                )
        except TimeoutError as exc:
            if timer is None or not timer.expired():
                raise
            if by_deadline:
                raise DeadlineExceededError(
                    f"{method} {service}: the deadline passed after {limit:.3f} s; "
                    "the request was cancelled"
                ) from exc
            raise CallTimeoutError(f"{method} {service}: no response within {limit:.3f} s") from exc

    async def get(self, service: str, path: str, **kwargs: Any) -> httpx.Response:
        """``request(service, "GET", path, ...)``."""
        return await self.request(service, "GET", path, **kwargs)

    async def post(self, service: str, path: str, **kwargs: Any) -> httpx.Response:
        """``request(service, "POST", path, ...)``."""
        return await self.request(service, "POST", path, **kwargs)

    async def put(self, service: str, path: str, **kwargs: Any) -> httpx.Response:
        """``request(service, "PUT", path, ...)``."""
        return await self.request(service, "PUT", path, **kwargs)

    async def patch(self, service: str, path: str, **kwargs: Any) -> httpx.Response:
        """``request(service, "PATCH", path, ...)``."""
        return await self.request(service, "PATCH", path, **kwargs)

    async def delete(self, service: str, path: str, **kwargs: Any) -> httpx.Response:
        """``request(service, "DELETE", path, ...)``."""
        return await self.request(service, "DELETE", path, **kwargs)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
