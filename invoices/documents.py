"""Invoice documents: what an invoice shows, its HTML and PDF, and the email that delivers it.

`invoice_context` builds the data once, for a stored invoice or for an unsaved draft preview;
the HTML page, the PDF (WeasyPrint, from that same HTML) and the email are all rendered from it.
Money is formatted here for display only (babel, locale "en", each currency's own minor unit);
nothing computed here is ever stored or added up. The PDF of a finalized invoice is rendered
once, kept in `InvoiceDocument`, and emailed to the organisation's billing address.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_date
from babel.numbers import format_currency, format_decimal, get_currency_name, get_currency_symbol
from django.conf import settings
from django.core.mail import EmailMultiAlternatives
from django.db import IntegrityError, transaction
from django.template.loader import render_to_string

from core.money import currency_exponent
from invoices.models import Invoice, InvoiceDocument, InvoiceLine

logger = logging.getLogger("meterline.invoices")

LOCALE = "en"
DATE_PATTERN = "d MMM y"  # "1 Oct 2026"
HTML_TEMPLATE = "invoices/invoice.html"
EMAIL_TEXT_TEMPLATE = "invoices/email/invoice_finalized.txt"
EMAIL_HTML_TEMPLATE = "invoices/email/invoice_finalized.html"
DOCUMENT_STATUSES = frozenset({Invoice.Status.FINALIZED, Invoice.Status.PAID})
PERCENTAGE_MODELS = frozenset({"percentage", "graduated_percentage"})
# Typography, spelled as escapes so that no look-alike character hides in the source.
EN_DASH = "\u2013"
TIMES = "\u00d7"
NO_BREAK_SPACE = "\u00a0"
ZERO = Decimal(0)
HUNDRED = Decimal(100)


# --- The data ------------------------------------------------------------------------------------


def invoice_context(invoice: Any) -> dict[str, Any]:
    """Return everything an invoice document shows, formatted for reading.

    `invoice` is an `Invoice`, or any object with the same attributes whose `lines` is a plain
    list of (unsaved) `InvoiceLine`s: the draft preview.
    """
    organisation = invoice.organisation
    currency = invoice.currency
    period_zone = _period_zone(invoice)
    customer_zone = ZoneInfo(organisation.timezone)
    lines = list(invoice.lines.all()) if hasattr(invoice.lines, "all") else list(invoice.lines)
    is_draft = invoice.status == Invoice.Status.DRAFT or not invoice.number
    period = (invoice.period_start, invoice.period_end)
    return {
        "seller": {
            "name": settings.SELLER_NAME,
            "address": settings.SELLER_ADDRESS,
            "email": settings.SELLER_EMAIL,
        },
        "customer": {"name": organisation.name, "email": organisation.billing_email},
        "number": "DRAFT" if is_draft else invoice.number,
        "is_draft": is_draft,
        "status": invoice.status,
        "status_label": _choice_label(Invoice.Status, invoice.status),
        "currency": currency,
        "currency_name": get_currency_name(currency, locale=LOCALE),
        "period": _period_context(*period, zone=period_zone),
        "issued": _date_text(invoice.issued_at, customer_zone),
        "due": _date_text(invoice.due_at, customer_zone),
        "lines": [
            _line_context(line, currency=currency, invoice_period=period, zone=period_zone)
            for line in lines
        ],
        "subtotal": _money_minor(invoice.subtotal_minor, currency),
        # Shown as a deduction; stored as a non-negative figure.
        "credits": _money_minor(-invoice.credits_minor, currency) if invoice.credits_minor else "",
        "total": _money_minor(invoice.total_minor, currency),
    }


def _period_zone(invoice: Any) -> ZoneInfo:
    # Periods were stepped at midnight in the subscription's zone, copied from the organisation
    # when it subscribed: showing them there keeps whole days even if the organisation has
    # since changed its own. (A missing related object is an AttributeError, so getattr works.)
    subscription = getattr(invoice, "subscription", None)
    name = getattr(subscription, "timezone", "") or invoice.organisation.timezone
    return ZoneInfo(name)


def _period_context(start: datetime, end: datetime, *, zone: ZoneInfo) -> dict[str, str]:
    first = start.astimezone(zone).date()
    last = _last_day(end, zone)
    text = f"{_format_date(first)} {EN_DASH} {_format_date(last)}"
    return {
        "start": _format_date(first),
        "end": _format_date(last),
        "text": text,
        "zone": str(zone),
    }


def _last_day(end: datetime, zone: ZoneInfo) -> date:
    # Periods are half-open, [start, end): an end at local midnight belongs to the next period,
    # so the last day shown is the day before; an end later in a day includes that day.
    local = end.astimezone(zone)
    if local.time() == time(0):
        return local.date() - timedelta(days=1)
    return local.date()


def _date_text(moment: datetime | None, zone: ZoneInfo) -> str:
    return _format_date(moment.astimezone(zone).date()) if moment is not None else ""


def _format_date(day: date) -> str:
    return str(format_date(day, DATE_PATTERN, locale=LOCALE))


def _choice_label(choices: Any, value: str) -> str:
    try:
        return str(choices(value).label)
    except ValueError:
        return value


def _line_context(
    line: InvoiceLine,
    *,
    currency: str,
    invoice_period: tuple[datetime, datetime],
    zone: ZoneInfo,
) -> dict[str, Any]:
    is_credit = line.kind == InvoiceLine.Kind.CREDIT
    # A credit reads as a deduction whichever sign it was stored with.
    amount_minor = -abs(line.amount_minor) if is_credit else line.amount_minor
    quantity = _decimal(line.quantity)
    show_quantity = bool(quantity) or line.kind in (
        InvoiceLine.Kind.USAGE,
        InvoiceLine.Kind.ADJUSTMENT,
    )
    return {
        "position": line.position,
        "kind": line.kind,
        "kind_label": _choice_label(InvoiceLine.Kind, line.kind),
        "description": line.description,
        "quantity": _quantity(quantity) if show_quantity else "",
        "unit": line.unit if show_quantity else "",
        "amount": _money_minor(amount_minor, currency),
        "is_credit": is_credit,
        "details": _line_details(line, currency=currency, invoice_period=invoice_period, zone=zone),
    }


def _line_details(
    line: InvoiceLine,
    *,
    currency: str,
    invoice_period: tuple[datetime, datetime],
    zone: ZoneInfo,
) -> list[str]:
    """Return how the line's amount was reached, one sentence per step."""
    breakdown: Mapping[str, Any] = line.breakdown or {}
    # The period whose usage the line bills, when it is not the invoice's own.
    other_period = ""
    start, end = line.usage_start, line.usage_end
    if start is not None and end is not None and (start, end) != invoice_period:
        other_period = _period_context(start, end, zone=zone)["text"]
    details: list[str] = []
    if line.kind == InvoiceLine.Kind.ADJUSTMENT:
        if other_period:
            details.append(
                f"Usage for the earlier period {other_period}, received after it was invoiced"
            )
        rerated = breakdown.get("rerated")
        if isinstance(rerated, Mapping):
            details.extend(_quote_details(rerated, currency=currency, unit=line.unit))
            if breakdown.get("billed") is not None:
                details.append(
                    f"Re-rated amount {_money_exact(rerated.get('amount'), currency)}, less "
                    f"{_money_exact(breakdown['billed'], currency)} already billed for that "
                    f"period = {_money_exact(line.amount_exact, currency)}"
                )
        return details
    if other_period:
        details.append(f"Usage in {other_period}")
    if isinstance(breakdown.get("slices"), Sequence):
        details.extend(_quote_details(breakdown, currency=currency, unit=line.unit))
    return details


def _quote_details(quote: Mapping[str, Any], *, currency: str, unit: str) -> list[str]:
    """Explain one pricing engine quote (`Quote.to_json()`) in sentences."""
    model = str(quote.get("model", ""))
    by_percentage = model in PERCENTAGE_MODELS
    details: list[str] = []
    free_units = _decimal(quote.get("free_units"))
    if free_units:
        # For percentage prices the free allowance is an amount of money, not units.
        if by_percentage:
            details.append(f"Free allowance: {_money_exact(free_units, currency)}")
        else:
            details.append(f"Free units: {_with_unit(_quantity(free_units), unit)}")
    free_events = int(quote.get("free_events") or 0)
    if free_events:
        details.append(f"Free events: {format_decimal(free_events, locale=LOCALE)}")
    for piece in quote.get("slices") or ():
        details.append(_slice_text(piece, model=model, currency=currency, unit=unit))
    discount = _decimal(quote.get("discount"))
    true_up = _decimal(quote.get("minimum_true_up"))
    cap = _decimal(quote.get("maximum_cap"))
    if discount or true_up or cap:
        details.append(f"Usage amount: {_money_exact(quote.get('usage_amount'), currency)}")
    if discount:
        details.append(f"Discount: -{_money_exact(discount, currency)}")
    if true_up:
        details.append(f"Minimum commitment true-up: +{_money_exact(true_up, currency)}")
    if cap:
        details.append(f"Maximum charge cap: -{_money_exact(cap, currency)}")
    details.extend(f"Note: {note}" for note in quote.get("notes") or ())
    return details


def _slice_text(piece: Mapping[str, Any], *, model: str, currency: str, unit: str) -> str:
    description = str(piece.get("description", ""))
    units = _decimal(piece.get("units"))
    unit_price = _decimal(piece.get("unit_price"))
    flat_fee = _decimal(piece.get("flat_fee"))
    amount = _money_exact(piece.get("amount"), currency)
    if model in PERCENTAGE_MODELS:
        # Here `units` is the money charged on and `unit_price` the rate as a fraction; the
        # engine's description of a percentage slice repeats its raw figures after a colon.
        label = description.split(":", 1)[0]
        rate = format_decimal(unit_price * HUNDRED, locale=LOCALE, decimal_quantization=False)
        text = f"{rate}% of {_money_exact(units, currency)}"
        if flat_fee:
            fees = "per-event fees" if model == "percentage" else "flat fee"
            text += f" + {_money_exact(flat_fee, currency)} {fees}"
    else:
        label = description
        # A package slice counts packages; every other slice counts the meter's units.
        counted = _quantity(units) if model == "package" else _with_unit(_quantity(units), unit)
        text = f"{counted} {TIMES} {_money_exact(unit_price, currency)}"
        if flat_fee:
            text += f" + {_money_exact(flat_fee, currency)} flat fee"
    if label == "units":  # a standard price's one slice needs no label
        return f"{text} = {amount}"
    return f"{label[:1].upper()}{label[1:]}: {text} = {amount}"


# --- Formatting ----------------------------------------------------------------------------------


def _decimal(value: object) -> Decimal:
    """Read a breakdown figure (a decimal string) or a model Decimal; empty is zero."""
    if value is None or value == "":
        return ZERO
    try:
        return Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"Not a decimal figure in an invoice breakdown: {value!r}") from exc


def _money_minor(amount_minor: int, currency: str) -> str:
    """Format a charged amount, stored in minor units, as the currency's customers read it."""
    amount = Decimal(amount_minor).scaleb(-currency_exponent(currency))
    return _currency_spacing(format_currency(amount, currency, locale=LOCALE), currency)


def _money_exact(value: object, currency: str) -> str:
    """Format an exact engine figure (a unit price, a slice): every digit, never rounded."""
    text = format_currency(_decimal(value), currency, locale=LOCALE, decimal_quantization=False)
    return _currency_spacing(text, currency)


def _currency_spacing(text: str, currency: str) -> str:
    # CLDR's currencySpacing rule, which babel does not apply: a symbol ending in a letter
    # ("KWD", "CHF") is kept apart from the digits by a no-break space, "KWD 1,234.567".
    symbol = str(get_currency_symbol(currency, locale=LOCALE))
    at = text.find(symbol)
    end = at + len(symbol)
    if at >= 0 and symbol[-1:].isalpha() and text[end : end + 1].isdigit():
        return f"{text[:end]}{NO_BREAK_SPACE}{text[end:]}"
    return text


def _quantity(value: Decimal) -> str:
    return str(format_decimal(value, locale=LOCALE, decimal_quantization=False))


def _with_unit(quantity: str, unit: str) -> str:
    return f"{quantity} {unit}" if unit else quantity


# --- Rendering -----------------------------------------------------------------------------------


def invoice_render_html(invoice: Any) -> str:
    """Return the invoice (or draft preview) as one standalone HTML page."""
    return render_to_string(HTML_TEMPLATE, invoice_context(invoice))


def invoice_render_pdf(invoice: Any) -> bytes:
    """Return the invoice (or draft preview) as an A4 PDF, rendered from the same HTML."""
    return _pdf_from_html(invoice_render_html(invoice))


def _pdf_from_html(html: str) -> bytes:
    from weasyprint import HTML
    from weasyprint.urls import URLFetcher

    # The page is self-contained: refuse every URL, so that nothing in an invoice (a
    # description, a future template change) can make the renderer read files or the network.
    fetcher = URLFetcher(allowed_protocols=())
    return bytes(HTML(string=html, url_fetcher=fetcher).write_pdf())


# --- The stored document and its email -----------------------------------------------------------


def invoice_document_create(*, invoice: Invoice) -> InvoiceDocument:
    """Render and store the PDF of a finalized invoice, once, and email it to the customer.

    Idempotent: when the invoice already has its document, that document is returned and no
    email is sent. The email goes out after the transaction commits, only for a newly stored
    document and only when the organisation has a billing address.
    """
    if invoice.status not in DOCUMENT_STATUSES or not invoice.number:
        raise ValueError(f"Only finalized or paid invoices get a document, not {invoice}.")
    existing = InvoiceDocument.objects.filter(invoice=invoice).first()
    if existing is not None:
        return existing
    context = invoice_context(invoice)
    pdf = _pdf_from_html(render_to_string(HTML_TEMPLATE, context))
    try:
        # No full_clean(): its uniqueness check would be check-then-act; the one-to-one's
        # unique constraint decides between two workers rendering the same invoice.
        with transaction.atomic():
            document = InvoiceDocument.objects.create(invoice=invoice, pdf=pdf)
    except IntegrityError:
        # Another worker stored it first: its document stands, and it sends the email.
        return InvoiceDocument.objects.get(invoice=invoice)
    logger.info("Stored the PDF of invoice %s (%d bytes).", invoice.number, len(pdf))
    if invoice.organisation.billing_email:
        transaction.on_commit(
            partial(_email_send, invoice=invoice, document=document, context=context)
        )
    return document


def invoice_document_email_send(*, document: InvoiceDocument) -> None:
    """Email an invoice's stored PDF to its organisation's billing address (a manual resend)."""
    invoice = document.invoice
    if not invoice.organisation.billing_email:
        raise ValueError(f"{invoice.organisation} has no billing email address.")
    _email_send(invoice=invoice, document=document, context=invoice_context(invoice))


def _email_send(*, invoice: Invoice, document: InvoiceDocument, context: dict[str, Any]) -> None:
    message = EmailMultiAlternatives(
        subject=f"Invoice {invoice.number} from {settings.SELLER_NAME}",
        body=render_to_string(EMAIL_TEXT_TEMPLATE, context),
        from_email=settings.DEFAULT_FROM_EMAIL,
        to=[invoice.organisation.billing_email],
        reply_to=[settings.SELLER_EMAIL] if settings.SELLER_EMAIL else None,
    )
    message.attach_alternative(render_to_string(EMAIL_HTML_TEMPLATE, context), "text/html")
    # PostgreSQL hands a BinaryField back as a memoryview.
    message.attach(f"{invoice.number}.pdf", bytes(document.pdf), "application/pdf")
    message.send()
    logger.info("Emailed invoice %s to its organisation's billing address.", invoice.number)
