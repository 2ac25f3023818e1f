"""Helpers shared by the resilience tests."""

import asyncio


class BoomError(Exception):
    pass


async def ok(value=1):
    return value


async def fail(exc=None):
    raise exc or BoomError("boom")


async def settle(rounds=10):
    """Let the event loop run pending callbacks a few times."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_until(predicate, timeout=5.0):
    """Poll ``predicate`` until true, or fail after ``timeout`` seconds of real time."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
