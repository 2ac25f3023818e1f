"""`[gateway] env` gives the gateway process its variables; `${NAME}` in the gateway's
file resolves in that process. `atoll up`'s early check and `atoll token` must read
the file with the same variables, or they refuse a configuration the gateway takes."""

import os
import subprocess
import sys
import textwrap

import yaml
from typer.testing import CliRunner

import atoll.cli._up as up_module
from atoll.cli import app
from support import free_port

SECRET = "a-development-secret-of-more-than-32-bytes"


def _system(tmp_path):
    gw_port, admin_port, svc_port = free_port(), free_port(), free_port()
    (tmp_path / "gateway.yaml").write_text(
        yaml.safe_dump(
            {
                "upstreams": {"a": {"targets": [f"127.0.0.1:{svc_port}"]}},
                "routes": [{"name": "a", "match": {"prefix": "/"}, "upstream": "a", "auth": "jwt"}],
                "auth": {
                    "jwt": {
                        "algorithms": ["HS256"],
                        "hs256_secret": "${GW_JWT_SECRET}",
                        "issuer": "dev",
                    }
                },
            }
        )
    )
    (tmp_path / "atoll.toml").write_text(
        textwrap.dedent(
            f"""
            [system]
            name = "t"
            transport = "sqlite:///bus.db"

            [services.orders]
            app = "shop.orders:service"
            port = {svc_port}

            [gateway]
            config = "gateway.yaml"
            port = {gw_port}
            admin_port = {admin_port}
            env = {{ GW_JWT_SECRET = "{SECRET}" }}
            """
        )
    )
    return tmp_path / "atoll.toml"


def test_the_gateway_process_itself_takes_the_file_with_its_env(tmp_path):
    toml = _system(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "GW_JWT_SECRET"}
    env["GW_JWT_SECRET"] = SECRET  # what `atoll up` gives it from [gateway] env
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "from atoll.gateway import load_gateway_config as l; import sys;"
                f" l({str(tmp_path / 'gateway.yaml')!r}, system={str(toml)!r}); print('ok')"
            ),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_atoll_up_checks_the_gateway_file_with_the_gateway_env(tmp_path, monkeypatch):
    toml = _system(tmp_path)
    monkeypatch.delenv("GW_JWT_SECRET", raising=False)
    started = []

    class FakeSupervisor:
        def __init__(self, *args, **kwargs):
            started.append(True)

        async def run(self):
            return 0

    monkeypatch.setattr(up_module, "Supervisor", FakeSupervisor)
    result = CliRunner().invoke(app, ["up", "--config", str(toml)])
    assert result.exit_code == 0, (result.exit_code, result.output)
    assert started


def test_atoll_token_reads_the_secret_with_the_gateway_env(tmp_path, monkeypatch):
    toml = _system(tmp_path)
    monkeypatch.delenv("GW_JWT_SECRET", raising=False)
    result = CliRunner().invoke(app, ["token", "--config", str(toml), "--sub", "alice"])
    assert result.exit_code == 0, result.output
