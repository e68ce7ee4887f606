"""Meterline invoices, Stripe collects: the push, and what Stripe's webhooks tell us back."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import stripe
from djstripe.models import Invoice as StripeMirror
from djstripe.models import WebhookEndpoint

from accounts.tests.factories import make_organisation
from invoices.models import Invoice
from invoices.services import periods_close
from plans.tests.factories import make_plan, make_subscription
from stripe_sync.models import StripeCustomer, StripeInvoice
from stripe_sync.services import customer_ensure, invoice_push, invoices_push
from usage.models import UsageEvent
from usage.tests.factories import make_meter

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
AS_OF = datetime(2026, 2, 1, 2, tzinfo=UTC)


@pytest.fixture
def invoice(db):
    """A finalized invoice: a 49.00 base fee and 7 calls at 0.25 (1.75)."""
    org = make_organisation(name="Acme", billing_email="ap@acme.test")
    calls = make_meter("count", code="calls")
    plan = make_plan({calls: {"model": "standard", "unit_price": "0.25"}}, base_fee=Decimal("49"))
    make_subscription(org, plan, ANCHOR)
    UsageEvent.objects.bulk_create(
        UsageEvent(
            organisation=org,
            meter=calls,
            quantity=1,
            properties={},
            timestamp=ANCHOR + timedelta(days=i),
            received_at=ANCHOR + timedelta(days=i),
            idempotency_key=f"k{i}",
        )
        for i in range(7)
    )
    periods_close(as_of=AS_OF)
    invoice = Invoice.objects.get()
    assert invoice.total_minor == 5075
    return invoice


@pytest.fixture
def endpoint(db, fake):
    """dj-stripe's webhook endpoint row: its signing secret is the fake's."""
    return WebhookEndpoint.objects.create(
        id="we_fake_1",
        url="https://billing.example.com/stripe/webhook/",
        secret=fake.webhook_secret,
        enabled_events=["*"],
        status="enabled",
        livemode=False,
        api_version="2026-05-27.dahlia",
    )


def webhook(client, fake, endpoint, type_, obj, **kwargs):
    event = fake.event_create(type_, obj)
    return fake.deliver(event, client.post, f"/stripe/webhook/{endpoint.djstripe_uuid}/", **kwargs)


def test_an_invoice_is_pushed_with_one_item_per_line_and_finalized(invoice, stripe_on):
    pushed = invoice_push(invoice=invoice)

    stripe_invoice = stripe_on.invoices[pushed.stripe_id]
    assert stripe_invoice["status"] == "open"
    assert stripe_invoice["total"] == invoice.total_minor == 5075
    (create,) = stripe_on.calls("POST", "/v1/invoices")[:1]
    assert create.params["customer"] == invoice.organisation.stripe_customer.stripe_id
    assert create.params["collection_method"] == "send_invoice"
    assert create.params["metadata"] == {
        "meterline_invoice_id": str(invoice.pk),
        "number": invoice.number,
    }
    assert create.headers["idempotency-key"] == f"meterline-invoice:{invoice.pk}"
    items = stripe_on.calls("POST", "/v1/invoiceitems")
    lines = list(invoice.lines.order_by("position"))
    assert [(i.params["amount"], i.params["description"]) for i in items] == [
        (str(line.amount_minor), line.description) for line in lines
    ]
    assert [i.headers["idempotency-key"] for i in items] == [
        f"meterline-invoice-line:{line.pk}" for line in lines
    ]
    assert items[0].params["period"] == {
        "start": str(int(invoice.period_start.timestamp())),
        "end": str(int(invoice.period_end.timestamp())),
    }
    assert pushed.stripe_status == "open" and pushed.finalized_at is not None


def test_a_push_that_died_half_way_finishes_without_duplicates(invoice, stripe_on):
    # The finalize call never answers: the first push dies after the items went in.
    stripe_on.fail(status=0, path="/v1/invoices/", body_contains="auto_advance")
    with pytest.raises(stripe.APIConnectionError):
        invoice_push(invoice=invoice)
    assert StripeInvoice.objects.get().finalized_at is None

    pushed = invoice_push(invoice=invoice)

    assert len(stripe_on.invoices) == 1
    assert len(stripe_on.invoice_items) == invoice.lines.count()
    assert stripe_on.invoices[pushed.stripe_id]["total"] == 5075
    assert pushed.finalized_at is not None
    assert invoice_push(invoice=invoice).stripe_id == pushed.stripe_id  # done: no more calls


def test_invoices_are_pushed_by_the_schedule_only_when_configured(invoice, stripe_on, settings):
    assert invoices_push() == (0, [])
    settings.STRIPE_PUSH_INVOICES = True
    assert invoices_push() == (1, [])
    assert invoices_push() == (0, [])
    assert len(stripe_on.invoices) == 1


def test_invoice_paid_marks_ours_paid_once(invoice, stripe_on, endpoint, client):
    pushed = invoice_push(invoice=invoice)
    paid = stripe_on.pay(pushed.stripe_id)

    response = webhook(client, stripe_on, endpoint, "invoice.paid", paid)
    assert response.status_code == 200, response.content
    invoice.refresh_from_db()
    assert invoice.status == "paid"
    pushed.refresh_from_db()
    assert pushed.stripe_status == "paid" and pushed.paid_at is not None
    # dj-stripe mirrored the invoice it re-fetched from the (fake) API.
    assert StripeMirror.objects.get(id=pushed.stripe_id).stripe_data["status"] == "paid"

    # Stripe delivers the same event again, and a second event for the same payment.
    again = webhook(client, stripe_on, endpoint, "invoice.paid", paid)
    assert again.status_code == 200
    invoice.refresh_from_db()
    assert invoice.status == "paid"


def test_invoice_payment_failed_is_recorded_idempotently(invoice, stripe_on, endpoint, client):
    pushed = invoice_push(invoice=invoice)
    failed = dict(
        stripe_on.invoices[pushed.stripe_id],
        attempt_count=1,
        next_payment_attempt=int(AS_OF.timestamp()) + 86400,
    )
    event = stripe_on.event_create("invoice.payment_failed", failed)
    path = f"/stripe/webhook/{endpoint.djstripe_uuid}/"
    assert stripe_on.deliver(event, client.post, path).status_code == 200
    assert stripe_on.deliver(event, client.post, path).status_code == 200  # redelivered

    pushed.refresh_from_db()
    assert pushed.payment_failures == 1
    assert pushed.last_payment_error.startswith("Payment attempt 1 failed; Stripe retries at")
    invoice.refresh_from_db()
    assert invoice.status == "finalized"


def test_a_webhook_with_a_bad_signature_is_refused(invoice, stripe_on, endpoint, client):
    pushed = invoice_push(invoice=invoice)
    paid = stripe_on.pay(pushed.stripe_id)

    response = webhook(client, stripe_on, endpoint, "invoice.paid", paid, secret="whsec_wrong")

    assert response.status_code == 400
    invoice.refresh_from_db()
    assert invoice.status == "finalized"


def test_customer_events_keep_the_link_current(stripe_on, endpoint, client, db):
    org = make_organisation(name="Acme")
    link = customer_ensure(organisation=org)
    customer = stripe_on.customers[link.stripe_id]
    customer.update(email="new@acme.test", name="Acme Inc")

    assert webhook(client, stripe_on, endpoint, "customer.updated", customer).status_code == 200
    link.refresh_from_db()
    assert (link.email, link.name) == ("new@acme.test", "Acme Inc")

    del stripe_on.customers[link.stripe_id]  # deleted in Stripe's dashboard
    assert webhook(client, stripe_on, endpoint, "customer.deleted", customer).status_code == 200
    assert not StripeCustomer.objects.filter(organisation=org).exists()

    # Created in the dashboard for one of our organisations: linked.
    other = make_organisation()
    made = dict(
        customer, id="cus_dashboard1", metadata={"meterline_organisation_id": str(other.pk)}
    )
    stripe_on.customers["cus_dashboard1"] = made
    assert webhook(client, stripe_on, endpoint, "customer.created", made).status_code == 200
    assert StripeCustomer.objects.get(organisation=other).stripe_id == "cus_dashboard1"


def test_a_push_resumed_after_stripe_forgot_its_idempotency_keys_adds_only_missing_lines(
    invoice, stripe_on
):
    # The push died after the first line went in; a day later Stripe no longer replays keys.
    second = invoice.lines.order_by("position")[1]
    stripe_on.fail(
        status=0, path="/v1/invoiceitems", body_contains=f"[meterline_invoice_line_id]={second.pk}"
    )
    with pytest.raises(stripe.APIConnectionError):
        invoice_push(invoice=invoice)
    stripe_on._idempotent.clear()

    pushed = invoice_push(invoice=invoice)

    assert len(stripe_on.invoices) == 1
    lines = stripe_on.invoices[pushed.stripe_id]["lines"]["data"]
    assert sorted(line["metadata"]["meterline_invoice_line_id"] for line in lines) == sorted(
        str(pk) for pk in invoice.lines.values_list("pk", flat=True)
    )
    assert stripe_on.invoices[pushed.stripe_id]["total"] == 5075
    assert stripe_on.invoices[pushed.stripe_id]["status"] == "open"


def test_invoice_paid_finds_an_invoice_whose_stripe_id_was_never_stored(
    invoice, stripe_on, endpoint, client
):
    pushed = invoice_push(invoice=invoice)
    StripeInvoice.objects.filter(pk=pushed.pk).update(stripe_id=None)  # as if lost in a crash

    paid = stripe_on.pay(pushed.stripe_id)
    assert webhook(client, stripe_on, endpoint, "invoice.paid", paid).status_code == 200

    invoice.refresh_from_db()
    assert invoice.status == "paid"
    assert StripeInvoice.objects.get().stripe_id == pushed.stripe_id
