"""The events table on PostgreSQL: monthly partitions, the idempotency guard, the migration.

The guard tests run on both databases; the partition tests need PostgreSQL.
"""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from accounts.tests.factories import make_organisation
from core.periods import Period, add_months
from usage.models import UsageEvent, UsageEventKey
from usage.partitions import (
    default_partition,
    month_start,
    partition_name,
    partitioned,
    partitions_ensure,
    partitions_list,
)
from usage.rollups import rollups_fold, rollups_verify
from usage.selectors import usage_total
from usage.services import events_ingest
from usage.tasks import ensure_event_partitions
from usage.tests.factories import make_meter

NOW = datetime.now(UTC).replace(microsecond=0)


def payload(key, at, tokens=1):
    return {
        "event_name": "tokens",
        "idempotency_key": key,
        "timestamp": at.isoformat(),
        "properties": {"n": tokens},
    }


def where_stored(ids):
    """{event id: the partition holding it}."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT id, tableoid::regclass::text FROM usage_usageevent WHERE id = ANY(%s)",
            [list(ids)],
        )
        return dict(cursor.fetchall())


# --- The guard (both databases) ----------------------------------------------------------------


@pytest.mark.django_db
def test_a_key_is_counted_once_even_with_another_timestamp_in_another_month():
    organisation = make_organisation()
    make_meter("sum", code="tokens", property="n")
    first = events_ingest(
        organisation=organisation, payloads=[payload("k1", NOW - timedelta(days=33), 5)], now=NOW
    )
    again = events_ingest(
        organisation=organisation, payloads=[payload("k1", NOW - timedelta(minutes=1), 7)], now=NOW
    )
    assert first[0].status == "accepted"
    assert (again[0].status, again[0].event_id) == ("duplicate", first[0].event_id)
    assert UsageEvent.objects.filter(organisation=organisation).count() == 1
    guard = UsageEventKey.objects.get(organisation=organisation, idempotency_key="k1")
    assert guard.event_id == first[0].event_id
    # Another organisation may use the same key.
    other = make_organisation()
    assert (
        events_ingest(organisation=other, payloads=[payload("k1", NOW, 1)], now=NOW)[0].status
        == "accepted"
    )


@pytest.mark.django_db
def test_an_event_saved_through_the_orm_claims_its_key():
    organisation = make_organisation()
    meter = make_meter("count", code="calls")
    fields = {
        "organisation": organisation,
        "meter": meter,
        "quantity": Decimal(1),
        "timestamp": NOW,
        "received_at": NOW,
        "idempotency_key": "orm-1",
    }
    event = UsageEvent.objects.create(**fields)
    assert UsageEventKey.objects.get(
        organisation=organisation, idempotency_key="orm-1"
    ).event_id == (event.pk)
    with pytest.raises(IntegrityError), transaction.atomic():
        UsageEvent.objects.create(**fields)
    assert UsageEvent.objects.count() == 1
    result = events_ingest(
        organisation=organisation,
        payloads=[
            {"event_name": "calls", "idempotency_key": "orm-1", "timestamp": NOW.isoformat()}
        ],
        now=NOW,
    )
    assert (result[0].status, result[0].event_id) == ("duplicate", event.pk)


@pytest.mark.django_db(transaction=True)
def test_concurrent_requests_with_the_same_keys_store_each_once(at_once):
    organisation = make_organisation()
    make_meter("sum", code="tokens", property="n")
    keys = [f"c{n}" for n in range(300)]
    answers: list[list] = []
    lock = threading.Lock()

    def send():
        results = events_ingest(
            organisation=organisation,
            payloads=[payload(key, NOW - timedelta(seconds=n), n) for n, key in enumerate(keys)],
            now=NOW,
        )
        with lock:
            answers.append(results)

    threads = 4 if connection.vendor == "postgresql" else 1
    assert at_once(send, threads=threads) == []
    stored = dict(
        UsageEvent.objects.filter(organisation=organisation).values_list("idempotency_key", "id")
    )
    assert sorted(stored) == sorted(keys)
    for results in answers:
        assert {r.status for r in results} <= {"accepted", "duplicate"}
        assert {r.idempotency_key: r.event_id for r in results} == stored
    accepted = [r.idempotency_key for results in answers for r in results if r.status == "accepted"]
    assert sorted(accepted) == sorted(keys)  # each key accepted by exactly one request


# --- Partitions (PostgreSQL) --------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_events_land_in_their_months_partition_and_stragglers_in_the_default():
    assert partitioned()
    months = {partition.start for partition in partitions_list()}
    this_month = month_start(NOW)
    for ahead in range(-1, 4):  # the migration made these; the schedule keeps them ahead
        assert add_months(this_month, ahead) in months
    organisation = make_organisation()
    make_meter("sum", code="tokens", property="n")
    old = datetime(2019, 5, 17, 12, tzinfo=UTC)  # far back: an import of history
    results = events_ingest(
        organisation=organisation,
        payloads=[payload("now", NOW, 3), payload("old", old, 4), payload("old2", old, 5)],
        now=NOW,
        allow_backdated=True,
    )
    ids = {r.idempotency_key: r.event_id for r in results}
    stored = where_stored(ids.values())
    assert stored[ids["now"]] == partition_name(this_month)
    assert stored[ids["old"]] == stored[ids["old2"]] == default_partition()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_creating_a_month_moves_its_events_out_of_the_default_partition_unchanged():
    organisation = make_organisation()
    meter = make_meter("sum", code="tokens", property="n")
    may = Period(datetime(2019, 5, 1, tzinfo=UTC), datetime(2019, 6, 1, tzinfo=UTC))
    events_ingest(
        organisation=organisation,
        payloads=[payload(f"m{n}", may.start + timedelta(hours=n), n) for n in range(1, 41)]
        + [payload("june", may.end, 1000)],
        now=NOW,
        allow_backdated=True,
    )
    rollups_fold()
    before = {
        row[0]: row[1:]
        for row in UsageEvent.objects.filter(organisation=organisation).values_list(
            "id", "idempotency_key", "quantity", "timestamp", "received_at"
        )
    }
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, xact_id FROM usage_usageevent")
        xacts = dict(cursor.fetchall())
    total = usage_total(organisation=organisation, meter=meter, period=may)
    assert total == Decimal(820)

    result = partitions_ensure(months=[may.start])
    assert result.created == [partition_name(may.start)] and result.moved == 40
    assert partitions_ensure(months=[may.start]).created == []  # once
    stored = where_stored(before)
    assert sorted(stored.values()).count(partition_name(may.start)) == 40
    assert list(stored.values()).count(default_partition()) == 1  # June's stays
    after = {
        row[0]: row[1:]
        for row in UsageEvent.objects.filter(organisation=organisation).values_list(
            "id", "idempotency_key", "quantity", "timestamp", "received_at"
        )
    }
    assert after == before
    with connection.cursor() as cursor:
        cursor.execute("SELECT id, xact_id FROM usage_usageevent")
        assert dict(cursor.fetchall()) == xacts  # the rollups' watermark key is kept
    assert rollups_fold().events == 0  # nothing looks new to the fold
    assert usage_total(organisation=organisation, meter=meter, period=may) == total
    assert rollups_verify()[1] == []


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_schedule_creates_months_ahead(settings):
    settings.EVENT_PARTITIONS_AHEAD = 6
    this_month = month_start(NOW)
    assert add_months(this_month, 6) not in {p.start for p in partitions_list()}
    said = ensure_event_partitions()
    assert partition_name(add_months(this_month, 6)) in said
    assert {add_months(this_month, n) for n in range(7)} <= {p.start for p in partitions_list()}
    assert ensure_event_partitions() == "every partition needed exists"
    # An insert goes on while a partition is created (ATTACH takes no lock that blocks it).
    organisation = make_organisation()
    make_meter("sum", code="tokens", property="n")
    assert (
        events_ingest(organisation=organisation, payloads=[payload("x", NOW)], now=NOW)[0].status
        == "accepted"
    )


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_migration_partitions_an_existing_table_keeping_every_row():
    """Back to the plain table (0003), events stored there, forward again: same rows and ids,
    keys in the guard, new ids after the old ones, duplicates still refused."""
    organisation = make_organisation()
    meter = make_meter("sum", code="tokens", property="n")
    executor = MigrationExecutor(connection)
    executor.migrate([("usage", "0003_rollups")])
    try:
        assert not partitioned()
        with connection.cursor() as cursor:
            for n in range(1, 6):
                cursor.execute(
                    "INSERT INTO usage_usageevent (organisation_id, meter_id, quantity, "
                    "properties, timestamp, received_at, idempotency_key, source, delayed) "
                    "VALUES (%s, %s, %s, '{}', %s, %s, %s, 'api', false)",
                    [organisation.pk, meter.pk, n, NOW - timedelta(days=40 * n), NOW, f"p{n}"],
                )
            cursor.execute("SELECT id, idempotency_key, quantity FROM usage_usageevent")
            plain = sorted(cursor.fetchall())
    finally:
        executor = MigrationExecutor(connection)
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())
    assert partitioned()
    kept = sorted(UsageEvent.objects.values_list("id", "idempotency_key", "quantity"))
    assert kept == plain
    assert sorted(UsageEventKey.objects.values_list("event_id", "idempotency_key")) == [
        (row[0], row[1]) for row in plain
    ]
    again = events_ingest(
        organisation=organisation,
        payloads=[payload("p1", NOW), payload("new", NOW, 9)],
        now=NOW,
    )
    assert [r.status for r in again] == ["duplicate", "accepted"]
    assert again[1].event_id > max(row[0] for row in plain)
    call_command("migrate", verbosity=0)  # and nothing else is pending


@pytest.mark.postgres
@pytest.mark.django_db
def test_a_period_read_touches_only_its_months_partitions():
    """The selectors' raw reads bound the timestamp: PostgreSQL plans only the months asked."""
    organisation = make_organisation()
    meter = make_meter("sum", code="tokens", property="n")
    this_month = month_start(NOW)
    period = Period(this_month, add_months(this_month, 1))
    events = UsageEvent.objects.filter(
        organisation=organisation,
        meter=meter,
        timestamp__gte=period.start,
        timestamp__lt=period.end,
    )
    sql, params = events.values_list("quantity").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql, params)
        plan = str(cursor.fetchone()[0])
    scanned = {name for name in _relations(plan) if name.startswith("usage_usageevent")}
    assert scanned == {partition_name(this_month)}
    assert usage_total(organisation=organisation, meter=meter, period=period) == 0


def _relations(plan):
    return set(re.findall(r"'Relation Name': '([a-z0-9_]+)'", plan))
