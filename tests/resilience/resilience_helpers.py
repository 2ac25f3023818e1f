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


async def serve_app(app):
    """Start ``app`` on a free port with uvicorn; return (base URL, stop coroutine)."""
    import socket  # noqa: PLC0415 - only the HTTP tests need these

    import uvicorn  # noqa: PLC0415

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, lifespan="off", log_level="warning", ws="none", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until(lambda: server.started or task.done())
    if task.done():
        task.result()

    async def stop():
        server.should_exit = True
        await task
        sock.close()

    return f"http://127.0.0.1:{port}", stop
