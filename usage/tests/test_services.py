import json
import random
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.test import Client

from accounts.tests.factories import make_api_key, make_organisation
from usage.models import UsageEvent
from usage.services import EventRejected, event_record, events_ingest
from usage.tests.factories import make_meter

NOW = datetime(2026, 11, 23, 12, tzinfo=UTC)


def event(meter, key, **extra):
    return {"event_name": meter.code, "idempotency_key": key, **extra}


@pytest.mark.django_db
def test_ingest_stores_what_it_accepts_with_event_time_and_receipt_time():
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    at = NOW - timedelta(days=2)
    [result] = events_ingest(
        organisation=org,
        payloads=[
            event(meter, "a", timestamp=at.isoformat(), properties={"tokens": 1200, "model": "x"})
        ],
        now=NOW,
    )
    assert result.status == "accepted"
    stored = UsageEvent.objects.get(pk=result.event_id)
    assert (stored.quantity, stored.timestamp, stored.received_at) == (Decimal(1200), at, NOW)
    assert stored.properties == {"tokens": 1200, "model": "x"}
    assert stored.source == "api"


@pytest.mark.django_db
def test_timestamp_defaults_to_receipt_and_is_stored_in_utc():
    org = make_organisation()
    meter = make_meter("count")
    results = events_ingest(
        organisation=org,
        payloads=[event(meter, "a"), event(meter, "b", timestamp="2026-11-23T12:30:00+01:00")],
        now=NOW,
    )
    assert [UsageEvent.objects.get(pk=r.event_id).timestamp for r in results] == [
        NOW,
        datetime(2026, 11, 23, 11, 30, tzinfo=UTC),
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("offset", "status"),
    [
        (-timedelta(days=35), "accepted"),
        (-timedelta(days=35, microseconds=1), "rejected"),
        (timedelta(minutes=5), "accepted"),
        (timedelta(minutes=5, microseconds=1), "rejected"),
    ],
)
def test_acceptance_window_edges(offset, status):
    org = make_organisation()
    meter = make_meter("count")
    [result] = events_ingest(
        organisation=org,
        payloads=[event(meter, "a", timestamp=(NOW + offset).isoformat())],
        now=NOW,
    )
    assert result.status == status
    assert UsageEvent.objects.count() == (status == "accepted")


@pytest.mark.django_db
def test_backdated_imports_lift_only_the_past_bound():
    org = make_organisation()
    meter = make_meter("count")
    old, future = NOW - timedelta(days=400), NOW + timedelta(hours=1)
    results = events_ingest(
        organisation=org,
        payloads=[
            event(meter, "old", timestamp=old.isoformat()),
            event(meter, "future", timestamp=future.isoformat()),
        ],
        now=NOW,
        allow_backdated=True,
    )
    assert [(r.status, r.code) for r in results] == [
        ("accepted", None),
        ("rejected", "timestamp_out_of_window"),
    ]


@pytest.mark.django_db
def test_a_key_is_counted_once_per_organisation_for_ever():
    org, other = make_organisation(), make_organisation()
    meter = make_meter("sum", property="quantity")
    first = events_ingest(organisation=org, payloads=[event(meter, "k", quantity="5")], now=NOW)
    later = events_ingest(
        organisation=org, payloads=[event(meter, "k", quantity="7")], now=NOW + timedelta(days=30)
    )
    elsewhere = events_ingest(
        organisation=other, payloads=[event(meter, "k", quantity="7")], now=NOW
    )
    assert first[0].status == "accepted"
    assert (later[0].status, later[0].event_id) == ("duplicate", first[0].event_id)
    assert elsewhere[0].status == "accepted"
    assert UsageEvent.objects.get(organisation=org).quantity == 5


@pytest.mark.django_db
def test_event_record_raises_with_the_api_code():
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    result = event_record(
        organisation=org, event_name=meter.code, idempotency_key="r1", properties={"tokens": 3}
    )
    assert result.status == "accepted"
    assert UsageEvent.objects.get().source == "record"
    with pytest.raises(EventRejected) as rejected:
        event_record(organisation=org, event_name=meter.code, idempotency_key="r2", quantity="3")
    assert rejected.value.code == "invalid_quantity"
    with pytest.raises(EventRejected) as rejected:
        event_record(organisation=org, event_name="nope", idempotency_key="r3")
    assert rejected.value.code == "unknown_meter"


@pytest.mark.django_db
def test_usage_events_are_append_only():
    org = make_organisation()
    meter = make_meter("count")
    [result] = events_ingest(organisation=org, payloads=[event(meter, "a")], now=NOW)
    stored = UsageEvent.objects.get(pk=result.event_id)
    stored.quantity = Decimal(2)
    with pytest.raises(ValueError, match="append-only"):
        stored.save()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_overlapping_batches_count_each_key_once():
    """Many connections send overlapping batches of the same keys at once: exact totals."""
    org = make_organisation()
    secret = make_api_key(org).secret
    meter = make_meter("sum", property="tokens")
    keys = [f"key-{n}" for n in range(600)]
    quantity = {key: Decimal(random.Random(key).randint(1, 10_000)) / 1000 for key in keys}  # noqa: S311
    threads_count, rounds = 8, 4
    barrier = threading.Barrier(threads_count)
    outcomes: list[dict] = []
    errors: list[BaseException] = []

    def sender(seed: int) -> None:
        try:
            client = Client()
            rng = random.Random(seed)  # noqa: S311
            barrier.wait()
            for _ in range(rounds):
                batch = rng.sample(keys, 300)
                body = {
                    "events": [
                        {
                            "event_name": meter.code,
                            "idempotency_key": k,
                            "properties": {"tokens": str(quantity[k])},
                        }
                        for k in batch
                    ]
                }
                response = client.post(
                    "/api/v1/events",
                    data=json.dumps(body),
                    content_type="application/json",
                    headers={"Authorization": f"Bearer {secret}"},
                )
                assert response.status_code == 200, response.content
                outcomes.append(response.json())
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(threads_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors

    sent_keys = {r["idempotency_key"] for outcome in outcomes for r in outcome["results"]}
    accepted = [
        r["idempotency_key"]
        for outcome in outcomes
        for r in outcome["results"]
        if r["status"] == "accepted"
    ]
    assert sorted(accepted) == sorted(sent_keys)  # each key accepted exactly once
    assert sum(o["duplicates"] for o in outcomes) == threads_count * rounds * 300 - len(sent_keys)
    stored = UsageEvent.objects.filter(organisation=org)
    assert stored.count() == len(sent_keys)
    assert sum(e.quantity for e in stored) == sum(quantity[k] for k in sent_keys)


@pytest.mark.django_db
def test_events_received_long_after_their_timestamp_are_flagged_delayed(settings):
    org = make_organisation()
    meter = make_meter("count")
    threshold = settings.INGEST_DELAYED_AFTER
    results = events_ingest(
        organisation=org,
        payloads=[
            event(meter, "prompt", timestamp=(NOW - threshold).isoformat()),
            event(
                meter, "late", timestamp=(NOW - threshold - timedelta(microseconds=1)).isoformat()
            ),
        ],
        now=NOW,
    )
    flags = {r.idempotency_key: UsageEvent.objects.get(pk=r.event_id).delayed for r in results}
    assert flags == {"prompt": False, "late": True}
