import gc
import logging

import pytest
from gateway_support import Stub


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
    """Every gateway test fails if a task or future ends with an exception nobody read.

    asyncio reports those only when the object is collected, as an error log line with
    a traceback: in production, log noise on every such request.
    """
    handler = _Unretrieved()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect()
    finally:
        logger.removeHandler(handler)
    assert not handler.messages, handler.messages


@pytest.fixture
async def stub():
    server = await Stub("a").start()
    yield server
    await server.stop()


@pytest.fixture
async def stub_b():
    server = await Stub("b").start()
    yield server
    await server.stop()
