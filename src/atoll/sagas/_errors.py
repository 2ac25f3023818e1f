"""Errors of the saga engine. Each names the saga, the step and what was wrong."""

from __future__ import annotations

from atoll._errors import AtollError


class SagaError(AtollError):
    """Something about a saga went wrong."""


class SagaDefinitionError(SagaError, ValueError):
    """A saga or process definition is invalid; raised where it is declared."""


class SagaNotFoundError(SagaError, LookupError):
    """No saga instance has this id."""


class SagaExistsError(SagaError):
    """A saga instance with this id already exists."""


class SagaActionError(SagaError):
    """An operator action does not apply to the instance in its current state."""


class StepFailed(SagaError):  # noqa: N818 - reads as what it reports: the step failed
    """Raise from a local step (:class:`Call`) to fail it for good, without retries.

    Any other exception from a local step is an attempt that failed and is retried by
    the step's :class:`Retry` policy. The step's database changes are rolled back
    either way.
    """
