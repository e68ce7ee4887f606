"""Hourly rollups: reads through buckets equal the raw aggregation, whatever the interleaving."""

from __future__ import annotations

import itertools
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection, transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.tests.factories import make_organisation
from core.periods import Period, day_buckets
from usage.models import HourlyUniqueValue, HourlyUsage, Meter, RollupState, UsageEvent
from usage.rollups import rollups_fold, rollups_verify
from usage.selectors import rollup_split, rollup_state, usage_series, usage_total, usage_totals
from usage.services import events_ingest
from usage.tests.factories import make_meter
from usage.tests.test_selectors import reference

START = datetime(2026, 3, 1, tzinfo=UTC)
NOW = START + timedelta(hours=6)
_keys = itertools.count()


def ingest(organisation, events, *, now=NOW):
    """Store events through ingestion; `events` are (key, event_name, minutes, properties)."""
    payloads = [
        {
            "event_name": name,
            "idempotency_key": key,
            "timestamp": (START + timedelta(minutes=minutes)).isoformat(),
            "properties": properties,
        }
        for key, name, minutes, properties in events
    ]
    results = events_ingest(
        organisation=organisation, payloads=payloads, now=now, allow_backdated=True
    )
    assert all(result.status != "rejected" for result in results), results


def make_meters():
    return [
        make_meter("count", code="calls"),
        make_meter("sum", code="tokens", property="n", filters={"region": ["eu"]}),
        make_meter("max", code="peak", property="n"),
        make_meter("latest", code="seats", property="n"),
        make_meter("unique_count", code="users", property="user"),
        make_meter("weighted_sum", code="storage", property="n"),
    ]


def assert_exact(organisations, meters):
    """Every rolled-up read equals the reference: periods on and off the hour, a :30 zone's
    days, a cutoff on receipt, the batch read; and the buckets verify clean."""
    periods = [
        Period(START - timedelta(days=1), START + timedelta(days=1)),
        Period(START + timedelta(minutes=30), START + timedelta(hours=4, minutes=45)),
        Period(START + timedelta(hours=1), START + timedelta(hours=3)),
        Period(START + timedelta(minutes=5), START + timedelta(minutes=50)),
    ]
    cutoff = NOW + timedelta(minutes=1)
    for meter in meters:
        for period in periods:
            expected = {org.pk: reference(meter, org, period) for org in organisations}
            got = {
                org.pk: usage_total(organisation=org, meter=meter, period=period)
                for org in organisations
            }
            assert got == expected, (meter.code, period)
            batch = usage_totals(
                organisation_ids=[org.pk for org in organisations], meter=meter, period=period
            )
            assert batch == expected, (meter.code, period)
            late = usage_totals(
                organisation_ids=[org.pk for org in organisations],
                meter=meter,
                period=period,
                received_until=cutoff,
            )
            assert late == {
                org.pk: reference(meter, org, period, received_until=cutoff)
                for org in organisations
            }, (meter.code, period, "cutoff")
        org = organisations[0]
        series_period = periods[0]
        series = usage_series(
            organisation=org, meter=meter, period=series_period, granularity="day"
        )
        assert [value for _, value in series] == [
            reference(meter, org, day) for day in day_buckets(series_period, org.tzinfo)
        ], meter.code
    checked, differences = rollups_verify()
    assert differences == []
    assert checked == HourlyUsage.objects.count()


def test_split_reads_whole_hours_from_buckets_and_the_rest_raw():
    period = Period(
        datetime(2026, 3, 1, 0, 30, tzinfo=UTC), datetime(2026, 3, 2, 4, 10, tzinfo=UTC)
    )
    cut = datetime(2026, 3, 1, 18, 30, tzinfo=UTC)  # a +05:30 midnight
    whole, raw = rollup_split(period, [period.start, cut, datetime(2026, 3, 1, 20, tzinfo=UTC)])
    assert whole == [
        Period(datetime(2026, 3, 1, 1, tzinfo=UTC), datetime(2026, 3, 1, 18, tzinfo=UTC)),
        Period(datetime(2026, 3, 1, 19, tzinfo=UTC), datetime(2026, 3, 2, 4, tzinfo=UTC)),
    ]
    assert raw == [
        Period(period.start, datetime(2026, 3, 1, 1, tzinfo=UTC)),
        Period(datetime(2026, 3, 1, 18, tzinfo=UTC), datetime(2026, 3, 1, 19, tzinfo=UTC)),
        Period(datetime(2026, 3, 2, 4, tzinfo=UTC), period.end),
    ]
    inside_an_hour = Period(period.start, period.start + timedelta(minutes=20))
    assert rollup_split(inside_an_hour) == ([], [inside_an_hour])


# An event: a key drawn from a small pool (so keys repeat: duplicates), a minute in the first
# five hours (events land in hours already folded: late and backdated), a meter, values.
_event = st.tuples(
    st.integers(0, 40),
    st.sampled_from(["calls", "tokens", "peak", "seats", "users", "storage"]),
    st.sampled_from([0, 1, 59, 60, 61, 119, 150, 179, 180, 239, 240, 299, -30]),
    st.sampled_from(["0.1", "0.2", "7", "123456789.123456", "0"]),
    st.sampled_from(["eu", "us"]),
    st.sampled_from(["u1", "u2", 1, "1"]),
)
_step: st.SearchStrategy[tuple[str, int, list[tuple[object, ...]]]] = st.one_of(
    st.tuples(st.just("ingest"), st.integers(0, 1), st.lists(_event, min_size=1, max_size=6)),
    st.tuples(st.just("fold"), st.just(0), st.just([])),
    st.tuples(st.just("later"), st.just(0), st.just([])),
)


@pytest.mark.django_db(transaction=True)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_step, min_size=1, max_size=12))
def test_rollups_equal_raw_aggregation_after_any_interleaving(steps):
    # Committed steps (transaction=True): on PostgreSQL a fold takes only ended transactions.
    for model in (HourlyUsage, HourlyUniqueValue, UsageEvent, RollupState, Meter):
        model.objects.all().delete()
    organisations = [make_organisation(timezone_name="Asia/Kolkata"), make_organisation()]
    meters = make_meters()
    now = NOW
    for action, which, events in steps:
        if action == "fold":
            assert not rollups_fold().skipped
        elif action == "later":
            now += timedelta(minutes=2)  # later arrivals: received after the cutoff
        else:
            ingest(
                organisations[which],
                [
                    (
                        f"key-{key}",
                        name,
                        minutes,
                        {"n": value, "region": region, "user": user},
                    )
                    for key, name, minutes, value, region, user in events
                ],
                now=now,
            )
    assert_exact(organisations, meters)
    rollups_fold()
    assert_exact(organisations, meters)
    folded_events = sum(HourlyUsage.objects.values_list("events", flat=True))
    counted = sum(
        1
        for event in UsageEvent.objects.select_related("meter")
        if event.meter.spec.matches(event.properties)
    )
    assert folded_events == counted  # each event folded exactly once


@pytest.mark.django_db
def test_a_late_event_updates_its_folded_bucket():
    org = make_organisation()
    meter = make_meter("sum", property="n")
    ingest(org, [("a", meter.code, 10, {"n": "5"}), ("b", meter.code, 70, {"n": "1"})])
    rollups_fold()
    ingest(org, [("c", meter.code, 20, {"n": "2.5"})], now=NOW + timedelta(days=2))
    day = Period(START, START + timedelta(days=1))
    assert usage_total(organisation=org, meter=meter, period=day) == Decimal("8.5")
    rollups_fold()
    assert usage_total(organisation=org, meter=meter, period=day) == Decimal("8.5")
    if connection.vendor == "sqlite":  # on PostgreSQL this test's own transaction is not folded
        first_hour = HourlyUsage.objects.get(meter=meter, hour=START)
        assert (first_hour.events, first_hour.total) == (2, Decimal("7.5"))
        assert first_hour.received_max == NOW + timedelta(days=2)
    # A close whose cutoff is before the late arrival does not count it.
    assert usage_totals(organisation_ids=[org.pk], meter=meter, period=day, received_until=NOW) == {
        org.pk: Decimal(6)
    }


@pytest.mark.django_db
def test_a_meter_whose_spec_changed_is_read_raw_until_rebuilt():
    org = make_organisation()
    meter = make_meter("sum", property="n")
    ingest(org, [("a", meter.code, 10, {"n": "5", "region": "us"})])
    rollups_fold()
    assert rollup_state(meter) is not None
    Meter.objects.filter(pk=meter.pk).update(filters={"region": ["eu"]})
    meter = Meter.objects.get(pk=meter.pk)
    day = Period(START, START + timedelta(days=1))
    assert rollup_state(meter) is None
    assert usage_total(organisation=org, meter=meter, period=day) == 0
    assert rollups_fold(rebuild=False).rebuilt == []
    assert rollup_state(meter) is None
    assert rollups_fold().rebuilt == [meter.code]
    assert rollup_state(meter) is not None
    assert usage_total(organisation=org, meter=meter, period=day) == 0
    assert rollups_verify()[1] == []


@pytest.mark.django_db
def test_verify_rollups_reports_a_bucket_that_differs(capsys):
    org = make_organisation()
    meter = make_meter("count")
    ingest(org, [("a", meter.code, 10, {}), ("b", meter.code, 20, {})])
    call_command("verify_rollups", "--fold", "--period", "2026-03")
    assert "0 differ" in capsys.readouterr().out
    if connection.vendor != "sqlite":
        return  # this test's transaction is never folded on PostgreSQL: nothing to tamper with
    HourlyUsage.objects.filter(meter=meter).update(events=3)
    with pytest.raises(SystemExit) as exit_info:
        call_command("verify_rollups", "--period", "2026-03-01T00:00Z/2026-03-02T00:00Z")
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "stored count=3" in out
    assert "raw events give count=2" in out
    assert "1 differ" in out


@pytest.mark.django_db(transaction=True)
def test_ingestion_commit_folds(settings):
    settings.ROLLUP_FOLD_INTERVAL = timedelta(0)
    org = make_organisation()
    meter = make_meter("count")
    ingest(org, [("a", meter.code, 10, {}), ("b", meter.code, 80, {})])
    assert sorted(HourlyUsage.objects.values_list("hour", "events")) == [
        (START, 1),
        (START + timedelta(hours=1), 1),
    ]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_event_committed_after_a_fold_that_passed_it_is_folded_once():
    # Another connection stores an event (its id is drawn) and keeps its transaction open while
    # a later event commits and a fold runs: the fold must neither take nor skip the first one.
    org = make_organisation()
    meter = make_meter("count")
    stored, release = threading.Event(), threading.Event()

    def slow_writer():
        try:
            with transaction.atomic():
                ingest(org, [("slow", meter.code, 10, {})])
                stored.set()
                assert release.wait(30)
        finally:
            connection.close()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert stored.wait(30)
    ingest(org, [("quick", meter.code, 11, {})])
    rollups_fold()
    assert not UsageEvent.objects.filter(idempotency_key="slow").exists()  # not committed
    # The quick event is folded; the open transaction is pending, its event read raw later.
    assert sum(HourlyUsage.objects.values_list("events", flat=True)) == 1
    assert RollupState.objects.get().pending != []
    day = Period(START, START + timedelta(days=1))
    assert usage_total(organisation=org, meter=meter, period=day) == 1
    release.set()
    writer.join(30)
    assert usage_total(organisation=org, meter=meter, period=day) == 2
    rollups_fold()
    rollups_fold()
    assert HourlyUsage.objects.get(meter=meter).events == 2
    assert usage_total(organisation=org, meter=meter, period=day) == 2
    assert rollups_verify()[1] == []


@pytest.mark.django_db
def test_the_scheduled_task_folds_and_rebuilds():
    from usage.tasks import fold_rollups

    org = make_organisation()
    meter = make_meter("count")
    ingest(org, [("a", meter.code, 10, {})])
    Meter.objects.filter(pk=meter.pk).update(filters={"region": ["eu"]})
    message = fold_rollups(intended_date=NOW.isoformat())
    assert f"rebuilt {meter.code}" in message
    day = Period(START, START + timedelta(days=1))
    assert usage_total(organisation=org, meter=Meter.objects.get(pk=meter.pk), period=day) == 0


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_events_inserted_by_plain_sql_carry_their_transaction_and_are_folded():
    # A COPY or INSERT ... SELECT path (a buffer's drain) names no xact_id: the default sets it.
    org = make_organisation()
    meter = make_meter("sum", property="n")
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO usage_usageevent (organisation_id, meter_id, quantity, properties, "
            '"timestamp", received_at, idempotency_key, source) '
            "SELECT %s, %s, 2.5, '{}'::jsonb, %s, %s, 'k' || i, 'import' "
            "FROM generate_series(1, 4) AS i",
            [org.pk, meter.pk, START + timedelta(minutes=5), NOW],
        )
        cursor.execute("SELECT count(DISTINCT xact_id) FROM usage_usageevent")
        assert cursor.fetchone()[0] == 1
    assert rollups_fold().events == 4
    assert HourlyUsage.objects.get(meter=meter).total == Decimal(10)
    day = Period(START, START + timedelta(days=1))
    assert usage_total(organisation=org, meter=meter, period=day) == Decimal(10)
