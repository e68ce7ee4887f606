import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.periods import Period, day_buckets, duration_microseconds, hour_buckets

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
