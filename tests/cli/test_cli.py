import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from atoll import __version__
from atoll.cli._up import Supervisor
from atoll.config import load_config
from atoll.testing import wait_until
from atoll.transport import DeadLetter, OutgoingMessage
from atoll.transport.sqlite import SQLiteTransport

ATOLL = [sys.executable, "-m", "atoll"]


def run(*args, cwd=None):
    return subprocess.run(
        [*ATOLL, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"atoll {__version__}"


def test_a_bad_config_exits_2_naming_the_file_and_the_key(tmp_path):
    config = tmp_path / "atoll.toml"
    config.write_text('[services.orders]\napp = "x:y"\nport = "eighty"\n')
    result = run("up", "--config", str(config))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "services.orders.port" in message
    assert "atoll.toml" in message
    assert "Traceback" not in result.stderr


def test_a_missing_config_exits_2(tmp_path):
    result = run("dlq", "list", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_an_unimportable_service_exits_2_naming_the_key(tmp_path):
    config = tmp_path / "atoll.toml"
    config.write_text('[services.ghost]\napp = "no_such_module:service"\nport = 18999\n')
    result = run("up", "--single-process", "--config", str(config))
    assert result.returncode == 2
    assert "services.ghost.app" in " ".join(result.stderr.split())


async def test_dlq_list_show_replay_and_purge(tmp_path):
    config = tmp_path / "atoll.toml"
    config.write_text('[system]\ntransport = "sqlite:///bus.db"\n')
    transport = SQLiteTransport(tmp_path / ".atoll" / "bus.db")
    await transport.connect()
    parked: list[str] = []

    async def refuse(batch):
        parked.extend(d.message_id for d in batch)
        return [DeadLetter(reason="malformed envelope: bad") for _ in batch]

    consumer = await transport.subscribe("svc", ["service.svc"], refuse)
    await transport.publish(
        [OutgoingMessage("service.svc", f"m{i}", None, b"not json") for i in range(2)]
    )
    await wait_until(lambda: len(parked) == 2, what="two dead letters")
    await consumer.stop()
    await transport.close()

    listed = run("dlq", "list", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    records = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [r["reason"] for r in records] == ["malformed envelope: bad"] * 2
    assert records[0]["body"] == "not json"
    first, second = records[0]["id"], records[1]["id"]

    shown = run("dlq", "show", first, "--config", str(config))
    assert json.loads(shown.stdout)["message_id"] in {"m0", "m1"}
    assert run("dlq", "show", "nope", "--config", str(config)).returncode == 1

    replayed = run("dlq", "replay", first, "--config", str(config))
    assert replayed.returncode == 0
    assert "replayed 1" in replayed.stdout
    purged = run("dlq", "purge", second, "--config", str(config))
    assert "purged 1" in purged.stdout
    table = run("dlq", "list", "--config", str(config))
    assert "0 dead letter(s)" in table.stdout

    transport = SQLiteTransport(tmp_path / ".atoll" / "bus.db")
    await transport.connect()
    assert await transport.pending("svc") == 1, "the replayed message is not waiting"
    await transport.close()


def test_a_bad_policy_exits_2_naming_the_key_and_the_file(tmp_path):
    config = tmp_path / "atoll.toml"
    config.write_text(
        '[services.a]\napp = "x:y"\nport = 18998\n\n'
        "[policies.a.breaker]\nfailure_rate = 1.5\n\n"
        '[policies.b.retry]\nclassifier = "bogus"\n'
    )
    result = run("up", "--config", str(config))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "policies.a.breaker.failure_rate" in message
    assert "atoll.toml" in message
    config.write_text('[policies.b.retry]\nclassifier = "bogus"\nbase_delay = 0.1\n')
    result = run("dlq", "list", "--config", str(config))
    assert result.returncode == 2
    assert "policies.b.retry.classifier" in " ".join(result.stderr.split())


def test_the_token_command_up_prints_works_where_it_was_run(tmp_path, monkeypatch):
    """`atoll up`'s banner suggests a token command: copied as printed, from where `atoll
    up` ran, it must find the same configuration (it named none before)."""
    config = Path("examples/shop/atoll.toml").resolve()
    monkeypatch.chdir(tmp_path)  # not where the configuration is
    out = io.StringIO()
    supervisor = Supervisor(load_config(config), ["orders"], console=Console(file=out, width=400))
    supervisor._summary()
    command = re.search(r"TOKEN=\$\((atoll token [^)]*)\)", out.getvalue())
    assert command is not None, out.getvalue()
    argv = shlex.split(command.group(1))
    minted = subprocess.run(
        [sys.executable, "-m", "atoll", *argv[1:]],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert minted.returncode == 0, minted.stderr
    assert minted.stdout.count(".") == 2  # a JWT
