"""Orchestrated sagas and process managers, stored with their service's data.

Declare a :class:`Saga` (steps with a :class:`Send` or :class:`Call` action, an
optional compensation and condition, :class:`Parallel` groups), register it with the
orchestrating service's :class:`SagaEngine`, and start instances inside a unit of
work. Instances keep explicit state in the service's database, so they need no
replay and no sandbox; every instance can be listed, shown and repaired (``atoll
sagas``, or the HTTP API under ``/atoll/sagas``). ``docs/sagas.md`` has the details.
"""

from atoll.sagas._definition import (
    NO_RETRY,
    Call,
    Parallel,
    Retry,
    Saga,
    SagaContext,
    SagaMigration,
    Send,
    Step,
)
from atoll.sagas._engine import SagaEngine, engine_of
from atoll.sagas._errors import (
    SagaActionError,
    SagaDefinitionError,
    SagaError,
    SagaExistsError,
    SagaNotFoundError,
    StepFailed,
)
from atoll.sagas._mermaid import to_mermaid
from atoll.sagas._process import Flow, ProcessManager
from atoll.sagas._state import (
    FINAL_STATES,
    HistoryEntry,
    SagaState,
    SagaSummary,
    SagaView,
    StepChange,
    StepStatus,
    StepView,
    Transition,
)

__all__ = [
    "FINAL_STATES",
    "NO_RETRY",
    "Call",
    "Flow",
    "HistoryEntry",
    "Parallel",
    "ProcessManager",
    "Retry",
    "Saga",
    "SagaActionError",
    "SagaContext",
    "SagaDefinitionError",
    "SagaEngine",
    "SagaError",
    "SagaExistsError",
    "SagaMigration",
    "SagaNotFoundError",
    "SagaState",
    "SagaSummary",
    "SagaView",
    "Send",
    "Step",
    "StepChange",
    "StepFailed",
    "StepStatus",
    "StepView",
    "Transition",
    "engine_of",
    "to_mermaid",
]
