"""A client of the operator API of orchestrating services (``/atoll/sagas``).

``atoll sagas`` uses it. It finds the services of a system in ``atoll.toml`` (or is
given one URL), asks each whether it runs sagas, and sends every action to the
service that owns the instance: that service applies it as one recorded transition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import quote

import httpx

from atoll._errors import AtollError
from atoll.config import LoadedConfig

PREFIX = "/atoll/sagas"


class AdminError(AtollError):
    """The operator API refused or could not be reached; the message says which and why."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A service's HTTP API."""

    service: str
    url: str


def endpoints(
    loaded: LoadedConfig | None, *, service: str | None, url: str | None
) -> list[Endpoint]:
    """The services to ask: ``url`` alone, or ``service`` (else all) from the config."""
    if url is not None:
        return [Endpoint(service or url, url.rstrip("/"))]
    if loaded is None:
        raise AdminError("give --url, or an atoll.toml with --config")
    names = [service] if service else sorted(loaded.config.services)
    found = []
    for name in names:
        section = loaded.service(name)
        host = "127.0.0.1" if section.host in ("0.0.0.0", "::", "") else section.host  # noqa: S104 - a listen-all address means: ask locally
        if ":" in host:
            host = f"[{host}]"
        found.append(Endpoint(name, f"http://{host}:{section.port}"))
    return found


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:300]


class SagaAdminClient:
    """Talks to the ``/atoll/sagas`` API of one or more services."""

    def __init__(
        self,
        targets: list[Endpoint],
        *,
        timeout: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.targets = targets
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self.unreachable: list[str] = []
        self._engines: list[Endpoint] | None = None

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, target: Endpoint, path: str, **params: Any) -> httpx.Response:
        query = {k: v for k, v in params.items() if v is not None}
        return self._http.get(f"{target.url}{PREFIX}{path}", params=query)

    def engines(self) -> list[Endpoint]:
        """The targets that run sagas (answer ``/atoll/sagas/definitions``)."""
        if self._engines is not None:
            return self._engines
        found = []
        for target in self.targets:
            try:
                response = self._get(target, "/definitions")
            except httpx.HTTPError as exc:
                self.unreachable.append(f"{target.service} at {target.url} ({exc})")
                continue
            if response.status_code == 200:
                found.append(target)
        if not found:
            tried = ", ".join(f"{t.service} at {t.url}" for t in self.targets) or "none"
            raise AdminError(f"no service with sagas answered (asked: {tried})")
        self._engines = found
        return found

    def definitions(self) -> list[dict[str, Any]]:
        """Every definition of every orchestrating service."""
        return [
            {"service": target.service, **entry}
            for target in self.engines()
            for entry in self._get(target, "/definitions").json()
        ]

    def instances(
        self, *, state: str | None = None, name: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Instances of every orchestrating service, most recently changed first."""
        found = []
        for target in self.engines():
            response = self._get(target, "", state=state, name=name, limit=limit)
            if response.status_code != 200:
                raise AdminError(f"{target.service}: {_detail(response)}")
            found += [{"service": target.service, **item} for item in response.json()]
        found.sort(key=lambda item: item["updated_at"], reverse=True)
        return found[:limit]

    def counts(self) -> list[dict[str, Any]]:
        """Instances by service, name and state."""
        found = []
        for target in self.engines():
            found += [
                {"service": target.service, **item} for item in self._get(target, "/counts").json()
            ]
        return found

    def find(self, saga_id: str) -> tuple[Endpoint, dict[str, Any]]:
        """The service owning ``saga_id`` and the instance's view."""
        for target in self.engines():
            response = self._get(target, f"/{quote(saga_id, safe='')}")
            if response.status_code == 200:
                return target, response.json()
            if response.status_code != 404:
                raise AdminError(f"{target.service}: {_detail(response)}")
        asked = ", ".join(t.service for t in self.engines())
        raise AdminError(f"no saga {saga_id!r} in any service (asked: {asked})")

    def act(self, saga_id: str, action: str, body: dict[str, Any]) -> dict[str, Any]:
        """Apply an operator action at the owning service; the instance's new view."""
        target, _ = self.find(saga_id)
        response = self._http.post(
            f"{target.url}{PREFIX}/{quote(saga_id, safe='')}/{action}", json=body
        )
        if response.status_code != 200:
            raise AdminError(f"{action} {saga_id}: {_detail(response)}")
        result: dict[str, Any] = response.json()
        return result

    def diagram(self, name: str, version: int | None = None) -> str:
        """The Mermaid diagram of definition ``name`` from the service that has it."""
        for target in self.engines():
            response = self._get(
                target, f"/definitions/{quote(name, safe='')}/diagram", version=version
            )
            if response.status_code == 200:
                return response.text
        raise AdminError(f"no service has a saga or process named {name!r}")
