"""``atoll sagas``: see and repair saga and process instances.

Mount with ``app.add_typer(atoll.sagas.cli.app, name="sagas")``. Every command but
``diagram`` talks to the orchestrating services' HTTP API (``/atoll/sagas``), found
through ``atoll.toml`` (or ``--url``): the service that owns an instance applies each
action as one transition of the instance, recorded in its history with ``--operator``
and ``--reason``. ``diagram`` imports the services named in ``atoll.toml`` and needs
nothing running.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from atoll._errors import AtollError
from atoll.config import ConfigError, LoadedConfig, load_config
from atoll.sagas._client import SagaAdminClient, endpoints

T = TypeVar("T")

app = typer.Typer(
    help="Saga and process instances: list, show, retry, skip, compensate, abort, diagram.",
    no_args_is_help=True,
)
console = Console()
err_console = Console(stderr=True)

ConfigOption = Annotated[
    Path,
    typer.Option("--config", "-c", help="The system's atoll.toml.", envvar="ATOLL_CONFIG"),
]
ProfileOption = Annotated[
    str | None,
    typer.Option("--profile", "-p", help="Overlay [profiles.NAME].", envvar="ATOLL_PROFILE"),
]
ServiceOption = Annotated[
    str | None, typer.Option("--service", "-s", help="Only this orchestrating service.")
]
UrlOption = Annotated[
    str | None,
    typer.Option("--url", help="The service's HTTP base URL (instead of atoll.toml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of tables.")]
ReasonOption = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the history).")]
OperatorOption = Annotated[
    str | None, typer.Option("--operator", help="Who (default: the login name).")
]


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear error line and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _operator(value: str | None) -> str:
    if value:
        return value
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _client(
    config: Path, profile: str | None, service: str | None, url: str | None
) -> SagaAdminClient:
    loaded: LoadedConfig | None = None
    if url is None:
        try:
            loaded = load_config(config, profile=profile)
        except ConfigError as exc:
            fail(str(exc), 2)
    try:
        return SagaAdminClient(endpoints(loaded, service=service, url=url))
    except AtollError as exc:
        fail(str(exc), 2)


def _run(client: SagaAdminClient, fn: Callable[[SagaAdminClient], T]) -> T:
    try:
        with client:
            result = fn(client)
    except AtollError as exc:
        fail(str(exc))
    for line in client.unreachable:
        err_console.print(f"[yellow]warning:[/] not reachable: {line}", highlight=False)
    return result


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


@app.command("list")
def list_instances(
    *,
    state: Annotated[
        str | None, typer.Option(help="Only this state, e.g. COMPENSATION_FAILED.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Only this saga or process.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List instances, most recently changed first."""
    client = _client(config, profile, service, url)
    found = _run(client, lambda c: c.instances(state=state, name=name, limit=limit))
    if as_json:
        _print_json(found)
        return
    table = Table(title=f"{len(found)} instance(s)", title_justify="left")
    for column in ("id", "service", "saga", "state", "updated (UTC)", "error"):
        table.add_column(column, overflow="fold")
    for item in found:
        table.add_row(
            item["saga_id"],
            item["service"],
            f"{item['name']} v{item['version']}",
            item["state"],
            _when(item["updated_at"]),
            item.get("error") or "",
        )
    console.print(table)


@app.command()
def counts(
    *,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """How many instances each saga has in each state."""
    found = _run(_client(config, profile, service, url), lambda c: c.counts())
    if as_json:
        _print_json(found)
        return
    table = Table(title="instances by state", title_justify="left")
    for column in ("service", "saga", "state", "count"):
        table.add_column(column)
    for item in found:
        table.add_row(item["service"], item["name"], item["state"], str(item["count"]))
    console.print(table)


def _show(view: dict[str, Any]) -> None:
    console.print(
        f"[bold]{view['saga_id']}[/]  {view['kind']} {view['name']} v{view['version']}"
        f"  [bold]{view['state']}[/]",
        highlight=False,
    )
    facts = [
        ("created", _when(view["created_at"])),
        ("updated", _when(view["updated_at"])),
        ("next deadline", _when(view["wake_at"])),
        ("saga deadline", _when(view["deadline_at"])),
        ("correlation", view.get("correlation_id") or "-"),
        ("error", view.get("error") or "-"),
        ("data", json.dumps(view["data"])),
    ]
    for label, value in facts:
        console.print(f"  {label:>14}: {value}", highlight=False)
    if view["steps"]:
        steps = Table(title="steps", title_justify="left")
        for column in ("step", "group", "status", "attempt", "due (UTC)", "error"):
            steps.add_column(column, overflow="fold")
        for step in view["steps"]:
            group = str(step["group"]) + (f" ({step['parallel']})" if step["parallel"] else "")
            steps.add_row(
                step["name"],
                group,
                step["status"],
                str(step["attempt"]),
                _when(step["due"]),
                step.get("error") or "",
            )
        console.print(steps)
    if view["timers"]:
        console.print(
            "  timers: "
            + ", ".join(f"{k} at {_when(v)}" for k, v in sorted(view["timers"].items()))
        )
    history = Table(title="history", title_justify="left")
    for column in ("#", "at (UTC)", "event", "state", "changes"):
        history.add_column(column, overflow="fold")
    for entry in view["history"]:
        changes = "\n".join(
            f"{c[0]}: {c[1] or '-'} -> {c[2]}" + (f" ({c[3]})" if len(c) > 3 and c[3] else "")
            for c in entry["changes"]
        )
        extra = {k: v for k, v in entry["detail"].items() if k not in ("reply", "step")}
        if extra:
            changes += ("\n" if changes else "") + json.dumps(extra)
        history.add_row(
            str(entry["seq"]), _when(entry["at"]), entry["event"], entry["state"], changes
        )
    console.print(history)


@app.command()
def show(
    saga_id: Annotated[str, typer.Argument(help="The instance id.")],
    *,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one instance: its data, steps and history."""
    _, view = _run(_client(config, profile, service, url), lambda c: c.find(saga_id))
    if as_json:
        _print_json(view)
    else:
        _show(view)


def _act(
    saga_id: str,
    action: str,
    body: dict[str, Any],
    *,
    config: Path,
    profile: str | None,
    service: str | None,
    url: str | None,
) -> None:
    client = _client(config, profile, service, url)
    view = _run(client, lambda c: c.act(saga_id, action, body))
    console.print(f"{action}: {saga_id} is now [bold]{view['state']}[/]", highlight=False)


@app.command()
def retry(
    saga_id: Annotated[str, typer.Argument(help="The instance id.")],
    *,
    step: Annotated[
        str | None, typer.Option(help="Only this step (default: every stuck one).")
    ] = None,
    reason: ReasonOption = "",
    operator: OperatorOption = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
) -> None:
    """Try a stuck step or a failed compensation again now, with fresh attempts."""
    body = {"step": step, "reason": reason, "operator": _operator(operator)}
    _act(saga_id, "retry", body, config=config, profile=profile, service=service, url=url)


@app.command()
def skip(
    saga_id: Annotated[str, typer.Argument(help="The instance id.")],
    *,
    step: Annotated[str, typer.Option(help="The step to treat as done.")],
    reason: ReasonOption = "",
    operator: OperatorOption = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
) -> None:
    """Go on as if a step (or its compensation) had succeeded: you fixed it by hand."""
    body = {"step": step, "reason": reason, "operator": _operator(operator)}
    _act(saga_id, "skip", body, config=config, profile=profile, service=service, url=url)


@app.command()
def compensate(
    saga_id: Annotated[str, typer.Argument(help="The instance id.")],
    *,
    reason: ReasonOption = "",
    operator: OperatorOption = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
) -> None:
    """Stop going forward (or undo a completed saga): compensate what was done."""
    body = {"reason": reason, "operator": _operator(operator)}
    _act(saga_id, "compensate", body, config=config, profile=profile, service=service, url=url)


@app.command()
def abort(
    saga_id: Annotated[str, typer.Argument(help="The instance id.")],
    *,
    reason: ReasonOption = "",
    operator: OperatorOption = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
) -> None:
    """Stop an instance where it is: nothing more is sent or compensated."""
    body = {"reason": reason, "operator": _operator(operator)}
    _act(saga_id, "abort", body, config=config, profile=profile, service=service, url=url)


@app.command()
def migrate(
    saga_id: Annotated[str, typer.Argument(help="The instance id.")],
    *,
    to: Annotated[int, typer.Option("--to", help="The version to move to.")],
    reason: ReasonOption = "",
    operator: OperatorOption = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
) -> None:
    """Move an instance to another version of its definition (by its declared migration)."""
    body = {"to_version": to, "reason": reason, "operator": _operator(operator)}
    _act(saga_id, "migrate", body, config=config, profile=profile, service=service, url=url)


@app.command()
def diagram(
    name: Annotated[str, typer.Argument(help="The saga or process name.")],
    *,
    version: Annotated[int | None, typer.Option(help="Default: the newest.")] = None,
    config: ConfigOption = Path("atoll.toml"),
    profile: ProfileOption = None,
    service: ServiceOption = None,
    url: UrlOption = None,
) -> None:
    """Print a Mermaid flowchart of a definition (imports the services; nothing must run)."""
    if url is not None:
        text = _run(_client(config, profile, service, url), lambda c: c.diagram(name, version))
        sys.stdout.write(text)
        return
    sys.stdout.write(
        _diagram_from_code(name, version, config=config, profile=profile, service=service)
    )


def _diagram_from_code(
    name: str, version: int | None, *, config: Path, profile: str | None, service: str | None
) -> str:
    from atoll.cli._run import import_service  # noqa: PLC0415 - only this command imports services
    from atoll.sagas._engine import engine_of  # noqa: PLC0415 - same
    from atoll.sagas._mermaid import to_mermaid  # noqa: PLC0415 - same

    try:
        loaded = load_config(config, profile=profile)
        names = [service] if service else sorted(loaded.config.services)
        known: list[str] = []
        for service_name in names:
            engine = engine_of(import_service(loaded, service_name))
            if engine is None:
                continue
            known += [f"{d.name} v{d.version} ({service_name})" for d in engine.definitions]
            try:
                return to_mermaid(engine.definition(name, version))
            except AtollError:
                continue
    except AtollError as exc:
        fail(str(exc), 2)
    fail(f"no saga or process {name!r} (known: {', '.join(known) or 'none'})")


__all__ = ["app"]
