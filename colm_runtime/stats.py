"""Small statistics shared by the engine and the server."""

from __future__ import annotations


def ema(old: float | None, value: float, weight: float) -> float:
    """Exponential moving average: the first value as is, then old + weight * (value - old).

    `old` None means no value yet. `weight` in (0, 1] is the share of the new value."""
    return value if old is None else old + weight * (value - old)
