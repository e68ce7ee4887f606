"""Exact decimal arithmetic for SQLite, the embedded default.

SQLite has no decimal type: it keeps a DECIMAL column as a double and its SUM() adds doubles, which
drifts (0.1 + 0.2). These functions, registered on every SQLite connection, run inside the query
like SUM() does and add exact Decimals, so SQLite gives the same figures as PostgreSQL's NUMERIC.
Quantities have at most 15 significant digits, so a stored double converts back to its exact
decimal through repr().
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from core.periods import duration_microseconds

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_decimal(value: int | float | str | bytes) -> Decimal:
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, bytes):
        value = value.decode()
    return Decimal(value)


class DecimalSum:
    """SQLite aggregate `ml_dsum(x)`: the exact sum of x as decimal text, NULL when no rows."""

    def __init__(self) -> None:
        self.total: Decimal | None = None

    def step(self, value: Any) -> None:
        if value is not None:
            self.total = (self.total or Decimal(0)) + to_decimal(value)

    def finalize(self) -> str | None:
        return None if self.total is None else str(self.total)


class DecimalSumProduct(DecimalSum):
    """SQLite aggregate `ml_dsum_product(x, y)`: the exact sum of x * y as decimal text."""

    def step(self, value: Any, factor: Any = None) -> None:
        if value is not None and factor is not None:
            self.total = (self.total or Decimal(0)) + to_decimal(value) * to_decimal(factor)


def epoch_microseconds(value: str | None) -> int | None:
    """SQLite function `ml_epoch_us(ts)`: a stored UTC datetime as integer microseconds."""
    if value is None:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return duration_microseconds(parsed - _EPOCH)


def register_sqlite_functions(sender: object, connection: Any, **kwargs: object) -> None:
    if connection.vendor != "sqlite":
        return
    raw = connection.connection
    raw.create_aggregate("ml_dsum", 1, DecimalSum)
    raw.create_aggregate("ml_dsum_product", 2, DecimalSumProduct)
    raw.create_function("ml_epoch_us", 1, epoch_microseconds, deterministic=True)
