"""stripe_reconcile: our totals against Stripe's meter event summaries, and the repair."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from core.periods import Period
from stripe_sync.management.commands.stripe_reconcile import parse_period
from stripe_sync.models import OutboxEvent
from stripe_sync.services import outbox_flush


def reconcile(*args):
    out = StringIO()
    call_command("stripe_reconcile", *args, stdout=out)
    return out.getvalue()


@pytest.fixture
def synced(streamed, stripe_on):
    """Six events of 2.5 over the last days, all delivered; the period covers them."""
    now = datetime.now(UTC).replace(microsecond=0)
    for day in range(6):
        streamed(1, quantity="2.5", at=now - timedelta(days=day + 1))
    assert outbox_flush().sent == 6
    start = (now - timedelta(days=10)).replace(minute=0, second=0)
    return streamed, f"{start.isoformat()}/{(start + timedelta(days=10)).isoformat()}"


def test_nothing_to_report_when_stripe_agrees(synced):
    _, period = synced
    assert reconcile("--period", period).splitlines()[0].endswith(": 0 difference(s)")


def test_a_missing_event_is_found_and_repaired_once(synced, stripe_on):
    ingest, period = synced
    lost = OutboxEvent.objects.order_by("id")[2]
    del stripe_on.meter_events[lost.identifier]  # Stripe dropped it after taking the batch

    found = reconcile("--period", period)

    lines = found.splitlines()
    assert lines[0].endswith(": 1 difference(s)")
    customer = ingest.organisation.stripe_customer.stripe_id
    assert lines[1].split("\t") == [
        ingest.organisation.slug,
        customer,
        "tokens",
        "ours 15",
        "stripe 12.5",
        "missing 2.5",
    ]
    assert stripe_on.calls("POST", "/v1/billing/meter_events") == []  # listing sends nothing

    repaired = reconcile("--period", period, "--resend")
    assert "resent 2.5 as meterline-fix-" in repaired
    (fix,) = stripe_on.calls("POST", "/v1/billing/meter_events")
    assert fix.params["payload"] == {"stripe_customer_id": customer, "value": "2.5"}
    assert Period(*[datetime.fromisoformat(p) for p in period.split("/")]).start <= (
        datetime.fromtimestamp(int(fix.params["timestamp"]), tz=UTC)
    )
    assert stripe_on.meter_total(meter_event_name="meterline_tokens", customer=customer) == (
        Decimal("15")
    )
    assert reconcile("--period", period, "--resend").splitlines()[0].endswith(": 0 difference(s)")


def test_stripe_counting_more_is_listed_but_not_resent(synced, stripe_on):
    _, period = synced
    extra = dict(next(iter(stripe_on.meter_events.values())), identifier="someone-else")
    stripe_on.meter_events["someone-else"] = extra

    out = reconcile("--period", period, "--resend")

    assert "missing -2.5" in out
    assert "not resent: Stripe counts more than we do" in out
    assert stripe_on.calls("POST", "/v1/billing/meter_events") == []


def test_periods_are_a_month_or_two_instants():
    assert parse_period("2026-12") == Period(
        datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    )
    assert parse_period("2026-01-05T00:00/2026-02-05T00:00") == Period(
        datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 2, 5, tzinfo=UTC)
    )
    with pytest.raises(CommandError):
        parse_period("January")


@pytest.mark.django_db
def test_reconcile_needs_stripe():
    with pytest.raises(CommandError, match="Stripe is off"):
        call_command("stripe_reconcile", "--period", "2026-01")
