"""Resilience policies: breakers, retries, timeouts with deadlines, bulkheads, rate limits.

Each policy runs a call three ways (``await policy.call(fn, ...)``, ``@policy``,
``async with policy:``) and composes with others in a :class:`Pipeline`, whose order is
fixed and documented there. Every policy takes an :class:`atoll.determinism.Clock`;
``VirtualClock(auto_advance=True)`` is the test mode in which nothing really waits.

``docs/resilience.md`` explains the model, the pipeline order and the configuration keys.
"""

from atoll.resilience._breaker import BreakerSnapshot, BreakerState, CircuitBreaker, StateChange
from atoll.resilience._bulkhead import Bulkhead
from atoll.resilience._classify import (
    CONNECT_ONLY,
    DEFAULT,
    HTTP,
    Classifier,
    Verdict,
    classifier_named,
    is_transient_status,
    register_classifier,
    retry_after,
)
from atoll.resilience._client import (
    IDEMPOTENT_METHODS,
    ServiceClient,
    UnknownServiceError,
    default_service_policy,
)
from atoll.resilience._config import policy_from_config
from atoll.resilience._deadline import (
    DEADLINE_HEADER,
    Deadline,
    current_deadline,
    deadline_header,
    deadline_scope,
)
from atoll.resilience._errors import (
    BreakerOpenError,
    BulkheadFullError,
    CallTimeoutError,
    DeadlineExceededError,
    InvalidPolicyError,
    RateLimitedError,
    RejectedError,
    ResilienceError,
    UnacceptableResultError,
)
from atoll.resilience._fallback import Fallback
from atoll.resilience._hedge import Hedge
from atoll.resilience._metrics import ResilienceCollector, install_metrics
from atoll.resilience._pipeline import ORDER, Pipeline
from atoll.resilience._policy import Policy
from atoll.resilience._propagation import (
    TRACE_HEADERS,
    PropagationMiddleware,
    current_trace_headers,
    trace_scope,
)
from atoll.resilience._ratelimit import Permit, RateLimiter
from atoll.resilience._registry import ResilienceRegistry
from atoll.resilience._retry import Retry, RetryBudget
from atoll.resilience._shared import SharedState, SharedStateDownError, SharedWindow
from atoll.resilience._timeout import Timeout
from atoll.resilience._web import breakers_router, snapshot_to_json

__all__ = [
    "CONNECT_ONLY",
    "DEADLINE_HEADER",
    "DEFAULT",
    "HTTP",
    "IDEMPOTENT_METHODS",
    "ORDER",
    "TRACE_HEADERS",
    "BreakerOpenError",
    "BreakerSnapshot",
    "BreakerState",
    "Bulkhead",
    "BulkheadFullError",
    "CallTimeoutError",
    "CircuitBreaker",
    "Classifier",
    "Deadline",
    "DeadlineExceededError",
    "Fallback",
    "Hedge",
    "InvalidPolicyError",
    "Permit",
    "Pipeline",
    "Policy",
    "PropagationMiddleware",
    "RateLimitedError",
    "RateLimiter",
    "RejectedError",
    "ResilienceCollector",
    "ResilienceError",
    "ResilienceRegistry",
    "Retry",
    "RetryBudget",
    "ServiceClient",
    "SharedState",
    "SharedStateDownError",
    "SharedWindow",
    "StateChange",
    "Timeout",
    "UnacceptableResultError",
    "UnknownServiceError",
    "Verdict",
    "breakers_router",
    "classifier_named",
    "current_deadline",
    "current_trace_headers",
    "deadline_header",
    "deadline_scope",
    "default_service_policy",
    "install_metrics",
    "is_transient_status",
    "policy_from_config",
    "register_classifier",
    "retry_after",
    "snapshot_to_json",
    "trace_scope",
]
