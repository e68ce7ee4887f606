"""Archiving old months of events to JSON lines and loading them back (both databases)."""

from __future__ import annotations

import gzip
import hashlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import pytest
from django.db import connection

from accounts.tests.factories import make_organisation
from core.periods import Period
from usage.archive import ArchiveError, archive_file, events_archive, events_restore
from usage.models import UsageEvent, UsageEventKey
from usage.partitions import partition_name, partitions_ensure
from usage.rollups import rollups_fold, rollups_verify
from usage.selectors import usage_total
from usage.services import events_ingest
from usage.tests.factories import make_meter

JUL = Period(datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 8, 1, tzinfo=UTC))
AUG = Period(datetime(2026, 8, 1, tzinfo=UTC), datetime(2026, 9, 1, tzinfo=UTC))
SEP = Period(datetime(2026, 9, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)  # September is outside the 35-day window


def send(organisation, payloads):
    results = events_ingest(
        organisation=organisation, payloads=payloads, now=NOW, allow_backdated=True
    )
    assert all(r.status == "accepted" for r in results), results
    return results


def history(organisation):
    """Tokens every 7 hours through July to mid-September; storage readings in July only."""
    payloads = []
    at, n = JUL.start + timedelta(minutes=30), 0
    while at < SEP.start + timedelta(days=15):
        n += 1
        payloads.append(
            {
                "event_name": "tokens",
                "idempotency_key": f"t{n}",
                "timestamp": at.isoformat(),
                "properties": {"n": f"{n}.25"},
            }
        )
        at += timedelta(hours=7)
    for day, gb in ((2, "10"), (20, "30")):
        payloads.append(
            {
                "event_name": "storage",
                "idempotency_key": f"s{day}",
                "timestamp": (JUL.start + timedelta(days=day)).isoformat(),
                "properties": {"gb": gb},
            }
        )
    send(organisation, payloads)


@pytest.fixture
def months(db):
    return months_setup()


def months_setup():
    """An organisation with tokens and storage history from July to mid-September, folded."""
    if connection.vendor == "postgresql":
        partitions_ensure(months=[JUL.start, AUG.start, SEP.start])
    organisation = make_organisation()
    tokens = make_meter("sum", code="tokens", property="n")
    storage = make_meter("weighted_sum", code="storage", property="gb")
    history(organisation)
    rollups_fold()
    return organisation, tokens, storage


def figures(organisation, tokens, storage):
    return {
        period: (
            usage_total(organisation=organisation, meter=tokens, period=period),
            usage_total(organisation=organisation, meter=storage, period=period),
        )
        for period in (JUL, AUG, SEP)
    }


@pytest.mark.django_db(transaction=True)
def test_archive_exports_removes_and_loads_back_exactly(months, tmp_path):
    organisation, tokens, storage = months
    before = figures(organisation, tokens, storage)
    rows = {
        m: UsageEvent.objects.filter(timestamp__gte=m.start, timestamp__lt=m.end)
        for m in (JUL, AUG)
    }
    expected = {m: (q.count(), sum(q.values_list("quantity", flat=True))) for m, q in rows.items()}
    all_ids = {m: set(q.values_list("id", flat=True)) for m, q in rows.items()}

    done = events_archive(before=SEP.start, directory=tmp_path, now=NOW)

    assert [(d.month, d.events, d.total) for d in done] == [
        (JUL.start, *expected[JUL]),
        (AUG.start, *expected[AUG]),
    ]
    for month in (JUL, AUG):
        path = archive_file(tmp_path, month.start)
        lines = [orjson.loads(line) for line in gzip.decompress(path.read_bytes()).splitlines()]
        assert {line["id"] for line in lines} == all_ids[month]
        assert sum(Decimal(line["quantity"]) for line in lines) == expected[month][1]
        manifest = orjson.loads(
            path.with_name(f"usage-events-{month.start:%Y-%m}.json").read_bytes()
        )
        assert manifest["events"] == expected[month][0]
        assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # July's last storage reading stays: September carries its level (30 GB) in.
    left = UsageEvent.objects.filter(timestamp__lt=SEP.start)
    assert list(left.values_list("idempotency_key", flat=True)) == ["s20"]
    assert done[0].kept == 1
    after = figures(organisation, tokens, storage)
    assert after[SEP] == before[SEP]
    assert after[JUL][0] == after[AUG][0] == 0
    assert rollups_verify()[1] == []
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {partition_name(AUG.start)}")  # noqa: S608
            assert cursor.fetchone()[0] == 0
    # The keys stay: an archived event sent again is a duplicate, not counted again.
    again = events_ingest(
        organisation=organisation,
        payloads=[
            {
                "event_name": "tokens",
                "idempotency_key": "t3",
                "timestamp": JUL.start.isoformat(),
                "properties": {"n": 1},
            }
        ],
        now=NOW,
        allow_backdated=True,
    )
    assert again[0].status == "duplicate"
    assert (
        UsageEventKey.objects.filter(organisation=organisation).count()
        == sum(count for count, _ in expected.values())
        + UsageEvent.objects.filter(timestamp__gte=SEP.start).count()
    )

    loaded = [events_restore(path=archive_file(tmp_path, m.start)) for m in (JUL, AUG)]
    assert loaded == [expected[JUL][0] - 1, expected[AUG][0]]  # the kept reading was there
    assert figures(organisation, tokens, storage) == before
    assert rollups_verify()[1] == []
    assert rollups_fold().events == 0  # loaded rows are in the buckets once, not folded again
    assert figures(organisation, tokens, storage) == before
    assert [events_restore(path=archive_file(tmp_path, m.start)) for m in (JUL, AUG)] == [0, 0]


@pytest.mark.django_db
def test_archive_refuses_a_month_still_in_the_window_or_not_a_month_start(months, tmp_path):
    with pytest.raises(ArchiveError, match="acceptance window"):
        events_archive(before=datetime(2026, 11, 1, tzinfo=UTC), directory=tmp_path, now=NOW)
    with pytest.raises(ArchiveError, match="first instant"):
        events_archive(before=datetime(2026, 9, 2, tzinfo=UTC), directory=tmp_path, now=NOW)
    assert UsageEvent.objects.filter(timestamp__lt=SEP.start).count() > 100
    assert list(tmp_path.iterdir()) == []


@pytest.mark.django_db
def test_a_damaged_archive_is_not_loaded(months, tmp_path):
    events_archive(before=AUG.start, directory=tmp_path, now=NOW)
    path = archive_file(tmp_path, JUL.start)
    data = bytearray(path.read_bytes())
    data[-12] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match="SHA-256"):
        events_restore(path=path)


@pytest.mark.django_db(transaction=True)
def test_archiving_again_never_overwrites_and_takes_what_an_earlier_run_kept(months, tmp_path):
    organisation, tokens, storage = months
    # An August reading: s20 (July 20) stays the last reading before August, not before September.
    send(
        organisation,
        [
            {
                "event_name": "storage",
                "idempotency_key": "s-aug",
                "timestamp": (AUG.start + timedelta(days=3)).isoformat(),
                "properties": {"gb": "5"},
            }
        ],
    )
    rollups_fold()
    expected = figures(organisation, tokens, storage)
    first = events_archive(before=AUG.start, directory=tmp_path, now=NOW)
    july = archive_file(tmp_path, JUL.start)
    assert [d.path for d in first] == [july] and first[0].kept == 1
    july_bytes = july.read_bytes()
    # Nothing new before August: archiving again changes nothing (s20 is still needed).
    assert events_archive(before=AUG.start, directory=tmp_path, now=NOW) == []
    # Before September, s-aug carries the level: s20 goes, into part 2 of July.
    second = events_archive(before=SEP.start, directory=tmp_path, now=NOW)
    assert [(d.path.name, d.events, d.kept) for d in second] == [
        ("usage-events-2026-07.2.jsonl.gz", 1, 0),
        ("usage-events-2026-08.jsonl.gz", second[1].events, 1),
    ]
    assert july.read_bytes() == july_bytes
    assert list(
        UsageEvent.objects.filter(timestamp__lt=SEP.start).values_list("idempotency_key", flat=True)
    ) == ["s-aug"]
    assert figures(organisation, tokens, storage)[SEP] == expected[SEP]
    for path in sorted(tmp_path.glob("*.jsonl.gz")):
        events_restore(path=path)
    assert figures(organisation, tokens, storage) == expected
    assert rollups_verify()[1] == []
