"""Services: declaring handlers and HTTP APIs, and running them."""

from atoll._heap import freeze_startup_heap
from atoll.service._context import Context
from atoll.service._http import PROBLEM_JSON, problem
from atoll.service._runtime import RuntimeStats, ServiceRuntime
from atoll.service._service import (
    HandlerSpec,
    MessageRejected,
    Service,
    ServiceNotRunningError,
)

__all__ = [
    "PROBLEM_JSON",
    "Context",
    "HandlerSpec",
    "MessageRejected",
    "RuntimeStats",
    "Service",
    "ServiceNotRunningError",
    "ServiceRuntime",
    "freeze_startup_heap",
    "problem",
]
