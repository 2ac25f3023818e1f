"""The ``atoll`` command line."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from atoll._errors import AtollError
from atoll._version import __version__
from atoll.config import ConfigError, LoadedConfig, load_config
from atoll.messages import decode_envelope
from atoll.messages._errors import MessageError

app = typer.Typer(
    name="atoll",
    help="Run and operate atoll systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Dead letters: list, show, replay, purge.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The system's atoll.toml.", envvar="ATOLL_CONFIG"),
]
ProfileOption = Annotated[
    str | None,
    typer.Option(
        "--profile", "-p", help="Overlay [profiles.NAME] of atoll.toml.", envvar="ATOLL_PROFILE"
    ),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _load(path: Path, profile: str | None = None) -> LoadedConfig:
    try:
        return load_config(path, profile=profile)
    except ConfigError as exc:
        fail(str(exc))


def _version(value: bool) -> None:
    if value:
        console.print(f"atoll {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    del version


@app.command()
def up(
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    single_process: Annotated[
        bool, typer.Option("--single-process", help="Run every service in this one process.")
    ] = False,
    service: Annotated[
        list[str] | None, typer.Option("--service", "-s", help="Only these services.")
    ] = None,
    restart: Annotated[bool, typer.Option(help="Restart a service process that dies.")] = True,
) -> None:
    """Start every service of the system, show when they are ready, stop on Ctrl-C."""
    from atoll.cli._run import run  # noqa: PLC0415 - keep `atoll --help` fast
    from atoll.cli._up import Supervisor  # noqa: PLC0415 - same
    from atoll.observability import configure_logging  # noqa: PLC0415 - same

    loaded = _load(config, profile)
    names = service or list(loaded.config.services)
    for name in names:
        try:
            loaded.service(name)
        except ConfigError as exc:
            fail(str(exc))
    if not names:
        fail(f"{config}: services: no services are declared")
    if single_process:
        configure_logging(fmt="console")
        try:
            run(loaded, names, single_process=True)
        except AtollError as exc:
            fail(str(exc), 2 if isinstance(exc, ConfigError) else 1)
        return
    if loaded.config.system.transport.startswith("memory:"):
        fail(
            f"{config}: system.transport: memory:// lives in one process; "
            "use --single-process or sqlite:///bus.db"
        )
    supervisor = Supervisor(loaded, names, console=console, restart=restart)
    raise typer.Exit(asyncio.run(supervisor.run()))


@app.command(hidden=True)
def run(
    name: Annotated[list[str], typer.Argument(help="Service names.")],
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
) -> None:
    """Run services in this process (what `atoll up` starts for each service)."""
    from atoll.cli._run import run as run_services  # noqa: PLC0415 - keep `atoll --help` fast
    from atoll.observability import configure_logging  # noqa: PLC0415 - same

    loaded = _load(config, profile)
    configure_logging(service=name[0] if len(name) == 1 else None)
    try:
        run_services(loaded, name, single_process=False)
    except ConfigError as exc:
        fail(str(exc))
    except AtollError as exc:
        fail(str(exc), 1)


@app.command()
def collector(
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    port: Annotated[int | None, typer.Option(help="Port (default from atoll.toml).")] = None,
) -> None:
    """Run the embedded OTLP collector and trace view on its own."""
    from atoll.observability import configure_logging  # noqa: PLC0415 - keep --help fast
    from atoll.observability.collector import CollectorError, Retention, run_collector  # noqa: PLC0415
    from atoll.observability.collector._query import parse_lookback  # noqa: PLC0415

    loaded = _load(config, profile)
    section = loaded.config.system.collector
    configure_logging(service="collector")
    loaded.data_dir.mkdir(parents=True, exist_ok=True)
    try:
        run_collector(
            section.host,
            port or section.port,
            loaded.data_dir / "traces.db",
            retention=Retention(max_age=parse_lookback(section.retention), max_spans=1_000_000),
        )
    except CollectorError as exc:
        fail(str(exc), 1)


@dlq_app.command("list")
def dlq_list(
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    group: Annotated[str | None, typer.Option(help="Only this consumer group (service).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List dead letters, oldest first."""
    from atoll.cli._dlq import timestamp, with_store  # noqa: PLC0415 - keep `atoll --help` fast

    loaded = _load(config, profile)
    records = with_store(loaded, lambda store: store.list(group=group, limit=limit))
    if as_json:
        for r in records:
            sys.stdout.write(json.dumps(_record_json(r)) + "\n")
        return
    table = Table(title=f"{len(records)} dead letter(s)", title_justify="left")
    for column in ("id", "group", "type", "attempts", "dead at (UTC)", "reason"):
        table.add_column(column, overflow="fold")
    for r in records:
        table.add_row(
            r.id, r.group, _type_of(r.body), str(r.attempts), timestamp(r.dead_at), r.reason
        )
    console.print(table)


@dlq_app.command("show")
def dlq_show(
    record_id: str, config: ConfigOption = Path("atoll.toml"), profile: ProfileOption = None
) -> None:
    """Show one dead letter with its envelope."""
    from atoll.cli._dlq import with_store  # noqa: PLC0415 - keep `atoll --help` fast

    loaded = _load(config, profile)
    record = with_store(loaded, lambda store: store.get(record_id))
    if record is None:
        fail(f"no dead letter {record_id!r}", 1)
    sys.stdout.write(json.dumps(_record_json(record), indent=2) + "\n")


@dlq_app.command("replay")
def dlq_replay(
    record_id: Annotated[list[str] | None, typer.Argument(help="Dead letter ids.")] = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    group: Annotated[str | None, typer.Option(help="With --all: only this group.")] = None,
) -> None:
    """Deliver dead letters again to their consumer group."""
    from atoll.cli._dlq import with_store  # noqa: PLC0415 - keep `atoll --help` fast

    if not record_id and not replay_all:
        fail("give dead letter ids, or --all")
    loaded = _load(config, profile)

    async def replay(store: object) -> tuple[int, list[str]]:
        from atoll.transport import DeadLetterStore  # noqa: PLC0415 - typing only

        assert isinstance(store, DeadLetterStore)
        ids = list(record_id or [])
        if replay_all:
            ids += [r.id for r in await store.list(group=group, limit=1_000_000)]
        missing = [i for i in ids if not await store.replay(i)]
        return len(ids) - len(missing), missing

    done, missing = with_store(loaded, replay)
    console.print(f"replayed {done} dead letter(s)")
    if missing:
        fail(f"no such dead letter(s): {', '.join(missing)}", 1)


@dlq_app.command("purge")
def dlq_purge(
    record_id: Annotated[list[str], typer.Argument(help="Dead letter ids.")],
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
) -> None:
    """Delete dead letters for good."""
    from atoll.cli._dlq import with_store  # noqa: PLC0415 - keep `atoll --help` fast

    loaded = _load(config, profile)

    async def purge(store: object) -> list[str]:
        from atoll.transport import DeadLetterStore  # noqa: PLC0415 - typing only

        assert isinstance(store, DeadLetterStore)
        return [i for i in record_id if not await store.purge(i)]

    missing = with_store(loaded, purge)
    console.print(f"purged {len(record_id) - len(missing)} dead letter(s)")
    if missing:
        fail(f"no such dead letter(s): {', '.join(missing)}", 1)


def _type_of(body: bytes) -> str:
    try:
        return decode_envelope(body).type
    except MessageError:
        return "(malformed)"


def _record_json(record: object) -> dict[str, object]:
    data: dict[str, object] = msgspec.to_builtins(record)
    body = getattr(record, "body", b"")
    data.pop("body", None)
    try:
        data["envelope"] = msgspec.json.decode(body)
    except msgspec.DecodeError:
        data["body"] = body.decode("utf-8", errors="replace")
    return data


def main() -> None:
    """Entry point of the ``atoll`` script."""
    try:
        app()
    except AtollError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(1)


__all__ = ["app", "main"]
