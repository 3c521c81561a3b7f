"""Routing: which configured route, and so which upstream, serves a path.

The longest matching prefix wins; a prefix matches on whole path segments only
(``/v1`` serves ``/v1/chat`` but not ``/v10``). Routes that share a prefix can
fan out by the request's model (``models`` patterns, shell-style); a route with
no patterns takes the models that no pattern claimed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from fnmatch import fnmatchcase

from .config import Route

# What some servers take for a path separator besides "/": an upstream that
# decodes "%2F" or treats "\\" as "/" would read "..%2F" as a dot segment.
_SEPARATORS = re.compile(r"%2f|%5c|\\", re.IGNORECASE)


class Router:
    """Prefix and model matching over the configured routes."""

    __slots__ = ("_by_prefix",)

    def __init__(self, routes: Iterable[Route]) -> None:
        by_prefix: dict[str, list[Route]] = {}
        for route in routes:
            by_prefix.setdefault(route.prefix, []).append(route)
        # Within a prefix, routes with model patterns are tried before a catch-all.
        self._by_prefix = sorted(
            (
                (p, sorted(rs, key=lambda r: not r.models))
                for p, rs in by_prefix.items()
            ),
            key=lambda item: len(item[0]),
            reverse=True,
        )

    def candidates(self, path: str) -> list[Route]:
        """Routes whose prefix matches ``path`` (a raw path, no query), longest first.

        Paths with dot segments match nothing: forwarded as they are, they could
        climb out of the route's prefix on the upstream.
        """
        if not path.startswith("/") or _has_dot_segment(path):
            return []
        found: list[Route] = []
        for prefix, routes in self._by_prefix:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                found.extend(routes)
        return found

    @staticmethod
    def choose(candidates: list[Route], model: str | None) -> Route | None:
        """The first candidate whose model patterns accept ``model``."""
        for route in candidates:
            if not route.models:
                return route
            if model is not None and any(fnmatchcase(model, p) for p in route.models):
                return route
        return None


def _has_dot_segment(path: str) -> bool:
    """Whether ``path`` holds a ``.`` or ``..`` segment, however it is spelled.

    Percent-encoded dots, encoded slashes and backslashes count, and so does a
    segment such as ``..;x`` that a server stripping path parameters reads as
    ``..``.
    """
    if "%2e" in path or "%2E" in path:
        return True
    if "." not in path:
        return False
    segments = _SEPARATORS.sub("/", path).split("/")
    return any(s.partition(";")[0] in (".", "..") for s in segments)


def upstream_path(route: Route, path: str) -> str:
    """The path to request upstream for ``path`` on ``route``."""
    if not route.strip_prefix or route.prefix == "/":
        return path
    return path[len(route.prefix) :] or "/"
