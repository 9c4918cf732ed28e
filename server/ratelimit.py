"""Per-API-key rate limits: requests and tokens per minute over a sliding 60-second window.

Active only when API keys are configured (a key identifies the caller) and a limit is set. A request is
charged at admission: one request, and prompt tokens + max_tokens (its most; OpenAI counts max_tokens
the same way). Past a limit the answer is 429 rate_limit_exceeded with Retry-After: the seconds until
enough of the window has expired. A request whose tokens alone exceed the token limit is a 400 (it
could never pass). Keys are held as their SHA-256, so the limiter never keeps a secret in memory twice.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
import threading
from collections import deque
from dataclasses import dataclass

from server.errors import APIError, InvalidRequest

WINDOW_S = 60.0

# The key the current request authenticated with (set by the auth dependency, read at admission).
current_api_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("colm_api_key", default=None)


class RateLimited(APIError):
    """A per-key limit is reached (429, Retry-After)."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


@dataclass(frozen=True)
class RateLimits:
    """Requests and tokens per minute per key (None: unlimited)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None

    @property
    def enabled(self) -> bool:
        return self.requests_per_minute is not None or self.tokens_per_minute is not None


class _Window:
    """(time, tokens) of one key's admitted requests in the last WINDOW_S seconds."""

    def __init__(self):
        self.events: deque[tuple[float, int]] = deque()
        self.tokens = 0

    def expire(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            self.tokens -= self.events.popleft()[1]

    def wait_for_tokens(self, now: float, need: int, limit: int) -> float:
        """Seconds until the window holds room for `need` more tokens."""
        excess = self.tokens + need - limit
        for t, n in self.events:
            excess -= n
            if excess <= 0:
                return t + WINDOW_S - now
        return WINDOW_S


class RateLimiter:
    """Sliding-window limits per key; thread-safe (one lock, O(requests in the window) per call)."""

    def __init__(self, limits: RateLimits):
        self.limits = limits
        self._windows: dict[bytes, _Window] = {}
        self._lock = threading.Lock()

    def charge(self, key: str | None, tokens: int, now: float) -> None:
        """Admit one request of `tokens` for `key` at monotonic time `now`, or raise RateLimited /
        InvalidRequest."""
        if key is None or not self.limits.enabled:
            return
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        if tpm is not None and tokens > tpm:
            raise InvalidRequest(f"this request needs {tokens} tokens (prompt + max_tokens), over this key's "
                                 f"limit of {tpm} tokens per minute; lower max_tokens", param="max_tokens")
        digest = hashlib.sha256(key.encode()).digest()
        with self._lock:
            w = self._windows.setdefault(digest, _Window())
            w.expire(now)
            if rpm is not None and len(w.events) >= rpm:
                raise RateLimited(f"rate limit reached: {rpm} requests per minute for this API key",
                                  w.events[len(w.events) - rpm][0] + WINDOW_S - now)
            if tpm is not None and w.tokens + tokens > tpm:
                raise RateLimited(f"rate limit reached: {tpm} tokens per minute for this API key "
                                  "(prompt + max_tokens)", w.wait_for_tokens(now, tokens, tpm))
            w.events.append((now, tokens))
            w.tokens += tokens
