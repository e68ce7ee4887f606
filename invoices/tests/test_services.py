from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.tests.factories import make_organisation
from core.periods import Period
from invoices.models import BillingPeriod, Invoice, InvoiceLine
from invoices.services import (
    credit_note_issue,
    invoice_preview,
    period_close,
    periods_close,
    periods_due,
)
from plans.models import CreditLedgerEntry
from plans.selectors import credit_balance
from plans.services import credit_grant_create
from plans.tests.factories import make_plan, make_subscription
from usage.models import UsageEvent
from usage.tests.factories import make_meter

ANCHOR = datetime(2026, 1, 31, tzinfo=UTC)
JAN = Period(ANCHOR, datetime(2026, 2, 28, tzinfo=UTC))
FEB = Period(datetime(2026, 2, 28, tzinfo=UTC), datetime(2026, 3, 31, tzinfo=UTC))
MAR = Period(datetime(2026, 3, 31, tzinfo=UTC), datetime(2026, 4, 30, tzinfo=UTC))
_keys = iter(range(10**9))


def store(org, meter, at, quantity="1", received=None):
    UsageEvent.objects.create(
        organisation=org,
        meter=meter,
        quantity=Decimal(quantity),
        properties={},
        timestamp=at,
        received_at=received or at,
        idempotency_key=f"k{next(_keys)}",
    )


@pytest.fixture
def billing(db):
    """An organisation on a plan: 49 base fee, API calls graduated (first 2 free, then 0.5)."""
    org = make_organisation(billing_email="ap@example.com")
    calls = make_meter("count", code="calls")
    plan = make_plan(
        {
            calls: {
                "model": "graduated",
                "tiers": [{"up_to": "2", "unit_price": "0"}, {"up_to": None, "unit_price": "0.5"}],
            }
        },
        base_fee=Decimal("49"),
        name="Growth",
    )
    return org, calls, make_subscription(org, plan, ANCHOR)


def test_close_bills_the_half_open_period_once_with_a_gapless_number(billing):
    org, calls, subscription = billing
    for n in range(5):
        store(org, calls, JAN.start + timedelta(days=n))
    store(org, calls, JAN.end)  # belongs to February
    as_of = JAN.end + timedelta(hours=2)
    invoice, created = period_close(subscription=subscription, period=JAN, as_of=as_of)
    assert created
    assert invoice.number == "INV-2026-000001"
    assert invoice.status == "finalized"
    lines = list(invoice.lines.order_by("position"))
    assert [(line.kind, line.amount_minor) for line in lines] == [
        ("base_fee", 4900),
        ("usage", 150),
    ]
    assert lines[1].quantity == 5
    assert lines[1].breakdown["slices"][1]["units"] == "3"
    assert (invoice.subtotal_minor, invoice.credits_minor, invoice.total_minor) == (5050, 0, 5050)
    assert invoice.due_at == as_of + timedelta(days=30)

    again, created_again = period_close(
        subscription=subscription, period=JAN, as_of=as_of + timedelta(days=1)
    )
    assert (again.pk, created_again) == (invoice.pk, False)
    feb, _ = period_close(subscription=subscription, period=FEB, as_of=FEB.end + timedelta(hours=2))
    assert feb.number == "INV-2026-000002"


def test_the_database_allows_one_invoice_per_billing_period(billing):
    org, _, subscription = billing
    invoice, _ = period_close(
        subscription=subscription, period=JAN, as_of=JAN.end + timedelta(hours=2)
    )
    with pytest.raises(IntegrityError), transaction.atomic():
        Invoice.objects.create(
            organisation=org,
            subscription=subscription,
            billing_period=invoice.billing_period,
            period_start=JAN.start,
            period_end=JAN.end,
            currency="USD",
            cutoff=JAN.end,
        )


def test_events_in_the_grace_window_count_and_later_ones_become_adjustments(billing):
    org, calls, subscription = billing
    for n in range(3):
        store(org, calls, JAN.start + timedelta(days=n))
    # Arrives 30 minutes after the period's end, inside the grace window: billed in January.
    store(org, calls, JAN.end - timedelta(minutes=1), received=JAN.end + timedelta(minutes=30))
    jan, _ = period_close(subscription=subscription, period=JAN, as_of=JAN.end + timedelta(hours=1))
    assert jan.lines.get(kind="usage").quantity == 4
    # Two more January events arrive after January's invoice: re-rated with the tiers, they add
    # 2 x 0.5 to February's invoice, naming January.
    store(org, calls, JAN.start + timedelta(days=10), received=JAN.end + timedelta(days=3))
    store(org, calls, JAN.start + timedelta(days=11), received=JAN.end + timedelta(days=4))
    store(org, calls, FEB.start + timedelta(days=1))
    feb, _ = period_close(subscription=subscription, period=FEB, as_of=FEB.end + timedelta(hours=1))
    adjustment = feb.lines.get(kind="adjustment")
    assert (adjustment.amount_minor, adjustment.quantity) == (100, 2)
    assert "2026-01-31 to 2026-02-28" in adjustment.description
    assert (adjustment.usage_start, adjustment.usage_end) == (JAN.start, JAN.end)
    assert feb.lines.get(kind="usage").amount_minor == 0  # February's own single call is free
    # Nothing new: March carries no second adjustment for January.
    mar, _ = period_close(subscription=subscription, period=MAR, as_of=MAR.end + timedelta(hours=1))
    assert not mar.lines.filter(kind="adjustment").exists()


def test_a_rerun_after_a_crash_gives_the_same_amounts(billing):
    org, calls, subscription = billing
    for n in range(7):
        store(org, calls, JAN.start + timedelta(hours=n))
    as_of = JAN.end + timedelta(hours=1)

    class CrashError(Exception):
        pass

    with pytest.raises(CrashError), transaction.atomic():
        period_close(subscription=subscription, period=JAN, as_of=as_of)
        raise CrashError  # the process dies before commit
    assert not Invoice.objects.exists()
    assert not BillingPeriod.objects.exists()
    # An event arriving after the intended close time does not change the re-run's figures.
    store(org, calls, JAN.start, received=as_of + timedelta(minutes=5))
    invoice, _ = period_close(subscription=subscription, period=JAN, as_of=as_of)
    assert invoice.number == "INV-2026-000001"  # the crashed run's number was given back
    assert invoice.total_minor == 4900 + 250


def test_credits_apply_by_priority_then_expiry_and_carry_forward(billing):
    org, _, subscription = billing
    promo = credit_grant_create(
        organisation=org,
        amount_minor=3000,
        currency="USD",
        priority=1,
        effective_from=ANCHOR,
        expires_at=datetime(2026, 3, 15, tzinfo=UTC),
        description="Launch promo",
    )
    paid = credit_grant_create(
        organisation=org,
        amount_minor=6000,
        currency="USD",
        category="paid",
        priority=5,
        effective_from=ANCHOR,
        description="Prepaid",
    )
    jan, _ = period_close(subscription=subscription, period=JAN, as_of=JAN.end + timedelta(hours=1))
    credits = list(jan.lines.filter(kind="credit").order_by("position"))
    assert [(line.description, line.amount_minor) for line in credits] == [
        ("Credit applied: Launch promo", -3000),
        ("Credit applied: Prepaid", -1900),
    ]
    assert (jan.subtotal_minor, jan.credits_minor, jan.total_minor) == (4900, 4900, 0)
    # February: the promo is spent; the prepaid grant carries forward 4100 and covers most.
    feb, _ = period_close(subscription=subscription, period=FEB, as_of=FEB.end + timedelta(hours=1))
    assert (feb.credits_minor, feb.total_minor) == (4100, 800)
    assert credit_balance(organisation=org, currency="USD", at=FEB.end + timedelta(days=1)) == 0
    mar, _ = period_close(subscription=subscription, period=MAR, as_of=MAR.end + timedelta(hours=1))
    assert (mar.credits_minor, mar.total_minor) == (0, 4900)
    ledger = CreditLedgerEntry.objects.filter(grant=paid).order_by("id")
    assert [(e.kind, e.amount_minor, e.reference) for e in ledger] == [
        ("grant", 6000, ""),
        ("apply", -1900, jan.number),
        ("apply", -4100, feb.number),
    ]
    assert promo.entries.filter(kind="expire").count() == 0  # used up before it expired


def test_unused_credit_expires_into_the_ledger(billing):
    org, _, subscription = billing
    grant = credit_grant_create(
        organisation=org,
        amount_minor=100_000,
        currency="USD",
        effective_from=ANCHOR,
        expires_at=datetime(2026, 3, 1, tzinfo=UTC),
    )
    jan, _ = period_close(subscription=subscription, period=JAN, as_of=JAN.end + timedelta(hours=1))
    assert jan.total_minor == 0  # a grant larger than the invoice
    assert (
        credit_balance(organisation=org, currency="USD", at=datetime(2026, 2, 28, 12, tzinfo=UTC))
        == 95_100
    )
    feb, _ = period_close(subscription=subscription, period=FEB, as_of=FEB.end + timedelta(hours=1))
    assert feb.credits_minor == 0
    expiry = grant.entries.get(kind="expire")
    assert (expiry.amount_minor, expiry.at) == (-95_100, grant.expires_at)
    assert credit_balance(organisation=org, currency="USD", at=FEB.end) == 0


def test_a_grant_in_another_currency_is_refused(billing):
    org, _, _ = billing
    with pytest.raises(ValidationError):
        credit_grant_create(organisation=org, amount_minor=100, currency="EUR")


def test_periods_due_waits_for_the_grace_window_and_skips_invoiced_periods(billing):
    _, _, subscription = billing
    assert periods_due(as_of=JAN.end + timedelta(minutes=59)) == []
    assert periods_due(as_of=JAN.end + timedelta(hours=1)) == [(subscription, JAN)]
    summary = periods_close(as_of=FEB.end + timedelta(hours=1))
    assert (summary.closed, summary.invoices) == (2, ["INV-2026-000001", "INV-2026-000002"])
    assert periods_due(as_of=FEB.end + timedelta(hours=1)) == []
    assert periods_close(as_of=FEB.end + timedelta(days=1)).closed == 0


def test_preview_is_the_current_period_as_a_draft(billing):
    org, calls, subscription = billing
    for n in range(4):
        store(org, calls, FEB.start + timedelta(hours=n))
    credit_grant_create(organisation=org, amount_minor=1000, currency="USD", effective_from=ANCHOR)
    draft = invoice_preview(subscription=subscription, at=FEB.start + timedelta(days=3))
    assert draft.period == FEB
    assert [(line.kind, line.amount_minor) for line in draft.lines] == [
        ("base_fee", 4900),
        ("usage", 100),
        ("credit", -1000),
    ]
    assert (draft.subtotal_minor, draft.total_minor) == (5000, 4000)
    assert not Invoice.objects.exists()
    assert CreditLedgerEntry.objects.filter(kind="apply").count() == 0


def test_finalized_invoices_never_change_corrections_are_credit_notes(billing):
    _, _, subscription = billing
    invoice, _ = period_close(
        subscription=subscription, period=JAN, as_of=JAN.end + timedelta(hours=1)
    )
    line = invoice.lines.first()
    line.amount_minor = 1
    with pytest.raises(ValueError, match="never changed"):
        line.save()
    note = credit_note_issue(invoice=invoice, amount_minor=900, reason="Goodwill")
    assert note.number.startswith("CN-") and note.number.endswith("-000001")
    with pytest.raises(ValueError):
        credit_note_issue(invoice=invoice, amount_minor=invoice.total_minor, reason="too much")
    invoice.refresh_from_db()
    assert invoice.total_minor == 4900


def test_subscription_start_and_end_clip_the_periods(db):
    org = make_organisation()
    plan = make_plan(base_fee=Decimal("10"))
    subscription = make_subscription(org, plan, datetime(2026, 2, 10, tzinfo=UTC))
    subscription.anchor = ANCHOR
    subscription.end = datetime(2026, 3, 20, tzinfo=UTC)
    subscription.save()
    due = [period for _, period in periods_due(as_of=datetime(2026, 6, 1, tzinfo=UTC))]
    assert due == [
        Period(datetime(2026, 2, 10, tzinfo=UTC), FEB.start),
        Period(FEB.start, datetime(2026, 3, 20, tzinfo=UTC)),
    ]
    assert InvoiceLine.objects.count() == 0


def test_periods_in_zones_on_both_sides_of_utc_keep_local_midnight(db):
    from zoneinfo import ZoneInfo

    calls = make_meter("count")
    plan = make_plan({calls: {"model": "standard", "unit_price": "1"}})
    for zone in ("America/Los_Angeles", "Pacific/Auckland"):
        tz = ZoneInfo(zone)
        org = make_organisation(timezone_name=zone)
        subscription = make_subscription(org, plan, datetime(2026, 3, 1, tzinfo=tz))
        march_end = datetime(2026, 4, 1, tzinfo=tz)  # after DST changes in both zones
        store(org, calls, march_end - timedelta(microseconds=1))
        store(org, calls, march_end)  # April's
        invoice, _ = period_close(
            subscription=subscription,
            period=Period(datetime(2026, 3, 1, tzinfo=tz), march_end),
            as_of=march_end + timedelta(hours=1),
        )
        assert invoice.period_end.astimezone(tz).hour == 0
        assert invoice.lines.get(kind="usage").quantity == 1


def test_a_finalized_invoice_refuses_changes_but_can_be_marked_paid(billing):
    _, _, subscription = billing
    invoice, _ = period_close(
        subscription=subscription, period=JAN, as_of=JAN.end + timedelta(hours=1)
    )
    stored = Invoice.objects.get(pk=invoice.pk)
    stored.total_minor = 1
    with pytest.raises(ValueError, match="never changes"):
        stored.save()
    stored = Invoice.objects.get(pk=invoice.pk)
    stored.status = Invoice.Status.PAID
    stored.save(update_fields=["status"])
    assert Invoice.objects.get(pk=invoice.pk).status == "paid"


def test_the_batch_close_bills_what_the_single_close_bills(db):
    """periods_close reads usage for a whole batch at once; its lines must equal the one-by-one
    draft's for every aggregation and price model, with overrides and credits."""
    meters = {
        "count": make_meter("count"),
        "sum": make_meter("sum", property="v"),
        "max": make_meter("max", property="v"),
        "unique": make_meter("unique_count", property="user"),
        "latest": make_meter("latest", property="v"),
        "level": make_meter("weighted_sum", property="v"),
        "payments": make_meter("sum", property="v", filters={"kind": ["card"]}),
    }
    tiers = {
        "model": "graduated",
        "tiers": [
            {"up_to": "3", "unit_price": "0.7", "flat_fee": "1"},
            {"up_to": None, "unit_price": "0.3"},
        ],
    }
    plan = make_plan(
        {
            meters["count"]: tiers,
            meters["sum"]: {"model": "standard", "unit_price": "0.000123"},
            meters["max"]: {
                "model": "volume",
                "tiers": [{"up_to": "5", "unit_price": "2"}, {"up_to": None, "unit_price": "1"}],
            },
            meters["unique"]: {"model": "package", "package_size": "2", "package_price": "3"},
            meters["latest"]: {"model": "standard", "unit_price": "4", "minimum_amount": "50"},
            meters["level"]: {"model": "standard", "unit_price": "0.1"},
            meters["payments"]: {
                "model": "percentage",
                "rate_percent": "2.9",
                "fixed_fee_per_event": "0.3",
                "free_events": 1,
            },
        },
        base_fee=Decimal("9.99"),
    )
    subscriptions = []
    for n in range(6):
        org = make_organisation()
        subscription = make_subscription(org, plan, ANCHOR)
        subscriptions.append(subscription)
        for i in range(n * 3):
            at = JAN.start + timedelta(hours=7 * i + n)
            value = str(Decimal(i * 37 % 11) + Decimal("0.25"))
            UsageEvent.objects.create(
                organisation=org,
                meter=meters[list(meters)[i % len(meters)]],
                quantity=Decimal(value),
                properties={"v": value, "user": f"u{i % 4}", "kind": "card" if i % 3 else "cash"},
                timestamp=at,
                received_at=at,
                idempotency_key=f"{n}-{i}",
            )
    from plans.services import price_set

    price_set(
        subscription=subscriptions[2],
        meter=meters["count"],
        spec={"model": "standard", "unit_price": "5"},
        effective_from=ANCHOR,
    )
    credit_grant_create(
        organisation=subscriptions[3].organisation,
        amount_minor=1234,
        currency="USD",
        effective_from=ANCHOR,
    )

    from invoices.services import close_cutoff, invoice_draft

    as_of = JAN.end + timedelta(hours=2)
    expected = {
        s.pk: [
            (line.kind, line.description, line.amount_exact, line.amount_minor)
            for line in invoice_draft(subscription=s, period=JAN, cutoff=close_cutoff(as_of)).lines
        ]
        for s in subscriptions
    }
    summary = periods_close(as_of=as_of, batch_size=4)
    assert summary.closed == 6
    for subscription in subscriptions:
        invoice = Invoice.objects.get(subscription=subscription)
        lines = [
            (line.kind, line.description, line.amount_exact, line.amount_minor)
            for line in invoice.lines.order_by("position")
        ]
        non_credit = [line for line in lines if line[0] != "credit"]
        assert non_credit == expected[subscription.pk]
        assert invoice.total_minor == sum(line[3] for line in lines)
    assert Invoice.objects.get(subscription=subscriptions[3]).credits_minor > 0
