"""Route matching: path templates and prefixes, methods, host and headers.

Routes are tried in the order they are declared; the first that matches wins. A path
that matches a route's path but not its methods is remembered so the answer can be
``405`` with ``Allow`` rather than ``404``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from atoll.gateway._config import RouteConfig

_PARAM = re.compile(rb"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")


def compile_template(template: str) -> re.Pattern[bytes]:
    """A regex for a path template: ``{id}`` is one segment, ``{rest:path}`` any tail."""
    raw = template.encode()
    out: list[bytes] = []
    pos = 0
    for match in _PARAM.finditer(raw):
        out.append(re.escape(raw[pos : match.start()]))
        name = match.group(1).decode()
        group = f"(?P<{name}>.+)" if match.group(2) else f"(?P<{name}>[^/]+)"
        out.append(group.encode())
        pos = match.end()
    out.append(re.escape(raw[pos:]))
    return re.compile(b"".join(out) + b"\\Z")


def template_problem(template: str) -> str | None:
    """Why ``template`` is not a path template the router can use; ``None`` if it is."""
    names = [m.group(1).decode() for m in _PARAM.finditer(template.encode())]
    for name in names:
        if names.count(name) > 1:
            return f"declares {{{name}}} twice"
    rest = _PARAM.sub(b"", template.encode())
    if b"{" in rest or b"}" in rest:
        return "has a '{' or '}' that is not a parameter such as {id} or {rest:path}"
    try:
        compile_template(template)
    except re.error as exc:
        return f"is not a usable template ({exc})"
    return None


def fill_template(template: str, params: dict[str, bytes]) -> bytes:
    """``template`` with each ``{name}`` replaced by the (still percent-encoded) value."""
    raw = template.encode()
    return _PARAM.sub(lambda m: params[m.group(1).decode()], raw)


@dataclass(slots=True)
class Match:
    """A route that matched, and the path parameters it captured."""

    route: RouteConfig
    params: dict[str, bytes]


class Router:
    """The routes of one configuration, compiled."""

    __slots__ = ("_routes",)

    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        compiled = []
        for route in routes:
            pattern = compile_template(route.path) if route.path is not None else None
            prefix = route.prefix.encode() if route.prefix is not None else None
            host = route.host.encode() if route.host is not None else None
            compiled.append((route, pattern, prefix, host))
        self._routes = compiled

    def match(
        self, path: bytes, method: bytes, host: bytes | None, headers: list[tuple[bytes, bytes]]
    ) -> tuple[Match | None, frozenset[bytes] | None]:
        """The first matching route; else, if only methods differed, the methods allowed."""
        allowed: set[bytes] | None = None
        for route, pattern, prefix, route_host in self._routes:
            params: dict[str, bytes]
            if prefix is not None:
                if not path.startswith(prefix):
                    continue
                if (
                    len(path) != len(prefix)
                    and prefix[-1:] != b"/"
                    and path[len(prefix) : len(prefix) + 1] != b"/"
                ):
                    continue  # /stock matches /stock and /stock/x, not /stockpile
                params = {}
            else:
                assert pattern is not None
                found = pattern.match(path)
                if found is None:
                    continue
                params = found.groupdict()
            if route_host is not None and not _host_matches(route_host, host):
                continue
            if route.headers and not _headers_match(route.headers, headers):
                continue
            if route.methods is not None and method not in route.methods:
                if method == b"HEAD" and b"GET" in route.methods:
                    return Match(route, params), None
                allowed = (allowed or set()) | set(route.methods)
                continue
            return Match(route, params), None
        return None, _allow(allowed) if allowed else None


def _allow(methods: set[bytes]) -> frozenset[bytes]:
    """What a 405's ``Allow`` lists: a GET route answers HEAD too."""
    return frozenset(methods | {b"HEAD"}) if b"GET" in methods else frozenset(methods)


def _host_matches(pattern: bytes, host: bytes | None) -> bool:
    if host is None:
        return False
    name = host.lower().rsplit(b":", 1)[0] if b"]" not in host else host.lower()
    if pattern.startswith(b"*."):
        return name.endswith(pattern[1:])
    return name == pattern


def _headers_match(
    wanted: tuple[tuple[bytes, bytes | None], ...], headers: list[tuple[bytes, bytes]]
) -> bool:
    for name, value in wanted:
        for key, got in headers:
            if key == name and (value is None or got == value):
                break
        else:
            return False
    return True
