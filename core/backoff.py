"""Exponential back-off with jitter, for anything retried (alert deliveries, Stripe sends)."""

from __future__ import annotations

import random
from datetime import timedelta


def backoff_delay(
    attempts: int, *, base: timedelta, cap: timedelta, jitter: tuple[float, float]
) -> timedelta:
    """base x 2^(attempts - 1), at most `cap`, times a random factor within `jitter`
    (e.g. (0.8, 1.2) for +-20%), so that many retries do not come back at one instant."""
    ceiling: timedelta = min(cap, base * (1 << max(attempts - 1, 0)))  # base x 2^(attempts-1)
    return ceiling * random.uniform(*jitter)  # noqa: S311 - spreading retries, not secrecy
