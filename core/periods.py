"""Half-open time periods `[start, end)` in UTC.

A period includes its start and excludes its end: an event at exactly `end` belongs to the next
period. Filter with `ts >= start and ts < end`, never `<= end`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, tzinfo


@dataclass(frozen=True, slots=True)
class Period:
    """A half-open interval of aware UTC datetimes."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise ValueError("Period bounds must be timezone-aware.")
        if self.end <= self.start:
            raise ValueError("A period must end after it starts.")
        # Normalise to UTC so that equal periods compare equal whatever zone they were built in.
        object.__setattr__(self, "start", self.start.astimezone(UTC))
        object.__setattr__(self, "end", self.end.astimezone(UTC))

    def __contains__(self, instant: object) -> bool:
        if not isinstance(instant, datetime):
            return False
        return self.start <= instant < self.end

    def __str__(self) -> str:
        return f"[{self.start.isoformat()}, {self.end.isoformat()})"

    @property
    def duration(self) -> timedelta:
        return self.end - self.start

    @property
    def microseconds(self) -> int:
        """Return the exact length in microseconds (timedelta keeps microsecond precision)."""
        return duration_microseconds(self.duration)

    def overlap(self, other: Period) -> Period | None:
        """Return the part of this period that lies inside `other`, or None if they are apart."""
        start = max(self.start, other.start)
        end = min(self.end, other.end)
        return Period(start, end) if start < end else None


def duration_microseconds(delta: timedelta) -> int:
    """Return a timedelta as an exact integer number of microseconds."""
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def day_buckets(period: Period, tz: tzinfo) -> list[Period]:
    """Split a period at local midnights of `tz`, clipping the first and last day to the period.

    Local midnight is found per day, so a day across a DST change is 23 or 25 hours long.
    """
    buckets: list[Period] = []
    local_day = period.start.astimezone(tz).date()
    cursor = period.start
    while cursor < period.end:
        local_day += timedelta(days=1)
        next_midnight = datetime.combine(local_day, time(0), tzinfo=tz).astimezone(UTC)
        end = min(next_midnight, period.end)
        buckets.append(Period(cursor, end))
        cursor = end
    return buckets


def hour_buckets(period: Period) -> list[Period]:
    """Split a period at whole UTC hours (DST-proof), clipping the first and last hour."""
    buckets: list[Period] = []
    cursor = period.start
    while cursor < period.end:
        next_hour = cursor.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        end = min(next_hour, period.end)
        buckets.append(Period(cursor, end))
        cursor = end
    return buckets
