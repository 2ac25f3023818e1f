"""Connection URLs: parsing options and hiding secrets."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from atoll._errors import AtollError

T = TypeVar("T")


class URLError(AtollError):
    """A connection URL is malformed or has an unknown option."""


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``: safe for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))


def query_options(url: str) -> dict[str, str]:
    """The query parameters of ``url`` as a dict."""
    return dict(parse_qsl(urlsplit(url).query, keep_blank_values=True))


def take_option(
    options: dict[str, str], name: str, convert: Callable[[str], T], default: T, url: str
) -> T:
    """Remove ``name`` from ``options`` and convert it, naming the URL on failure."""
    if name not in options:
        return default
    raw = options.pop(name)
    try:
        return convert(raw)
    except (TypeError, ValueError):
        raise URLError(f"{redact(url)}: option {name}={raw!r} is invalid") from None


def reject_unknown(options: dict[str, str], url: str) -> None:
    """Raise if any option was not taken."""
    if options:
        raise URLError(f"{redact(url)}: unknown option(s) {', '.join(sorted(options))}")
