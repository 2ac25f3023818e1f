"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

import asyncio
import contextlib
import random
import socket
from pathlib import Path
from typing import Any

import uvicorn

from atoll.persistence import SQLiteDatabase
from atoll.service import Service, ServiceRuntime
from atoll.testing import wait_until
from atoll.transport import RedeliveryPolicy
from atoll.transport.memory import InMemoryTransport

ROOT = Path(__file__).resolve().parents[1]
SHOP = ROOT / "examples" / "shop"
FAST_RETRY = RedeliveryPolicy(max_attempts=3, backoff_base=0.01, backoff_cap=0.02)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


#: Ports are handed out below the kernel's ephemeral range (32768 and up by default):
#: ``bind(0)`` picks from that range, where every outgoing connection (a service's pool
#: to PostgreSQL, a subprocess's client) is also given its port, so a port found free can
#: be taken by one before the process it was meant for listens on it; a shop whose
#: service lost its port that way restarted it until the test gave up. Below the range,
#: only listeners compete, and this process hands each port out once.
_FIRST_PORT = 10000
_LAST_PORT = _ephemeral_low() - 1
_next_port = _FIRST_PORT + random.Random().randrange(_LAST_PORT - _FIRST_PORT)


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports that are free to listen on (see above)."""
    global _next_port  # noqa: PLW0603 - one sequence for the whole test run
    for _ in range(2000):
        first = _next_port
        if first + count - 1 > _LAST_PORT:
            _next_port = _FIRST_PORT
            continue
        _next_port = first + count
        with contextlib.ExitStack() as stack:
            try:
                for port in range(first, first + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports between {_FIRST_PORT} and {_LAST_PORT}")


def free_port() -> int:
    """A port free to listen on, not handed out before in this test run (see above)."""
    return free_ports(1)


class System:
    """Services on one in-memory transport, each with its own SQLite file."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.transport = InMemoryTransport(lease=1.0)
        self.runtimes: list[ServiceRuntime] = []

    async def start(self, *services: Service, **kwargs) -> list[ServiceRuntime]:
        await self.transport.connect()
        started = []
        for service in services:
            runtime = ServiceRuntime(
                service,
                database=SQLiteDatabase(self.tmp_path / f"{service.name}.db", lock_timeout=0.2),
                transport=self.transport,
                owns_transport=False,
                **kwargs,
            )
            await runtime.start()
            self.runtimes.append(runtime)
            started.append(runtime)
        return started

    async def stop(self):
        for runtime in self.runtimes:
            await runtime.stop()
        await self.transport.close()


async def serve(app: Any) -> tuple[str, Any]:
    """Serve ``app`` with uvicorn on a free port: (base URL, stop coroutine function)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_config=None, log_level="warning", ws="none")
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_until(lambda: server.started or task.done(), what="uvicorn")
    if task.done():
        task.result()

    async def stop() -> None:
        server.should_exit = True
        await task
        sock.close()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def issue_certificate(
    directory: Path,
    stem: str,
    *,
    issuer: str,
    subject: Any = None,
    san: Any = None,
    ca: bool = False,
) -> None:
    """``stem.pem``/``stem.key`` in ``directory``: a new EC key and its certificate,
    signed by ``issuer.key`` there (by itself when ``issuer`` is ``stem``). The subject
    is ``CN=stem`` unless ``subject`` (name attributes; ``[]`` for an empty one) says
    otherwise; ``san`` are its alternative names (critical when the subject is empty, as
    RFC 5280 wants)."""
    import datetime as dt  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_key = (
        key
        if issuer == stem
        else serialization.load_pem_private_key((directory / f"{issuer}.key").read_bytes(), None)
    )
    if subject is None:
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, stem)]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=not subject)
    cert = builder.sign(issuer_key, hashes.SHA256())
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def write_certificates(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.

    Writes ``ca.pem``/``ca.key``, ``other-ca.pem``/``other-ca.key``, ``server.pem``/
    ``server.key`` and ``client.pem``/``client.key`` (CN ``atoll``; both signed by ``ca``),
    and ``stranger.pem``/``stranger.key`` (a client certificate ``other-ca`` signed).
    """
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415

    for ca_name in ("ca", "other-ca"):
        issue_certificate(directory, ca_name, issuer=ca_name, ca=True)
    localhost = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    issue_certificate(directory, "server", issuer="ca", subject=[_cn("127.0.0.1")], san=localhost)
    issue_certificate(directory, "client", issuer="ca", subject=[_cn("atoll")])
    issue_certificate(directory, "stranger", issuer="other-ca")


def _cn(name: str) -> Any:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    return x509.NameAttribute(NameOID.COMMON_NAME, name)
