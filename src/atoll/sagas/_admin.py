"""Operator actions on saga instances, over HTTP on the orchestrating service.

The engine mounts this router on its service's HTTP app (``/atoll/sagas`` by
default). ``atoll sagas ...`` is a client of it: actions run in the service that owns
the instances, with its definitions loaded and its single writer, so an operator's
retry is one more transition in the instance's history, recorded with who and why.

===========================================  ======================================
``GET  /atoll/sagas?state=&name=&limit=``    instances, most recently changed first
``GET  /atoll/sagas/counts``                 instances by name and state (metrics)
``GET  /atoll/sagas/definitions``            definitions and versions
``GET  /atoll/sagas/definitions/NAME/diagram``  the Mermaid diagram (text)
``GET  /atoll/sagas/ID``                     one instance: data, steps, history
``POST /atoll/sagas/ID/retry``               ``{"step": ..., "reason": ..., "operator": ...}``
``POST /atoll/sagas/ID/skip``                same, ``step`` required
``POST /atoll/sagas/ID/compensate``          same
``POST /atoll/sagas/ID/abort``               same
``POST /atoll/sagas/ID/migrate``             ``{"to_version": 2, ...}``
===========================================  ======================================

Errors are problem+json: 404 for an unknown instance or definition, 409 for an
action that does not apply in the instance's state (the detail says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from atoll.sagas._definition import Saga
from atoll.sagas._errors import SagaActionError, SagaDefinitionError, SagaNotFoundError
from atoll.sagas._mermaid import to_mermaid
from atoll.sagas._state import SagaState
from atoll.service import problem

if TYPE_CHECKING:
    from atoll.sagas._engine import SagaEngine

Action = Literal["retry", "skip", "compensate", "abort"]


class ActionRequest(BaseModel):
    """The body of an operator action."""

    step: Annotated[str | None, Field(max_length=200)] = None
    reason: Annotated[str, Field(max_length=2000)] = ""
    operator: Annotated[str, Field(max_length=200)] = ""


class MigrateRequest(BaseModel):
    """The body of ``POST .../migrate``."""

    to_version: Annotated[int, Field(ge=1)]
    reason: Annotated[str, Field(max_length=2000)] = ""
    operator: Annotated[str, Field(max_length=200)] = ""


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(msgspec.to_builtins(value), status_code=status)


def _error(exc: Exception, path: str) -> JSONResponse:
    if isinstance(exc, SagaNotFoundError | SagaDefinitionError):
        return problem(404, str(exc), instance=path)
    return problem(409, str(exc), title="Action not possible", instance=path)


def definitions_summary(engine: SagaEngine) -> list[dict[str, Any]]:
    """Each definition: name, kind, version and its steps."""
    found = []
    for definition in engine.definitions:
        entry: dict[str, Any] = {
            "name": definition.name,
            "kind": definition.kind,
            "version": definition.version,
            "timeout": definition.timeout,
        }
        if isinstance(definition, Saga):
            entry["steps"] = [
                {
                    "name": f.step.name,
                    "group": f.group,
                    "parallel": f.parallel,
                    "action": f.step.action.describe(),
                    "compensation": None
                    if f.step.compensation is None
                    else f.step.compensation.describe(),
                }
                for f in definition.steps
            ]
        else:
            entry["events"] = sorted(definition.routes)
            entry["timers"] = sorted(definition.timer_handlers)
        found.append(entry)
    return found


def admin_router(engine: SagaEngine) -> APIRouter:
    """The operator API of ``engine``'s instances."""
    router = APIRouter(tags=["atoll sagas"])
    _read_routes(router, engine)
    _action_routes(router, engine)
    return router


def _read_routes(router: APIRouter, engine: SagaEngine) -> None:

    @router.get("", summary="List saga and process instances")
    async def list_instances(
        state: Annotated[SagaState | None, Query()] = None,
        name: Annotated[str | None, Query(max_length=100)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        before: Annotated[float | None, Query(description="updated_at of the last seen")] = None,
    ) -> JSONResponse:
        found = await engine.list(
            state=None if state is None else state.value, name=name, limit=limit, before=before
        )
        return _json(found)

    @router.get("/counts", summary="Instances by name and state")
    async def counts() -> JSONResponse:
        found = await engine.counts()
        return _json([{"name": n, "state": s, "count": c} for (n, s), c in sorted(found.items())])

    @router.get("/definitions", summary="Saga and process definitions")
    async def definitions() -> JSONResponse:
        return _json(definitions_summary(engine))

    @router.get(
        "/definitions/{name}/diagram",
        summary="A definition as a Mermaid flowchart",
        response_class=PlainTextResponse,
    )
    async def diagram(name: str, version: int | None = None) -> Any:
        try:
            return PlainTextResponse(to_mermaid(engine.definition(name, version)))
        except SagaDefinitionError as exc:
            return _error(exc, f"/definitions/{name}/diagram")

    @router.get("/{saga_id:path}", summary="One instance with its steps and history")
    async def show(saga_id: str) -> JSONResponse:
        try:
            return _json(await engine.view(saga_id))
        except SagaNotFoundError as exc:
            return _error(exc, saga_id)


def _action_routes(router: APIRouter, engine: SagaEngine) -> None:
    @router.post("/{saga_id:path}/migrate", summary="Move an instance to another version")
    async def migrate(saga_id: str, body: MigrateRequest) -> JSONResponse:
        try:
            view = await engine.operate(
                saga_id,
                "migrate",
                to_version=body.to_version,
                reason=body.reason,
                operator=body.operator,
            )
        except (SagaNotFoundError, SagaActionError) as exc:
            return _error(exc, saga_id)
        return _json(view)

    @router.post("/{saga_id:path}/{action}", summary="Retry, skip, compensate or abort")
    async def act(saga_id: str, action: Action, body: ActionRequest) -> JSONResponse:
        try:
            view = await engine.operate(
                saga_id, action, step=body.step, reason=body.reason, operator=body.operator
            )
        except (SagaNotFoundError, SagaActionError) as exc:
            return _error(exc, saga_id)
        return _json(view)
