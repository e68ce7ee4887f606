"""Half-open time periods `[start, end)` in UTC.

A period includes its start and excludes its end: an event at exactly `end` belongs to the next
period. Filter with `ts >= start and ts < end`, never `<= end`.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from typing import TypeVar

_Day = TypeVar("_Day", date, datetime)


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


def bucket_count(period: Period, granularity: str, tz: tzinfo) -> int:
    """Return how many buckets `day_buckets` or `hour_buckets` would make, without making them."""
    last = period.end - timedelta(microseconds=1)
    if granularity == "day":
        return (last.astimezone(tz).date() - period.start.astimezone(tz).date()).days + 1
    first_hour = period.start.replace(minute=0, second=0, microsecond=0)
    return int((last - first_hour) // timedelta(hours=1)) + 1


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


def add_months(wall_time: _Day, months: int) -> _Day:
    """Step a wall-clock time by whole months, keeping its time of day.

    The day is the anchor's day clamped to the month's length, stepping from the anchor each
    time: Jan 31 steps to Feb 28 (or 29), then Mar 31, never drifting to the 28th.
    """
    years, month_index = divmod(wall_time.month - 1 + months, 12)
    year, month = wall_time.year + years, month_index + 1
    day = min(wall_time.day, calendar.monthrange(year, month)[1])
    return wall_time.replace(year=year, month=month, day=day)


def period_boundary(anchor: datetime, index: int, tz: tzinfo, months: int = 1) -> datetime:
    """Return the UTC start of billing period `index` (0 starts at the anchor).

    Boundaries keep the anchor's local time in `tz` across DST changes: a period anchored at
    midnight in Berlin starts at local midnight in winter and in summer.
    """
    local_anchor = anchor.astimezone(tz).replace(tzinfo=None)
    return add_months(local_anchor, index * months).replace(tzinfo=tz).astimezone(UTC)


def billing_period(
    anchor: datetime, instant: datetime, tz: tzinfo, months: int = 1
) -> tuple[int, Period]:
    """Return the index and the period `[start, end)` that contains `instant`."""
    local_anchor, local_instant = anchor.astimezone(tz), instant.astimezone(tz)
    index = (
        (local_instant.year - local_anchor.year) * 12 + local_instant.month - local_anchor.month
    ) // months
    while period_boundary(anchor, index, tz, months) > instant:
        index -= 1
    while period_boundary(anchor, index + 1, tz, months) <= instant:
        index += 1
    start = period_boundary(anchor, index, tz, months)
    return index, Period(start, period_boundary(anchor, index + 1, tz, months))
