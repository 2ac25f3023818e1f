"""Stub upstreams and a gateway started in the test's event loop."""

import asyncio
import contextlib
import json
from pathlib import Path

import uvicorn
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from atoll.gateway import Gateway
from support import free_port


class Stub:
    """An upstream that records what it received and answers as told."""

    def __init__(self, name="stub", *, tls=None):
        self.name = name
        #: uvicorn's ssl_* settings (certfile, keyfile, ca_certs, cert_reqs): serve HTTPS.
        self.tls = tls or {}
        self.port = free_port()
        self.hits = []
        self.status = 200
        self.delay = 0.0
        self.server = None
        self.task = None
        self.release = asyncio.Event()
        self.release.set()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def app(self):
        async def echo(request: Request):
            body = await request.body()
            self.hits.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "headers": dict(request.headers),
                    "header_list": request.headers.items(),  # repeated names kept
                    "body": body,
                }
            )
            if self.delay:
                await asyncio.sleep(self.delay)
            await self.release.wait()
            return JSONResponse(
                {
                    "stub": self.name,
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "headers": dict(request.headers),
                    "body_length": len(body),
                },
                status_code=self.status,
                headers={"x-stub": self.name},
            )

        async def big(request: Request):
            size = int(request.query_params.get("size", "10000000"))
            chunk = b"x" * 65536

            async def produce():
                sent = 0
                while sent < size:
                    part = chunk[: min(len(chunk), size - sent)]
                    sent += len(part)
                    yield part
                    await asyncio.sleep(0)

            return StreamingResponse(produce(), media_type="application/octet-stream")

        async def upload(request: Request):
            total = 0
            chunks = 0
            async for part in request.stream():
                total += len(part)
                chunks += 1
            return JSONResponse({"received": total, "chunks": chunks})

        async def health(request: Request):
            return Response("ok", status_code=200 if self.status < 500 else 503)

        async def ws(websocket: WebSocket):
            self.hits.append(
                {
                    "method": "GET",
                    "path": websocket.url.path,
                    "query": websocket.url.query,
                    "headers": dict(websocket.headers),
                    "header_list": websocket.headers.items(),
                    "body": b"",
                }
            )
            await websocket.accept()
            with contextlib.suppress(Exception):
                while True:
                    text = await websocket.receive_text()
                    await websocket.send_text(f"{self.name}:{text}")

        return Starlette(
            routes=[
                Route("/big", big),
                Route("/upload", upload, methods=["POST", "PUT"]),
                Route("/healthz", health),
                WebSocketRoute("/ws", ws),
                Route(
                    "/{path:path}",
                    echo,
                    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                ),
            ]
        )

    async def start(self):
        config = uvicorn.Config(
            self.app(),
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            ws="websockets-sansio",
            **{f"ssl_{key}": value for key, value in self.tls.items()},
        )
        self.server = uvicorn.Server(config)
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        return self

    async def stop(self):
        if self.server is not None:
            self.server.should_exit = True
            self.release.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)
            self.server = None


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def base_config(upstreams: dict, routes: list, **extra) -> dict:
    config = {
        "server": {"port": 8080, "access_log": False, "drain_timeout": 5},
        "admin": {"port": 0},
        "upstreams": upstreams,
        "routes": routes,
    }
    config.update(extra)
    return config


@contextlib.asynccontextmanager
async def running_gateway(path: Path, **kwargs):
    kwargs.setdefault("watch_interval", None)
    gateway = Gateway(path, port=0, admin_port=0, **kwargs)
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop(drain_timeout=2)


def url(gateway, path=""):
    return f"http://127.0.0.1:{gateway.port}{path}"


def admin_url(gateway, path=""):
    return f"http://127.0.0.1:{gateway.admin_port}{path}"


async def raw_request(port: int, data: bytes, *, read_timeout=5.0) -> bytes:
    """Send raw bytes, return everything the server sends until it closes (or times out)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        async with asyncio.timeout(read_timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


def problem_of(raw: bytes) -> tuple[int, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}
