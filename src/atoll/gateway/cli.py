"""``atoll token``: development JWTs for the gateway's demo.

Mount it on the ``atoll`` app with ``app.command("token")(token)``; until then it runs as
``python -m atoll.gateway.cli``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from atoll.config import ConfigError, load_config


def _gateway_file(
    config: Path, gateway: Path | None, profile: str | None
) -> tuple[Path, Path | None, dict[str, str]]:
    """The gateway's file, the ``atoll.toml`` naming it, and the environment the gateway
    reads it with (``[gateway] env`` over this process's, as ``atoll up`` starts it)."""
    if gateway is not None:
        return gateway, None, dict(os.environ)
    loaded = load_config(config, profile=profile)
    if loaded.config.gateway is None:
        raise ConfigError(str(config), "gateway", "no [gateway] section; pass --gateway FILE")
    section = loaded.config.gateway
    return loaded.base_dir / section.config, loaded.path, {**os.environ, **section.env}


def token(  # noqa: PLR0917 - typer passes the options as parameters
    subject: Annotated[str, typer.Option("--sub", help="The token's subject (sub).")] = "dev",
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="A scope; repeat for several.")
    ] = None,
    ttl: Annotated[float, typer.Option(help="Seconds until it expires.")] = 3600.0,
    config: Annotated[
        Path,
        typer.Option(
            "--config", "-c", help="atoll.toml with a [gateway] section.", envvar="ATOLL_CONFIG"
        ),
    ] = Path("atoll.toml"),
    profile: Annotated[str | None, typer.Option("--profile", "-p", envvar="ATOLL_PROFILE")] = None,
    gateway: Annotated[
        Path | None, typer.Option("--gateway", help="The gateway's YAML/TOML file instead.")
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option(
            "--key", help="A PEM private key (RS256/ES256/EdDSA) instead of the HS256 secret."
        ),
    ] = None,
    kid: Annotated[str | None, typer.Option(help="The key id to put in the header.")] = None,
) -> None:
    """Print a development token the gateway accepts (issuer, audience, secret from its config)."""
    from atoll.gateway._config import load_gateway_config  # noqa: PLC0415 - keep --help fast
    from atoll.gateway._tokens import mint_token  # noqa: PLC0415

    try:
        path, system, environ = _gateway_file(config, gateway, profile)
        settings = load_gateway_config(path, system=system, profile=profile, environ=environ)
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        raise typer.Exit(2) from None
    jwt = settings.auth.jwt
    if jwt is None:
        sys.stderr.write(f"error: {path}: auth.jwt: the gateway accepts no JWTs\n")
        raise typer.Exit(2)
    if key is None and jwt.hs256_secret is None:
        sys.stderr.write(f"error: {path}: auth.jwt.hs256_secret is not set; pass --key PEM\n")
        raise typer.Exit(2)
    try:
        minted = mint_token(
            subject=subject,
            scopes=scope or [],
            ttl=ttl,
            secret=jwt.hs256_secret if key is None else None,
            private_key=key,
            kid=kid,
            issuer=jwt.issuer[0] if jwt.issuer else None,
            audience=jwt.audience[0] if jwt.audience else None,
        )
    except (OSError, ValueError, TypeError) as exc:  # unreadable, not PEM, encrypted, odd key
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        sys.stderr.write(f"error: --key {key}: {reason}\n")
        raise typer.Exit(2) from None
    sys.stdout.write(minted + "\n")


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("token")(token)

if __name__ == "__main__":
    app()
