from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from accounts.tests.factories import make_organisation
from core.periods import Period
from invoices.models import InvoiceDocument
from invoices.services import period_close
from plans.tests.factories import make_plan, make_subscription

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.django_db
def test_staff_read_an_invoice_as_html_and_pdf(admin_client):
    org = make_organisation(name="Wayne Enterprises")
    subscription = make_subscription(org, make_plan(base_fee=Decimal("12.5")), ANCHOR)
    period = Period(ANCHOR, datetime(2026, 2, 1, tzinfo=UTC))
    invoice, _ = period_close(
        subscription=subscription, period=period, as_of=period.end + timedelta(hours=1)
    )

    page = admin_client.get(f"/admin/invoices/invoice/{invoice.pk}/change/")
    assert page.status_code == 200
    html = admin_client.get(f"/admin/invoices/invoice/{invoice.pk}/html/")
    assert b"INV-2026-000001" in html.content and b"Wayne Enterprises" in html.content
    pdf = admin_client.get(f"/admin/invoices/invoice/{invoice.pk}/pdf/")
    assert pdf["Content-Type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    assert bytes(InvoiceDocument.objects.get(invoice=invoice).pdf) == pdf.content
    # Finalized invoices cannot be deleted or added by hand.
    assert (
        admin_client.post(
            f"/admin/invoices/invoice/{invoice.pk}/delete/", {"post": "yes"}
        ).status_code
        == 403
    )


@pytest.mark.django_db
def test_staff_preview_the_upcoming_invoice_as_a_draft(admin_client):
    from django.utils import timezone

    org = make_organisation(name="Stark Industries")
    subscription = make_subscription(
        org, make_plan(base_fee=Decimal("7")), timezone.now() - timedelta(days=3)
    )
    response = admin_client.get(f"/admin/invoices/invoice/upcoming/{subscription.pk}/")
    assert response.status_code == 200
    assert b"DRAFT" in response.content and b"Stark Industries" in response.content
    assert b"$7.00" in response.content
