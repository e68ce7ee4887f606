"""Invoice documents: real invoices rendered by WeasyPrint, read back with pypdf, and emailed."""

from __future__ import annotations

import email
import email.policy
import io
import shutil
import subprocess
from datetime import datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.core import mail
from pypdf import PdfReader

from accounts.tests.factories import make_organisation
from core.money import to_minor_units
from invoices import documents
from invoices.documents import (
    invoice_context,
    invoice_document_create,
    invoice_render_html,
    invoice_render_pdf,
)
from invoices.models import BillingPeriod, Invoice, InvoiceDocument, InvoiceLine
from plans.pricing import quote_document
from plans.tests.factories import make_plan, make_subscription
from usage.tests.factories import make_meter

pytestmark = pytest.mark.django_db

DASH = "\u2013"  # between the days of a period
TIMES = "\u00d7"  # units x unit price

API_TIERS = {
    "model": "graduated",
    "tiers": [
        {"up_to": "1000000", "unit_price": "0"},
        {"up_to": "5000000", "unit_price": "0.00002"},
        {"up_to": None, "unit_price": "0.00001", "flat_fee": "10"},
    ],
}


@pytest.fixture(autouse=True)
def _seller(settings):
    settings.SELLER_NAME = "Meterline Demo Ltd"
    settings.SELLER_ADDRESS = "1 Example Street, Springfield"
    settings.SELLER_EMAIL = "billing@meterline.test"
    settings.DEFAULT_FROM_EMAIL = "Meterline <invoices@meterline.test>"


# --- Building invoices ----------------------------------------------------------------------------


def _local(zone: str, year: int, month: int, day: int) -> datetime:
    return datetime(year, month, day, tzinfo=ZoneInfo(zone))


def _usage(
    description: str,
    spec: dict[str, Any],
    quantity: str,
    unit: str,
    currency: str,
    **fields: Any,
) -> dict[str, Any]:
    """A usage line priced by the real engine, rounded once as finalization does."""
    quote = quote_document(spec, Decimal(quantity))
    return {
        "kind": InvoiceLine.Kind.USAGE,
        "description": description,
        "quantity": Decimal(quantity),
        "unit": unit,
        "amount_exact": quote.amount,
        "amount_minor": to_minor_units(quote.amount, currency),
        "breakdown": quote.to_json(),
        **fields,
    }


def _fixed(kind: str, description: str, amount: str, currency: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "description": description,
        "quantity": Decimal(1),
        "amount_exact": Decimal(amount),
        "amount_minor": to_minor_units(Decimal(amount), currency),
    }


def _make_invoice(
    lines: list[dict[str, Any]],
    *,
    currency: str = "USD",
    zone: str = "Europe/Berlin",
    name: str = "Acme Rockets GmbH",
    billing_email: str = "accounts@acme.test",
    number: str = "INV-2026-000001",
    month: int = 10,
) -> Invoice:
    organisation = make_organisation(
        name=name, currency=currency, timezone_name=zone, billing_email=billing_email
    )
    meter = make_meter("count")
    plan = make_plan(
        prices={meter: {"model": "standard", "unit_price": "0.001"}}, currency=currency
    )
    start = _local(zone, 2026, month, 1)
    end = _local(zone, 2026 + month // 12, month % 12 + 1, 1)
    subscription = make_subscription(organisation, plan, start=_local(zone, 2026, 1, 1))
    period = BillingPeriod.objects.create(subscription=subscription, start=start, end=end)
    subtotal = sum(line["amount_minor"] for line in lines if line["kind"] != "credit")
    credits = sum(abs(line["amount_minor"]) for line in lines if line["kind"] == "credit")
    invoice = Invoice.objects.create(
        organisation=organisation,
        subscription=subscription,
        billing_period=period,
        period_start=start,
        period_end=end,
        currency=currency,
        status=Invoice.Status.FINALIZED,
        number=number,
        cutoff=end + timedelta(hours=1),
        issued_at=end + timedelta(hours=2),
        due_at=end + timedelta(days=14, hours=2),
        subtotal_minor=subtotal,
        credits_minor=credits,
        total_minor=subtotal - credits,
    )
    for position, line in enumerate(lines, start=1):
        InvoiceLine.objects.create(
            invoice=invoice,
            position=position,
            meter=meter if line["kind"] in ("usage", "adjustment") else None,
            usage_start=line.pop("usage_start", start),
            usage_end=line.pop("usage_end", end),
            **line,
        )
    return invoice


def _usd_lines() -> list[dict[str, Any]]:
    """A month of a realistic USD invoice: $49 + $102.50 + $25.56 + $50 + $11 - $20."""
    september = (_local("Europe/Berlin", 2026, 9, 1), _local("Europe/Berlin", 2026, 10, 1))
    late = quote_document(API_TIERS, Decimal(5_100_000))
    return [
        _fixed("base_fee", "Growth plan, monthly fee", "49", "USD"),
        _usage("API requests", API_TIERS, "6250000", "requests", "USD"),
        _usage(
            "Object storage",
            {"model": "standard", "unit_price": "0.023", "discount_percent": "10"},
            "1234.5678",
            "GB-months",
            "USD",
        ),
        _usage(
            "AI tokens",
            {"model": "standard", "unit_price": "0.00002", "minimum_amount": "50"},
            "1000000",
            "tokens",
            "USD",
        ),
        {
            "kind": InvoiceLine.Kind.ADJUSTMENT,
            "description": "API requests, late usage for September",
            "quantity": Decimal(100_000),
            "unit": "requests",
            "amount_exact": Decimal(11),
            "amount_minor": 1100,
            "breakdown": {"rerated": late.to_json(), "billed": "80"},
            "usage_start": september[0],
            "usage_end": september[1],
        },
        {**_fixed("credit", "Promotional credit", "-20", "USD"), "quantity": Decimal(0)},
    ]


def _pdf_text(pdf: bytes) -> tuple[int, str]:
    reader = PdfReader(io.BytesIO(pdf))
    text = "\n".join(page.extract_text() for page in reader.pages)
    return len(reader.pages), _squash(text)


def _squash(text: str) -> str:
    """One space between words: table cells and no-break spaces read back as any whitespace."""
    return " ".join(text.replace("\u00a0", " ").split())


# --- The data -------------------------------------------------------------------------------------


def test_context_shows_the_period_in_local_days_and_explains_each_line():
    invoice = _make_invoice(_usd_lines())

    context = invoice_context(invoice)

    # Half-open [1 Oct, 1 Nov) in Berlin, across the end of summer time: 1 to 31 October.
    assert context["period"]["text"] == f"1 Oct 2026 {DASH} 31 Oct 2026"
    assert context["issued"] == "1 Nov 2026"
    assert context["due"] == "15 Nov 2026"
    lines = {line["description"]: line for line in context["lines"]}
    api = lines["API requests"]
    assert api["quantity"] == "6,250,000"
    assert api["details"] == [
        f"Tier 1 (0 to 1000000): 1,000,000 requests {TIMES} $0.00 = $0.00",
        f"Tier 2 (1000000 to 5000000): 4,000,000 requests {TIMES} $0.00002 = $80.00",
        f"Tier 3 (above 5000000): 1,250,000 requests {TIMES} $0.00001 + $10.00 flat fee = $22.50",
    ]
    assert lines["Object storage"]["details"] == [
        f"1,234.5678 GB-months {TIMES} $0.023 = $28.3950594",
        "Usage amount: $28.3950594",
        "Discount: -$2.83950594",
    ]
    assert "Minimum commitment true-up: +$30.00" in lines["AI tokens"]["details"]
    adjustment = lines["API requests, late usage for September"]["details"]
    assert adjustment[0] == (
        f"Usage for the earlier period 1 Sep 2026 {DASH} 30 Sep 2026, received after it was invoiced"
    )
    assert (
        adjustment[-1]
        == "Re-rated amount $91.00, less $80.00 already billed for that period = $11.00"
    )
    assert lines["Promotional credit"]["amount"] == "-$20.00"
    assert (context["subtotal"], context["credits"], context["total"]) == (
        "$238.06",
        "-$20.00",
        "$218.06",
    )


# --- The PDF --------------------------------------------------------------------------------------


def test_pdf_shows_number_customer_lines_amounts_totals_and_page_numbers():
    invoice = _make_invoice(_usd_lines())

    pages, text = _pdf_text(invoice_render_pdf(invoice))

    assert pages == 1
    for expected in [
        "INV-2026-000001",
        "Acme Rockets GmbH",
        "accounts@acme.test",
        "Meterline Demo Ltd",
        f"1 Oct 2026 {DASH} 31 Oct 2026",
        "Growth plan, monthly fee",
        "$49.00",
        "API requests",
        "6,250,000 requests",
        "$102.50",
        f"Tier 3 (above 5000000): 1,250,000 requests {TIMES} $0.00001 + $10.00 flat fee = $22.50",
        "Object storage",
        "$25.56",
        "AI tokens",
        "$50.00",
        "Minimum commitment true-up: +$30.00",
        "API requests, late usage for September",
        "$11.00",
        f"1 Sep 2026 {DASH} 30 Sep 2026",
        "Promotional credit",
        "-$20.00",
        "Subtotal $238.06",
        "Credits -$20.00",
        "Total $218.06",
        "Due 15 Nov 2026",
        "Page 1 of 1",
    ]:
        assert expected in text, expected


def test_pdf_numbers_every_page_of_a_long_invoice():
    lines = [
        _usage(f"Region {n} requests", API_TIERS, "6250000", "requests", "USD")
        for n in range(1, 31)
    ]
    invoice = _make_invoice(lines)

    pages, text = _pdf_text(invoice_render_pdf(invoice))

    assert pages >= 2
    for page in range(1, pages + 1):
        assert f"Page {page} of {pages}" in text
    assert "Region 30 requests" in text
    assert "Total $3,075.00" in text


def test_pdf_of_a_yen_invoice_has_no_decimals():
    lines = [
        _fixed("base_fee", "Starter plan, monthly fee", "5000", "JPY"),
        _usage(
            "API requests",
            {"model": "standard", "unit_price": "0.15"},
            "123457",
            "requests",
            "JPY",
        ),
    ]
    invoice = _make_invoice(lines, currency="JPY", zone="Asia/Tokyo", name="Sakura KK")

    _, text = _pdf_text(invoice_render_pdf(invoice))

    # 123,457 x ¥0.15 = ¥18,518.55, rounded half-up once to ¥18,519.
    for expected in ["Sakura KK", "¥5,000", "¥18,519", "Total ¥23,519", "Page 1 of 1"]:
        assert expected in text, expected
    assert "¥18,519." not in text
    assert "Yen (JPY)" in text


def test_pdf_of_a_dinar_invoice_has_three_decimals():
    lines = [
        _fixed("base_fee", "Growth plan, monthly fee", "15", "KWD"),
        _usage(
            "Data transfer",
            {"model": "standard", "unit_price": "0.0125"},
            "98765.4",
            "GB",
            "KWD",
        ),
    ]
    invoice = _make_invoice(lines, currency="KWD", zone="Asia/Kuwait", name="Gulf Analytics")

    _, text = _pdf_text(invoice_render_pdf(invoice))

    # 98,765.4 x KWD 0.0125 = 1,234.5675, rounded half-up to three places.
    for expected in [
        "Gulf Analytics",
        "KWD 15.000",
        "KWD 1,234.568",
        f"98,765.4 GB {TIMES} KWD 0.0125 = KWD 1,234.5675",
        "Total KWD 1,249.568",
    ]:
        assert expected in text, expected


def test_pdf_first_page_renders_to_a_picture(tmp_path):
    pdftoppm = shutil.which("pdftoppm")
    assert pdftoppm, "pdftoppm is missing: install poppler-utils (debian-packages.txt)"
    source = tmp_path / "invoice.pdf"
    source.write_bytes(invoice_render_pdf(_make_invoice(_usd_lines())))

    subprocess.run(
        [
            pdftoppm,
            "-png",
            "-r",
            "50",
            "-f",
            "1",
            "-l",
            "1",
            "-singlefile",
            source,
            tmp_path / "p1",
        ],
        check=True,
        timeout=60,
    )

    picture = tmp_path / "p1.png"
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert picture.stat().st_size > 8_000


# --- Drafts ---------------------------------------------------------------------------------------


def test_an_unsaved_draft_renders_to_html_marked_draft():
    saved = _make_invoice(_usd_lines())
    lines = [
        InvoiceLine(
            position=1,
            kind=InvoiceLine.Kind.USAGE,
            description="Widgets & <gadgets>",
            quantity=Decimal(1500),
            unit="widgets",
            amount_exact=Decimal("3.75"),
            amount_minor=375,
            breakdown=quote_document(
                {"model": "standard", "unit_price": "0.0025"}, Decimal(1500)
            ).to_json(),
        )
    ]
    draft = SimpleNamespace(
        organisation=saved.organisation,
        subscription=saved.subscription,
        number=None,
        status=Invoice.Status.DRAFT,
        period_start=saved.period_start,
        period_end=saved.period_end,
        currency="USD",
        issued_at=None,
        due_at=None,
        subtotal_minor=375,
        credits_minor=0,
        total_minor=375,
        lines=lines,
    )

    html = invoice_render_html(draft)

    assert "DRAFT" in html
    assert "INV-" not in html
    assert "Widgets &amp; &lt;gadgets&gt;" in html
    assert f"1,500 widgets {TIMES} $0.0025 = $3.75" in html
    assert "http://" not in html
    assert "https://" not in html


# --- The stored document and its email ------------------------------------------------------------


def test_document_is_stored_once_and_emailed_once(django_capture_on_commit_callbacks):
    invoice = _make_invoice(_usd_lines())

    with django_capture_on_commit_callbacks(execute=True):
        document = invoice_document_create(invoice=invoice)
    with django_capture_on_commit_callbacks(execute=True):
        again = invoice_document_create(invoice=invoice)

    assert again.pk == document.pk
    assert InvoiceDocument.objects.filter(invoice=invoice).count() == 1
    stored = bytes(InvoiceDocument.objects.get(invoice=invoice).pdf)
    assert stored.startswith(b"%PDF-")
    assert "Total $218.06" in _pdf_text(stored)[1]
    assert len(mail.outbox) == 1
    message = mail.outbox[0]
    assert message.subject == "Invoice INV-2026-000001 from Meterline Demo Ltd"
    assert message.to == ["accounts@acme.test"]
    assert message.from_email == "Meterline <invoices@meterline.test>"
    assert message.reply_to == ["billing@meterline.test"]
    assert "Amount due: $218.06 by 15 Nov 2026" in message.body
    assert "Widgets" not in message.body
    [(html, mimetype)] = message.alternatives
    assert mimetype == "text/html"
    assert "INV-2026-000001" in html
    assert "$218.06" in html
    [(filename, content, attachment_type)] = message.attachments
    assert (filename, attachment_type) == ("INV-2026-000001.pdf", "application/pdf")
    assert content == stored


def test_document_without_a_billing_email_is_stored_and_not_sent(
    django_capture_on_commit_callbacks,
):
    invoice = _make_invoice(_usd_lines(), billing_email="")

    with django_capture_on_commit_callbacks(execute=True):
        invoice_document_create(invoice=invoice)

    assert InvoiceDocument.objects.filter(invoice=invoice).exists()
    assert mail.outbox == []


def test_document_is_refused_for_a_draft():
    invoice = _make_invoice(_usd_lines())
    invoice.status = Invoice.Status.DRAFT

    with pytest.raises(ValueError, match="finalized or paid"):
        invoice_document_create(invoice=invoice)

    assert not InvoiceDocument.objects.exists()


def test_a_worker_that_loses_the_race_returns_the_winners_document(
    monkeypatch, django_capture_on_commit_callbacks
):
    invoice = _make_invoice(_usd_lines())
    render = documents._pdf_from_html

    def render_while_another_worker_stores(html: str) -> bytes:
        InvoiceDocument.objects.create(invoice=invoice, pdf=b"%PDF-winner")
        return bytes(render(html))

    monkeypatch.setattr(documents, "_pdf_from_html", render_while_another_worker_stores)

    with django_capture_on_commit_callbacks(execute=True):
        document = invoice_document_create(invoice=invoice)

    assert bytes(document.pdf) == b"%PDF-winner"
    assert mail.outbox == []


def test_document_email_goes_through_a_real_smtp_server(
    smtp_inbox, django_capture_on_commit_callbacks
):
    inbox = smtp_inbox
    invoice = _make_invoice(_usd_lines())
    with django_capture_on_commit_callbacks(execute=True):
        document = invoice_document_create(invoice=invoice)

    [envelope] = inbox.envelopes
    assert envelope.rcpt_tos == ["accounts@acme.test"]
    message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
    assert message["Subject"] == "Invoice INV-2026-000001 from Meterline Demo Ltd"
    [attachment] = list(message.iter_attachments())
    assert attachment.get_filename() == "INV-2026-000001.pdf"
    assert attachment.get_content_type() == "application/pdf"
    assert attachment.get_content() == bytes(document.pdf)
    assert message.get_body(("html",)) is not None
    assert "Amount due: $218.06" in message.get_body(("plain",)).get_content()
