"""What every policy is: something that runs a call, usable three ways.

* ``await policy.call(fn, *args, **kwargs)``
* ``@policy`` (or ``policy.wrap(fn)``): a wrapper with ``fn``'s signature for type
  checkers (``ParamSpec``), itself a coroutine function
* ``async with policy:``: for the policies that do not need to re-run or replace the
  block (timeouts, breakers, bulkheads, rate limiters); a retry, a hedge or a fallback
  raise :class:`TypeError` there, because a ``with`` block cannot be run twice or have
  its result replaced.
"""

from __future__ import annotations

import abc
import contextvars
import functools
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# The guards entered with ``async with policy:`` in this task, innermost first, so that
# ``__aexit__`` finds the guard its ``__aenter__`` made without storing per-call state
# on a policy that many tasks share.
_entered: contextvars.ContextVar[tuple[Policy, AbstractAsyncContextManager[None], Any] | None] = (
    contextvars.ContextVar("atoll_resilience_entered", default=None)
)


class Policy(abc.ABC):
    """A resilience policy.

    Contract for implementations: :meth:`_execute` must await ``fn(*args, **kwargs)``
    (zero, one or several times) and must not keep references to ``args`` or ``kwargs``
    after it returns. It must let :class:`asyncio.CancelledError` through unchanged, and
    give back anything it holds (a slot, a permit) when the call is cancelled.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The name that errors, events and metrics use for this policy."""

    @abc.abstractmethod
    def _execute(
        self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Coroutine[Any, Any, T]:
        """Run ``fn(*args, **kwargs)`` under this policy."""

    def guard(self) -> AbstractAsyncContextManager[None]:
        """A context manager applying this policy to a block of code."""
        raise TypeError(
            f"{type(self).__name__} {self.name!r} cannot guard a 'with' block: the block "
            "cannot be run again or have its result replaced; use call() or the decorator"
        )

    def call(
        self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs
    ) -> Coroutine[Any, Any, T]:
        """Run ``fn(*args, **kwargs)`` under this policy (await the result)."""
        return self._execute(fn, args, kwargs)

    def wrap(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """``fn`` under this policy, with ``fn``'s signature; also usable as ``@policy``."""
        execute = self._execute

        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            return await execute(fn, args, kwargs)

        return wrapper

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        return self.wrap(fn)

    async def __aenter__(self) -> None:
        guard = self.guard()
        await guard.__aenter__()
        _entered.set((self, guard, _entered.get()))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        frame = _entered.get()
        if frame is None or frame[0] is not self:
            raise RuntimeError(f"{self.name!r} was exited without being entered in this task")
        _entered.set(frame[2])
        return await frame[1].__aexit__(exc_type, exc, tb)
