"""`python -m atoll.gateway` as a process: options and exit codes."""

import os
import socket
import subprocess
import sys
import time

from gateway_support import base_config, write_config

from support import free_port, free_ports

ENV = {**os.environ, "ATOLL_LOG_FORMAT": "json"}


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_listening(port: int, process: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the gateway exited with {process.returncode}")
        if _listening(port):
            return
        time.sleep(0.1)
    raise AssertionError("the gateway never listened")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _config_with_admin_port(tmp_path, admin_port):
    config = base_config(
        {"a": {"targets": ["127.0.0.1:9"]}},
        [{"name": "a", "match": {"prefix": "/"}, "upstream": "a"}],
    )
    config["admin"] = {"port": admin_port}
    return write_config(tmp_path / "gw.yaml", config)


def _gateway(path, *args, output=None):
    """`python -m atoll.gateway --config PATH ARGS...`, its output to ``output``."""
    return subprocess.Popen(
        [sys.executable, "-m", "atoll.gateway", "--config", str(path), *args],
        stdout=output if output is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if output is not None else subprocess.DEVNULL,
        env=ENV,
    )


def test_admin_port_zero_on_the_command_line_does_not_open_the_files_admin_port(tmp_path):
    """`--admin-port 0` (like `admin.port: 0` in the file) must not serve the admin
    endpoints; it used to fall back to the file's admin.port and listen there."""
    port, file_admin = free_port(), free_port()
    path = _config_with_admin_port(tmp_path, file_admin)
    process = _gateway(path, "--port", str(port), "--admin-port", "0")
    try:
        _wait_listening(port, process)
        time.sleep(0.3)
        assert not _listening(file_admin), (
            f"--admin-port 0 was given, yet the admin endpoints listen on the file's {file_admin}"
        )
    finally:
        _stop(process)


def test_admin_port_zero_with_two_workers_starts(tmp_path):
    """With `--workers 2 --admin-port 0`, every worker used to fall back to the same
    admin.port of the file (not + index): the second could not bind it and the whole
    gateway exited 2 instead of serving."""
    port, file_admin = free_port(), free_ports(2)
    path = _config_with_admin_port(tmp_path, file_admin)
    log = tmp_path / "gw.log"
    with log.open("w") as out:
        process = _gateway(
            path, "--port", str(port), "--admin-port", "0", "--workers", "2", output=out
        )
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.2)
            assert process.poll() is None, (
                f"the gateway exited with {process.returncode}: {log.read_text()[-600:]}"
            )
        finally:
            _stop(process)


def test_a_bad_redis_store_url_exits_2_naming_file_and_key(tmp_path):
    """A rate_limits.store URL whose port is not a number is a configuration error:
    exit 2 with `FILE: rate_limits.store: ...` (the reload path refuses it too), not a
    traceback and exit 1 (which `atoll up` and the worker supervisor restart forever)."""
    config = base_config(
        {"a": {"targets": ["127.0.0.1:9"]}},
        [
            {
                "name": "a",
                "match": {"prefix": "/"},
                "upstream": "a",
                "rate_limit": {"rate": 10, "burst": 10, "shared": True},
            }
        ],
        rate_limits={"store": "redis://127.0.0.1:notaport/0"},
    )
    path = write_config(tmp_path / "gw.yaml", config)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "atoll.gateway",
            "--config",
            str(path),
            "--port",
            str(free_port()),
            "--admin-port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=ENV,
    )
    assert result.returncode == 2, (result.returncode, result.stderr[-800:])
    assert f"{path}: rate_limits.store" in result.stderr
