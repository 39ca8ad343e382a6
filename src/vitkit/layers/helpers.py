"""Small argument helpers."""

from __future__ import annotations

from collections.abc import Iterable


def to_2tuple(x: int | Iterable[int]) -> tuple[int, int]:
    """Return ``(x, x)`` for a scalar, or the pair itself for a 2-sequence."""
    if isinstance(x, Iterable) and not isinstance(x, str):
        t = tuple(x)
        if len(t) != 2:
            raise ValueError(f"expected an int or a pair, got {x!r}")
        return int(t[0]), int(t[1])
    return int(x), int(x)
