import json
import subprocess
import sys

from atoll import __version__
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
