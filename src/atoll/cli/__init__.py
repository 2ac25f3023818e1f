"""The ``atoll`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from atoll._errors import AtollError
from atoll._version import __version__
from atoll.config import ConfigError, LoadedConfig, load_config
from atoll.messages import decode_envelope
from atoll.messages._errors import MessageError

T = TypeVar("T")

app = typer.Typer(
    name="atoll",
    help="Run and operate atoll systems.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dlq_app = typer.Typer(help="Dead letters: list, show, replay, purge.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")
events_app = typer.Typer(help="Event streams of an event-sourced service.", no_args_is_help=True)
app.add_typer(events_app, name="events")
projections_app = typer.Typer(help="Projections: their lag, and rebuilding.", no_args_is_help=True)
app.add_typer(projections_app, name="projections")


def _mount_sagas() -> None:
    from atoll.sagas.cli import app as sagas_app  # noqa: PLC0415 - imports FastAPI models

    app.add_typer(sagas_app, name="sagas", help="Sagas: list, show, repair, diagram.")


def _mount_token() -> None:
    from atoll.gateway.cli import token  # noqa: PLC0415 - the gateway's development tokens

    app.command("token", help="Mint a development token for the gateway.")(token)


_mount_sagas()
_mount_token()

ServiceOption = Annotated[
    str | None,
    typer.Option("--service", "-s", help="The event-sourced service (if there are several)."),
]

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
    gateway = loaded.config.gateway
    if gateway is not None:
        # Checked before any service starts: a typo in the gateway's file is one line
        # and exit 2, as for atoll.toml, not a system started and stopped again.
        try:
            from atoll.gateway import load_gateway_config  # noqa: PLC0415 - gateway extra

            load_gateway_config(
                loaded.base_dir / gateway.config,
                system=loaded.path,
                profile=profile,
                environ={**os.environ, **gateway.env},  # as the gateway process gets it
            )
        except ImportError:
            pass  # the gateway process reports the missing extra itself
        except ConfigError as exc:
            fail(str(exc))
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
            nice=section.nice,
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


def _print_rows(rows: list[dict[str, Any]], columns: list[str], as_json: bool, title: str) -> None:
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    console.print(table)


def _cell(value: object) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return "" if value is None else str(value)


@events_app.command("streams")
def events_streams(
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    prefix: Annotated[str | None, typer.Option(help="Only streams starting with this.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """List streams with their version."""
    from atoll.cli._events import with_store  # noqa: PLC0415 - keep --help fast
    from atoll.eventstore._admin import list_streams  # noqa: PLC0415

    loaded = _load(config, profile)
    rows = _guard(
        lambda: with_store(
            loaded, service, lambda _s, store, _c: list_streams(store, prefix=prefix, limit=limit)
        )
    )
    _print_rows(rows, ["stream", "version", "events", "deleted", "updated_at"], as_json, "streams")


@events_app.command("show")
def events_show(
    stream: str,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    limit: Annotated[int, typer.Option(help="At most this many events.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Show a stream's events, decoded."""
    from atoll.cli._events import with_store  # noqa: PLC0415 - keep --help fast
    from atoll.eventstore._admin import show_stream  # noqa: PLC0415

    loaded = _load(config, profile)
    rows = _guard(
        lambda: with_store(
            loaded,
            service,
            lambda _s, store, codec: show_stream(store, stream, codec=codec, limit=limit),
        )
    )
    _print_rows(rows, ["version", "position", "type", "data", "recorded_at"], as_json, stream)


@events_app.command("tail")
def events_tail(
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    last: Annotated[int, typer.Option(help="Show the last N events first.")] = 10,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
) -> None:
    """Print the newest events of the global log (and follow it with -f)."""
    from atoll.cli._events import with_store  # noqa: PLC0415 - keep --help fast
    from atoll.eventstore._admin import tail  # noqa: PLC0415

    loaded = _load(config, profile)

    async def run(_service: Any, store: Any, codec: Any) -> None:
        async for row in tail(store, last=last, follow=follow, codec=codec):
            sys.stdout.write(json.dumps(row, default=str) + "\n")
            sys.stdout.flush()

    with contextlib.suppress(KeyboardInterrupt):
        _guard(lambda: with_store(loaded, service, run))


@projections_app.command("status")
def projections_status(
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False,
) -> None:
    """Every projection's checkpoint and lag (events and seconds behind, stalled)."""
    from atoll.cli._events import with_store  # noqa: PLC0415 - keep --help fast
    from atoll.eventstore._admin import projections_status as status  # noqa: PLC0415

    loaded = _load(config, profile)
    rows = _guard(lambda: with_store(loaded, service, lambda _s, store, _c: status(store)))
    _print_rows(
        rows,
        ["projection", "position", "events_behind", "seconds_behind", "stalled", "blocked_by"],
        as_json,
        "projections",
    )


@projections_app.command("rebuild")
def projections_rebuild(
    name: str,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
) -> None:
    """Clear a projection's read model and replay every event into it."""
    from atoll.cli._events import projection_named, with_store  # noqa: PLC0415
    from atoll.eventstore._admin import rebuild_projection  # noqa: PLC0415

    loaded = _load(config, profile)

    async def run(svc: Any, store: Any, codec: Any) -> int:
        return await rebuild_projection(store, projection_named(svc, name), codec=codec)

    applied = _guard(lambda: with_store(loaded, service, run))
    console.print(f"rebuilt {name}: {applied} event(s) applied")


def _guard(fn: Callable[[], T]) -> T:
    try:
        return fn()
    except ConfigError as exc:
        fail(str(exc))
    except KeyError as exc:
        fail(str(exc.args[0]) if exc.args else str(exc), 1)
    except AtollError as exc:
        fail(str(exc), 1)


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
