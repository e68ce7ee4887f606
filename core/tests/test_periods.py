import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.periods import (
    Period,
    billing_period,
    day_buckets,
    duration_microseconds,
    hour_buckets,
    period_boundary,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_period_is_half_open():
    period = Period(T0, T0 + timedelta(days=1))
    assert T0 in period
    assert T0 + timedelta(days=1) - timedelta(microseconds=1) in period
    assert T0 + timedelta(days=1) not in period
    assert T0 - timedelta(microseconds=1) not in period


@pytest.mark.parametrize(
    ("start", "end"),
    [(T0, T0), (T0, T0 - timedelta(seconds=1)), (datetime(2026, 1, 1), datetime(2026, 1, 2))],
)
def test_period_refuses_empty_reversed_and_naive_bounds(start, end):
    with pytest.raises(ValueError):
        Period(start, end)


def test_period_normalises_to_utc():
    berlin = datetime(2026, 1, 1, 1, tzinfo=ZoneInfo("Europe/Berlin"))
    assert Period(berlin, berlin + timedelta(hours=1)) == Period(T0, T0 + timedelta(hours=1))
    assert Period(berlin, berlin + timedelta(hours=1)).start.tzinfo is UTC


def test_duration_microseconds_is_exact():
    assert duration_microseconds(timedelta(days=31, microseconds=7)) == 31 * 86_400_000_000 + 7


def test_day_buckets_follow_local_midnights_across_dst():
    # Europe/Berlin springs forward on 2026-03-29: that local day lasts 23 hours.
    tz = ZoneInfo("Europe/Berlin")
    period = Period(datetime(2026, 3, 28, tzinfo=tz), datetime(2026, 3, 31, tzinfo=tz))
    buckets = day_buckets(period, tz)
    assert [b.duration for b in buckets] == [
        timedelta(hours=24),
        timedelta(hours=23),
        timedelta(hours=24),
    ]
    assert all(b.start.astimezone(tz).hour == 0 for b in buckets)


def test_day_buckets_clip_to_the_period():
    tz = ZoneInfo("UTC")
    period = Period(T0 + timedelta(hours=12), T0 + timedelta(days=2, hours=3))
    buckets = day_buckets(period, tz)
    assert buckets[0] == Period(period.start, T0 + timedelta(days=1))
    assert buckets[-1] == Period(T0 + timedelta(days=2), period.end)


@given(
    start=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2030, 1, 1), timezones=st.just(UTC)
    ),
    length=st.timedeltas(min_value=timedelta(microseconds=1), max_value=timedelta(days=40)),
    zone=st.sampled_from(
        ["UTC", "Europe/Berlin", "Asia/Kolkata", "America/New_York", "Australia/Lord_Howe"]
    ),
)
def test_buckets_tile_the_period_exactly(start, length, zone):
    period = Period(start, start + length)
    for buckets in (day_buckets(period, ZoneInfo(zone)), hour_buckets(period)):
        assert buckets[0].start == period.start
        assert buckets[-1].end == period.end
        assert all(a.end == b.start for a, b in itertools.pairwise(buckets))


@pytest.mark.parametrize(
    ("anchor_day", "expected"),
    [
        (31, [(1, 31), (2, 28), (3, 31), (4, 30), (5, 31)]),
        (30, [(1, 30), (2, 28), (3, 30), (4, 30), (5, 30)]),
        (29, [(1, 29), (2, 28), (3, 29), (4, 29), (5, 29)]),
    ],
)
def test_months_step_from_the_anchor_without_drifting(anchor_day, expected):
    anchor = datetime(2026, 1, anchor_day, tzinfo=UTC)
    starts = [period_boundary(anchor, k, UTC) for k in range(5)]
    assert [(s.month, s.day) for s in starts] == expected


def test_leap_february():
    anchor = datetime(2028, 1, 31, 9, 30, tzinfo=UTC)
    assert period_boundary(anchor, 1, UTC) == datetime(2028, 2, 29, 9, 30, tzinfo=UTC)


def test_boundaries_keep_their_local_time_across_dst():
    tz = ZoneInfo("Europe/Berlin")
    anchor = datetime(2026, 1, 15, tzinfo=tz)  # local midnight, UTC+1
    march, april = period_boundary(anchor, 2, tz), period_boundary(anchor, 3, tz)
    assert march == datetime(2026, 3, 14, 23, tzinfo=UTC)
    assert april == datetime(2026, 4, 14, 22, tzinfo=UTC)  # summer time: UTC+2
    assert april.astimezone(tz).hour == 0


def test_yearly_periods():
    anchor = datetime(2024, 2, 29, tzinfo=UTC)
    index, period = billing_period(anchor, datetime(2025, 6, 1, tzinfo=UTC), UTC, months=12)
    assert index == 1
    assert period == Period(datetime(2025, 2, 28, tzinfo=UTC), datetime(2026, 2, 28, tzinfo=UTC))


@given(
    instant=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2032, 1, 1), timezones=st.just(UTC)
    ),
    anchor=st.datetimes(
        min_value=datetime(2019, 1, 1), max_value=datetime(2031, 1, 1), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(
        ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Pacific/Chatham"]
    ),
)
def test_billing_period_contains_the_instant_and_tiles(instant, anchor, zone):
    tz = ZoneInfo(zone)
    index, period = billing_period(anchor, instant, tz)
    assert instant in period
    assert period.start == period_boundary(anchor, index, tz)
    _, following = billing_period(anchor, period.end, tz)
    assert following.start == period.end
    _, at_start = billing_period(anchor, period.start, tz)
    assert at_start == period
