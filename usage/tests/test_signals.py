from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from accounts.tests.factories import make_organisation
from usage.models import UsageEvent
from usage.services import events_ingest
from usage.signals import events_stored, events_will_store
from usage.tests.factories import make_meter

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


@pytest.fixture
def heard():
    calls = []

    def receiver(sender, organisation, events, **kwargs):
        calls.append((organisation, events))

    events_stored.connect(receiver, sender=UsageEvent, weak=False)
    yield calls
    events_stored.disconnect(receiver, sender=UsageEvent)


@pytest.mark.django_db
def test_receivers_hear_only_the_events_stored_now_in_key_order(heard):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    at = NOW - timedelta(minutes=5)

    def payload(key, tokens):
        return {
            "event_name": meter.code,
            "idempotency_key": key,
            "timestamp": at.isoformat(),
            "properties": {"tokens": tokens},
        }

    events_ingest(organisation=org, payloads=[payload("b", 1)], now=NOW)
    results = events_ingest(
        organisation=org,
        payloads=[payload("c", 3), payload("b", 1), payload("a", 2), {"event_name": "nope"}],
        now=NOW,
    )
    assert [r.status for r in results] == ["accepted", "duplicate", "accepted", "rejected"]
    assert len(heard) == 2
    organisation, events = heard[1]
    assert organisation == org
    assert [(e.idempotency_key, e.quantity, e.timestamp, e.meter) for e in events] == [
        ("a", Decimal(2), at, meter),
        ("c", Decimal(3), at, meter),
    ]
    assert [e.id for e in events] == [results[2].event_id, results[0].event_id]


@pytest.mark.django_db
def test_nothing_is_sent_when_every_event_was_a_duplicate(heard):
    org = make_organisation()
    meter = make_meter("count")
    payload = {"event_name": meter.code, "idempotency_key": "k"}
    events_ingest(organisation=org, payloads=[payload], now=NOW)
    events_ingest(organisation=org, payloads=[payload], now=NOW)
    assert len(heard) == 1


@pytest.mark.django_db(transaction=True)
def test_a_failing_receiver_rolls_the_events_back_with_its_own_writes():
    org = make_organisation()
    meter = make_meter("count")

    def receiver(**kwargs):
        raise RuntimeError("outbox full")

    def will_write(**kwargs):
        return True

    events_will_store.connect(will_write, sender=UsageEvent, weak=False)
    events_stored.connect(receiver, sender=UsageEvent, weak=False)
    try:
        with pytest.raises(RuntimeError):
            events_ingest(
                organisation=org,
                payloads=[{"event_name": meter.code, "idempotency_key": "k"}],
                now=NOW,
            )
    finally:
        events_stored.disconnect(receiver, sender=UsageEvent)
        events_will_store.disconnect(will_write, sender=UsageEvent)
    assert not UsageEvent.objects.filter(organisation=org).exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("will_write", [False, True])
def test_the_insert_shares_a_transaction_with_receivers_only_when_one_will_write(will_write):
    from django.db import connection

    org = make_organisation()
    meter = make_meter("count")
    seen = {}

    def ahead(sender, organisation, meter_ids, **kwargs):
        seen["meter_ids"] = meter_ids
        return will_write

    def stored(sender, organisation, events, **kwargs):
        seen["in_transaction"] = connection.in_atomic_block

    events_will_store.connect(ahead, sender=UsageEvent, weak=False)
    events_stored.connect(stored, sender=UsageEvent, weak=False)
    try:
        events_ingest(
            organisation=org,
            payloads=[{"event_name": meter.code, "idempotency_key": "k"}],
            now=NOW,
        )
    finally:
        events_will_store.disconnect(ahead, sender=UsageEvent)
        events_stored.disconnect(stored, sender=UsageEvent)
    assert seen == {"meter_ids": frozenset({meter.pk}), "in_transaction": will_write}
