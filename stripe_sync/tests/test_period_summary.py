"""period_summary mode: one meter event per invoice and meter, with the period's total, once."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from accounts.tests.factories import make_organisation
from invoices.models import Invoice
from invoices.services import periods_close
from plans.tests.factories import make_plan, make_subscription
from stripe_sync.models import PeriodSummaryEvent
from stripe_sync.services import (
    meter_configure,
    period_summaries_record,
    period_summaries_send,
    summary_identifier,
)
from usage.services import events_ingest
from usage.tests.factories import make_meter


@pytest.fixture
def closed(db):
    """Two organisations whose first period ended about ten days ago, closed into invoices."""
    now = datetime.now(UTC).replace(microsecond=0)
    anchor = (now - timedelta(days=40)).replace(hour=0, minute=0, second=0)
    seats = make_meter("max", code="seats", property="seats")
    storage = make_meter("sum", code="gb", property="gb")
    meter_configure(meter=seats, mode="period_summary")
    meter_configure(meter=storage, mode="period_summary")
    plan = make_plan(
        {
            seats: {"model": "standard", "unit_price": "2"},
            storage: {"model": "standard", "unit_price": "0.1"},
        }
    )
    orgs = [make_organisation(), make_organisation()]
    for n, org in enumerate(orgs, start=1):
        make_subscription(org, plan, anchor)
        payloads = [
            {
                "event_name": "seats",
                "idempotency_key": f"s{i}",
                "properties": {"seats": 3 * n + i},
                "timestamp": (anchor + timedelta(days=i + 1)).isoformat(),
            }
            for i in range(3)
        ] + [
            {
                "event_name": "gb",
                "idempotency_key": f"g{i}",
                "properties": {"gb": "1.25"},
                "timestamp": (anchor + timedelta(days=i + 1)).isoformat(),
            }
            for i in range(4 * n)
        ]
        results = events_ingest(
            organisation=org, payloads=payloads, now=now - timedelta(hours=1), allow_backdated=True
        )
        assert {r.status for r in results} == {"accepted"}
    summary = periods_close(as_of=now)
    assert summary.closed == 2
    return orgs, seats, storage, now


def test_each_invoice_sends_one_event_per_meter_with_the_period_total(closed, stripe_on):
    orgs, seats, storage, now = closed

    assert period_summaries_record(now=now) == 4
    report = period_summaries_send(now=now)

    assert (report.sent, report.requests) == (4, 4)
    for n, org in enumerate(orgs, start=1):
        invoice = Invoice.objects.get(organisation=org)
        customer = org.stripe_customer.stripe_id
        expected = {seats: Decimal(3 * n + 2), storage: Decimal("1.25") * 4 * n}
        for meter, value in expected.items():
            identifier = summary_identifier(invoice_id=invoice.pk, meter_id=meter.pk)
            event = stripe_on.meter_events[identifier]
            assert event["payload"]["stripe_customer_id"] == customer
            assert Decimal(event["payload"]["value"]) == value
            assert event["event_name"] == f"meterline_{meter.code}"
            stamp = datetime.fromtimestamp(event["timestamp"], tz=UTC)
            assert invoice.period_start <= stamp < invoice.period_end
            line = invoice.lines.get(meter=meter)
            assert line.quantity == value  # what the invoice billed
    requests = stripe_on.calls("POST", "/v1/billing/meter_events")
    assert [r.headers["idempotency-key"] for r in requests] == [
        f"meter-event:{r.params['identifier']}" for r in requests
    ]


def test_running_again_records_and_sends_nothing_more(closed, stripe_on):
    _, _, _, now = closed
    period_summaries_record(now=now)
    period_summaries_send(now=now)

    assert period_summaries_record(now=now + timedelta(minutes=1)) == 0
    assert period_summaries_send(now=now + timedelta(minutes=1)).sent == 0
    assert PeriodSummaryEvent.objects.count() == 4
    assert len(stripe_on.calls("POST", "/v1/billing/meter_events")) == 4


def test_a_summary_sent_twice_after_a_crash_counts_once(closed, stripe_on):
    _, _, _, now = closed
    period_summaries_record(now=now)
    # Stripe stores the first event, and the answer is lost: the row stays pending.
    stripe_on.fail(status=0, apply=True, path="/v1/billing/meter_events")
    first = period_summaries_send(now=now)
    assert (first.sent, first.retried) == (0, 1)

    second = period_summaries_send(now=now + timedelta(minutes=5))

    # Same idempotency key: Stripe replays its first answer instead of storing a second event.
    assert second.sent == 4
    assert len(stripe_on.calls("POST", "/v1/billing/meter_events")) == 5
    assert len(stripe_on.meter_events) == 4
    assert set(PeriodSummaryEvent.objects.values_list("state", flat=True)) == {"sent"}


def test_without_a_key_summaries_wait_in_the_queue(closed, fake):
    _, _, _, now = closed
    assert period_summaries_record(now=now) == 4
    assert period_summaries_send(now=now).off
    assert set(PeriodSummaryEvent.objects.values_list("state", flat=True)) == {"pending"}
    assert fake.requests == []


def test_reconcile_finds_and_repairs_a_lost_summary(closed, stripe_on):
    from stripe_sync.selectors import meter_totals_compare
    from stripe_sync.services import difference_repair

    orgs, seats, _, now = closed
    period_summaries_record(now=now)
    period_summaries_send(now=now)
    invoice = Invoice.objects.get(organisation=orgs[1])
    del stripe_on.meter_events[summary_identifier(invoice_id=invoice.pk, meter_id=seats.pk)]

    (difference,) = meter_totals_compare(period=invoice.period)

    assert (difference.organisation, difference.stripe_meter.meter) == (orgs[1], seats)
    assert (difference.ours, difference.stripe) == (Decimal(8), Decimal(0))
    difference_repair(difference=difference, period=invoice.period, now=now)
    assert meter_totals_compare(period=invoice.period) == []
