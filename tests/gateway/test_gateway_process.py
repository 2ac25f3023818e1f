"""`python -m atoll.gateway` as a process: N workers on one port, graceful stop, bad config."""

import os
import signal
import subprocess
import sys

import httpx
import jwt
import yaml
from gateway_support import base_config, write_config
from typer.testing import CliRunner

from atoll.gateway.cli import app as token_app
from atoll.testing import wait_until
from support import SHOP, free_port, free_ports


def free_port_pair() -> int:
    """A port that is free together with the next one (worker n's admin port is base + n)."""
    return free_ports(2)


async def test_two_workers_share_the_port_and_stop_gracefully(tmp_path, stub):
    # A free pair: once, in a full run, admin + 1 was in use and a worker could not start.
    port, admin = free_port(), free_port_pair()
    config = write_config(
        tmp_path / "gw.yaml",
        base_config(
            {"a": {"targets": [stub.address]}},
            [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
        ),
    )
    log = (tmp_path / "gateway.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atoll.gateway",
            "--config",
            str(config),
            "--port",
            str(port),
            "--admin-port",
            str(admin),
            "--workers",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ATOLL_LOG_FORMAT": "json"},
    )
    try:
        async with httpx.AsyncClient(timeout=5) as client:

            async def both_ready():
                try:
                    for offset in (0, 1):
                        r = await client.get(f"http://127.0.0.1:{admin + offset}/readyz")
                        if r.status_code != 200:
                            return False
                except httpx.HTTPError:
                    return False
                return True

            await wait_until(both_ready, timeout=30, what="both workers")
            for _ in range(20):
                async with httpx.AsyncClient() as fresh:  # new connections spread over workers
                    assert (await fresh.get(f"http://127.0.0.1:{port}/x")).status_code == 200
            served = 0
            for offset in (0, 1):
                metrics = (await client.get(f"http://127.0.0.1:{admin + offset}/metrics")).text
                for line in metrics.splitlines():
                    if line.startswith('atoll_gateway_requests_total{code="200",route="a"}'):
                        served += int(float(line.split()[-1]))
            assert served == 20
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def test_a_bad_config_stops_the_start_with_file_and_key(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text(
        yaml.safe_dump({"routes": [{"name": "x", "match": {"prefix": "/"}, "upstream": "nope"}]})
    )
    result = subprocess.run(
        [sys.executable, "-m", "atoll.gateway", "--config", str(path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{path}: routes[0].upstream: no upstream 'nope'" in result.stderr


def test_atoll_token_mints_what_the_shop_gateway_accepts():
    result = CliRunner().invoke(
        token_app,
        [
            "--config",
            str(SHOP / "atoll.toml"),
            "--sub",
            "alice",
            "--scope",
            "orders:read",
            "--ttl",
            "60",
        ],
    )
    assert result.exit_code == 0, result.output
    token = result.output.strip()
    claims = jwt.decode(
        token,
        "atoll-shop-development-secret-do-not-use-in-production",
        algorithms=["HS256"],
        audience="shop",
        issuer="atoll-shop-dev",
    )
    assert claims["sub"] == "alice"
    assert claims["scope"] == "orders:read"
    assert claims["exp"] - claims["iat"] == 60
