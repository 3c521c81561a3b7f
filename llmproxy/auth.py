"""Inbound authentication for the proxy port, for deployments reachable beyond a
private network. Off unless ``server.auth`` lists keys.

Clients send one of the keys in ``server.auth.header`` (``x-llmproxy-key`` by
default; with ``authorization`` a ``Bearer`` prefix is accepted). Every key is
compared in constant time, and all of them every time, so neither a key's
prefix nor which key matched shows in the timing. The check runs before routing:
an unauthenticated client learns nothing, not even which paths exist.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from .config import Auth
from .errors import UnauthorizedError


class Authenticator:
    """Checks the proxy key of a request."""

    __slots__ = ("_bearer", "_header", "_keys")

    def __init__(self, auth: Auth) -> None:
        self._keys = [key.encode() for key in auth.keys]
        self._header = auth.header
        self._bearer = auth.header == "authorization"

    def check(self, headers: Mapping[str, str]) -> None:
        """Return if a configured key was sent; raise ``UnauthorizedError`` if not."""
        value = headers.get(self._header, "")
        if self._bearer and value[:7].lower() == "bearer ":
            value = value[7:]
        # The bytes as sent: the server decodes obs-text (bytes that are not UTF-8)
        # to lone surrogates, which surrogateescape turns back, never matching.
        candidate = value.strip().encode("utf-8", "surrogateescape")
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise UnauthorizedError(
                f"missing or invalid proxy key in the {self._header} header"
            )
