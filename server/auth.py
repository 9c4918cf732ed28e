"""API-key authentication: `Authorization: Bearer <key>`, compared in constant time.

With no keys configured every route is open. With keys, every /v1 route needs one; /health, /ready
and the docs stay open; /metrics needs one only with metrics_auth.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import Unauthorized


class APIKeyChecker:
    """Holds the configured keys; compares a presented key against all of them without early exit."""

    def __init__(self, keys: tuple[str, ...]):
        self._keys = tuple(k.encode() for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def valid(self, presented: str) -> bool:
        candidate = presented.encode()
        ok = False
        for key in self._keys:  # no short-circuit: timing does not reveal which key matched
            ok |= hmac.compare_digest(candidate, key)
        return ok

    def check(self, request: Request) -> str | None:
        """The request's valid key (None when no keys are set); Unauthorized (401) otherwise."""
        if not self.enabled:
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
        if not self.valid(token.strip()):
            raise Unauthorized("incorrect API key provided")
        return token.strip()
