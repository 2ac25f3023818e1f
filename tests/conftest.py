"""Checks every test gets, whatever it tests."""

import gc
import logging

import pytest


class _Unretrieved(logging.Handler):
    """Collects asyncio's "exception was never retrieved" reports."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "never retrieved" in message:
            self.messages.append(message)


@pytest.fixture(autouse=True)
def no_unretrieved_exceptions():
    """Every test fails if a task or future ends with an exception nobody read.

    asyncio reports those only when the object is collected, as an error log line with
    a traceback: in production, log noise on every such request. A full collection per
    test nearly doubles the suite's time, so this one collects the young generations
    (what the test made recently); tests/gateway adds a full one.
    """
    handler = _Unretrieved()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect(1)
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, handler.messages
