"""Stream mode: the outbox row commits with its event; the flush sends each event exactly once."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command

from stripe_sync.models import OutboxEvent
from stripe_sync.services import _claim, event_identifier, outbox_flush
from usage.models import UsageEvent


def sent_identifiers(fake):
    return [e["identifier"] for r in fake.stream_requests() for e in r.params["events"]]


def assert_stripe_has_each_event_once(fake, ingest):
    events = UsageEvent.objects.filter(organisation=ingest.organisation, meter=ingest.meter)
    assert sorted(fake.meter_events) == sorted(event_identifier(e.pk) for e in events)
    customer = ingest.organisation.stripe_customer.stripe_id
    ours = sum((e.quantity for e in events), Decimal(0))
    assert fake.meter_total(meter_event_name="meterline_tokens", customer=customer) == ours


@pytest.mark.django_db
def test_without_a_key_the_outbox_keeps_every_event(streamed, fake):
    streamed(3, quantity="2.5")

    report = outbox_flush()

    assert report.off
    assert (
        list(OutboxEvent.objects.values_list("state", "quantity"))
        == [("pending", Decimal("2.5"))] * 3
    )
    assert fake.requests == []


@pytest.mark.django_db
def test_a_rolled_back_ingestion_leaves_no_outbox_row(streamed):
    from django.db import transaction

    with pytest.raises(RuntimeError), transaction.atomic():
        streamed(2)
        assert OutboxEvent.objects.count() == 2
        raise RuntimeError("the request failed after storing")
    assert OutboxEvent.objects.count() == 0
    assert UsageEvent.objects.count() == 0


@pytest.mark.django_db
def test_flush_sends_batches_of_100_with_identifiers_from_our_event_ids(streamed, stripe_on):
    streamed(250, quantity="1.5")

    report = outbox_flush()

    assert (report.sent, report.requests) == (250, 3)
    sizes = [len(r.params["events"]) for r in stripe_on.stream_requests()]
    assert sizes == [100, 100, 50]
    first = stripe_on.stream_requests()[0].params["events"][0]
    event = UsageEvent.objects.order_by("id").first()
    assert first == {
        "event_name": "meterline_tokens",
        "identifier": f"meterline-evt-{event.pk}",
        "payload": {
            "stripe_customer_id": streamed.organisation.stripe_customer.stripe_id,
            "value": "1.5",
        },
        "timestamp": event.timestamp.isoformat().replace("+00:00", "Z"),
    }
    # One session token for the whole run, sent as the bearer of each stream request.
    assert len(stripe_on.calls("POST", "/v2/billing/meter_event_session")) == 1
    assert_stripe_has_each_event_once(stripe_on, streamed)
    assert set(OutboxEvent.objects.values_list("state", flat=True)) == {"sent"}
    assert outbox_flush().sent == 0  # nothing is sent twice


@pytest.mark.django_db
def test_an_answer_lost_after_stripe_applied_the_batch_is_resent_harmlessly(streamed, stripe_on):
    streamed(30)
    now = datetime.now(UTC)
    # Stripe stores the batch, then the connection drops before the answer.
    stripe_on.fail(status=0, apply=True, path="/v2/billing/meter_event_stream")

    first = outbox_flush(now=now)
    assert (first.sent, first.retried) == (0, 30)
    assert len(stripe_on.meter_events) == 30

    second = outbox_flush(now=now + timedelta(minutes=5))

    assert second.sent == 30
    assert sent_identifiers(stripe_on).count(event_identifier(UsageEvent.objects.first().pk)) == 2
    assert_stripe_has_each_event_once(stripe_on, streamed)


@pytest.mark.django_db
def test_already_exists_counts_as_delivered_and_other_4xx_park_only_their_event(
    streamed, stripe_on
):
    streamed(3)
    first, second, third = OutboxEvent.objects.order_by("id")
    now = datetime.now(UTC)
    # The stream refuses the batch as a whole: the flusher falls back to one event per call.
    stripe_on.fail(status=400, path="/v2/billing/meter_event_stream")
    # Stripe already has the first event (sent before a crash, say).
    stripe_on.meter_events[first.identifier] = {"identifier": first.identifier}
    # And refuses the second for a reason of its own.
    stripe_on.fail(
        status=400,
        path="/v1/billing/meter_events",
        body_contains=f"identifier={second.identifier}&",
        body={"error": {"type": "invalid_request_error", "message": "Payload value is invalid."}},
    )

    report = outbox_flush(now=now)

    states = {row.identifier: row.state for row in OutboxEvent.objects.all()}
    v1 = [r.params["identifier"] for r in stripe_on.calls("POST", "/v1/billing/meter_events")]
    assert v1 == [first.identifier, second.identifier, third.identifier]
    assert states == {
        first.identifier: "sent",
        second.identifier: "parked",
        third.identifier: "sent",
    }
    assert (report.sent, report.duplicates, report.parked) == (2, 1, 1)
    parked = OutboxEvent.objects.get(pk=second.pk)
    assert "Payload value is invalid." in parked.last_error


@pytest.mark.django_db
def test_a_429_storm_backs_off_with_jitter_and_then_delivers_each_event_once(streamed, stripe_on):
    streamed(100)
    now = datetime.now(UTC)
    stripe_on.fail(times=6, status=429, path="/v2/billing/meter_event_stream")

    delays = []
    clock = now
    for _ in range(30):
        report = outbox_flush(now=clock)
        pending = OutboxEvent.objects.filter(state="pending")
        if not pending.exists():
            break
        next_at = min(pending.values_list("next_attempt_at", flat=True))
        delays.append((next_at - clock).total_seconds())
        clock = next_at
    assert OutboxEvent.objects.filter(state="sent").count() == 100
    # Exponential with jitter: each wait is half to all of 5s * 2**(n-1).
    assert len(delays) == 6
    for n, delay in enumerate(delays, start=1):
        ceiling = min(300, 5 * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    assert len(stripe_on.stream_requests()) == 6 + 1
    assert_stripe_has_each_event_once(stripe_on, streamed)
    assert report.sent == 100
    assert set(OutboxEvent.objects.values_list("attempts", flat=True)) == {6}


@pytest.mark.django_db
def test_a_ten_minute_outage_loses_nothing_and_does_not_hammer_stripe(streamed, stripe_on):
    streamed(40)
    start = datetime.now(UTC)
    stripe_on.outage = 503
    # The schedule runs the flush every 15 seconds (simulated) for the ten minutes of the outage.
    for tick in range(40):
        report = outbox_flush(now=start + timedelta(seconds=15 * tick))
        assert report.sent == 0
    during = len(stripe_on.requests)
    assert OutboxEvent.objects.filter(state="pending").count() == 40
    # Backing off (5, 10, 20, 40, 80, 160 s...) it tried a handful of times, not 40.
    assert 4 <= during <= 9
    stripe_on.outage = None

    clock = start + timedelta(minutes=10)
    while OutboxEvent.objects.filter(state="pending").exists():
        outbox_flush(now=clock)
        clock += timedelta(seconds=15)
        assert clock < start + timedelta(minutes=16), "the outbox should drain after the outage"
    assert_stripe_has_each_event_once(stripe_on, streamed)


@pytest.mark.django_db
def test_a_timeout_is_retried_like_an_outage(streamed, stripe_on, settings):
    settings.STRIPE_TIMEOUT_SECONDS = 1
    streamed(5)
    now = datetime.now(UTC)
    stripe_on.fail(status=500, delay=1.5, path="/v2/billing/meter_event_stream")

    assert outbox_flush(now=now).retried == 5
    assert outbox_flush(now=now + timedelta(minutes=1)).sent == 5
    assert_stripe_has_each_event_once(stripe_on, streamed)


@pytest.mark.django_db
def test_rows_held_by_a_dead_flusher_wait_for_the_lease_then_go(streamed, stripe_on):
    streamed(10)
    now = datetime.now(UTC)
    _claim(now=now, limit=100)  # a flusher took them and died before answering

    assert outbox_flush(now=now + timedelta(seconds=60)).sent == 0
    assert outbox_flush(now=now + timedelta(seconds=121)).sent == 10
    assert_stripe_has_each_event_once(stripe_on, streamed)


@pytest.mark.django_db
def test_events_older_than_35_days_are_reported_not_sent(streamed, stripe_on, capsys):
    now = datetime.now(UTC)
    streamed(2, at=now - timedelta(days=36))
    streamed(1, at=now - timedelta(days=1))

    call_command("stripe_flush")

    out = capsys.readouterr().out
    assert "sent 1 in 1 request(s)" in out
    assert "too old 2" in out
    old = OutboxEvent.objects.filter(state="expired").order_by("id")
    assert [row.identifier for row in old] == [line.strip() for line in out.splitlines()[-2:]]
    assert len(stripe_on.meter_events) == 1


@pytest.mark.django_db
def test_stripe_flush_without_a_key_says_so(streamed, capsys):
    streamed(1)
    call_command("stripe_flush")
    assert "Stripe is off" in capsys.readouterr().out
    assert OutboxEvent.objects.get().state == "pending"


@pytest.mark.django_db
def test_staff_see_parked_events_and_can_send_them_again(streamed, stripe_on, admin_client):
    streamed(1)
    stripe_on.fail(status=400, path="/v2/billing/meter_event_stream")
    stripe_on.fail(status=400, path="/v1/billing/meter_events")
    outbox_flush()
    row = OutboxEvent.objects.get()
    assert row.state == "parked"

    page = admin_client.get("/admin/stripe_sync/outboxevent/?state__exact=parked")
    assert row.identifier in page.content.decode()
    admin_client.post(
        "/admin/stripe_sync/outboxevent/",
        {"action": "requeue", "_selected_action": [row.pk]},
    )
    assert outbox_flush().sent == 1
    assert list(stripe_on.meter_events) == [row.identifier]


@pytest.mark.django_db
def test_a_customer_stripe_refuses_holds_its_events_back_without_parking_them(streamed, stripe_on):
    streamed(4)
    now = datetime.now(UTC)
    stripe_on.fail(status=400, path="/v1/customers")

    report = outbox_flush(now=now)

    assert (report.sent, report.retried, report.parked) == (0, 4, 0)
    rows = OutboxEvent.objects.all()
    assert {(r.state, r.claim, r.attempts) for r in rows} == {("pending", "", 1)}
    assert "400" in rows[0].last_error
    assert outbox_flush(now=now + timedelta(minutes=1)).sent == 4
