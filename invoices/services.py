"""Writes for billing: closing periods into invoices exactly once, numbering, credit notes.

A period closes `BILLING_GRACE` after its end. Its invoice counts the events received by the
close's as-of instant (the scheduled time, not the moment the job happens to run), so a re-run
after a crash gives the same amounts; events that arrive later for a closed period are billed on
the next invoice as an adjustment: the old period re-rated with them, minus what was billed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Max, Min, Q, Sum
from django.utils import timezone
from django_q.tasks import async_task

from accounts.models import Organisation
from core.money import currency_exponent, to_minor_units
from core.periods import Period, billing_period, period_boundary
from invoices.models import BillingPeriod, CreditNote, Invoice, InvoiceLine, InvoiceNumberSequence
from plans.models import CreditGrant, Price, Subscription
from plans.pricing import exact_sum
from plans.selectors import credit_balance, period_cost, price_catalogue
from plans.services import credits_apply
from usage.models import UsageEvent
from usage.selectors import BATCHABLE, usage_totals

# Lines that bill usage of a period: what a late adjustment compares against.
_USAGE_KINDS = (InvoiceLine.Kind.USAGE, InvoiceLine.Kind.TRUE_UP, InvoiceLine.Kind.ADJUSTMENT)


@dataclass
class InvoiceDraft:
    """An invoice before it is stored: what a close persists and what a preview shows."""

    subscription: Subscription
    period: Period
    cutoff: datetime
    lines: list[InvoiceLine] = field(default_factory=list)
    status: str = Invoice.Status.DRAFT
    number: str | None = None
    issued_at: datetime | None = None
    due_at: datetime | None = None

    @property
    def organisation(self) -> Organisation:
        return self.subscription.organisation

    @property
    def currency(self) -> str:
        return self.subscription.plan.currency

    @property
    def period_start(self) -> datetime:
        return self.period.start

    @property
    def period_end(self) -> datetime:
        return self.period.end

    @property
    def subtotal_minor(self) -> int:
        return sum(line.amount_minor for line in self.lines if line.kind != InvoiceLine.Kind.CREDIT)

    @property
    def credits_minor(self) -> int:
        return -sum(
            line.amount_minor for line in self.lines if line.kind == InvoiceLine.Kind.CREDIT
        )

    @property
    def total_minor(self) -> int:
        return self.subtotal_minor - self.credits_minor


def subscription_periods(
    *, subscription: Subscription, after: datetime | None, until: datetime
) -> Iterator[Period]:
    """Yield the subscription's periods that end by `until`, after the one ending at `after`.

    Periods step from the anchor; the first is clipped to the subscription's start and the last
    to its end.
    """
    tz, months = subscription.tzinfo, subscription.plan.months
    cursor = after or subscription.start
    index, _ = billing_period(subscription.anchor, cursor, tz, months)
    while True:
        start = max(period_boundary(subscription.anchor, index, tz, months), subscription.start)
        end = period_boundary(subscription.anchor, index + 1, tz, months)
        if subscription.end is not None:
            if start >= subscription.end:
                return
            end = min(end, subscription.end)
        if end > until:
            return
        if after is None or start >= after:
            yield Period(start, end)
        index += 1


def invoice_draft(
    *,
    subscription: Subscription,
    period: Period,
    cutoff: datetime,
    prices: list[Price] | None = None,
    known_usage: Mapping[int, Decimal] | None = None,
    late: bool = True,
) -> InvoiceDraft:
    """Compute an invoice's lines (not stored): base fee, usage per price, true-ups, late
    adjustments of earlier periods. The preview, the close and the batch close all come through
    here; a batch passes what it read for all its subscriptions at once (`prices`,
    `known_usage`) and whether this one has delayed events to look at (`late`)."""
    draft = InvoiceDraft(subscription=subscription, period=period, cutoff=cutoff)
    currency = draft.currency
    cost = period_cost(
        subscription=subscription,
        period=period,
        received_until=cutoff,
        prices=prices,
        known_usage=known_usage,
    )

    def add(kind: str, description: str, amount: Decimal, **fields: object) -> None:
        draft.lines.append(
            InvoiceLine(
                position=len(draft.lines) + 1,
                kind=kind,
                description=description[:300],
                amount_exact=amount,
                amount_minor=to_minor_units(amount, currency),
                **fields,
            )
        )

    if cost.base_fee:
        add(
            InvoiceLine.Kind.BASE_FEE,
            f"{subscription.plan.name}: base fee",
            cost.base_fee,
            quantity=Decimal(1),
        )
    for line in cost.lines:
        quote = line.cost
        usage = dict(
            meter=line.meter,
            price_version=line.version,
            usage_start=period.start,
            usage_end=period.end,
        )
        add(
            InvoiceLine.Kind.USAGE,
            line.price.label,
            exact_sum([quote.usage_amount, -quote.discount, -quote.cap]),
            quantity=line.usage,
            unit=line.meter.unit,
            breakdown=quote.to_json(),
            **usage,
        )
        if quote.true_up:
            add(
                InvoiceLine.Kind.TRUE_UP,
                f"{line.price.label}: minimum commitment",
                quote.true_up,
                breakdown={"minimum_true_up": str(quote.true_up)},
                **usage,
            )
    if late:
        for adjustment in _late_adjustments(
            subscription=subscription, period=period, cutoff=cutoff
        ):
            add(**adjustment)  # type: ignore[arg-type]
    return draft


def _late_adjustments(
    *, subscription: Subscription, period: Period, cutoff: datetime
) -> Iterator[dict[str, object]]:
    """Adjustments for events that reached closed periods after their invoices were cut."""
    previous = Invoice.objects.filter(subscription=subscription, period_start__lt=period.start)
    last_cutoff = previous.aggregate(at=Max("cutoff"))["at"]
    if last_cutoff is None:
        return
    earliest = UsageEvent.objects.filter(
        organisation=subscription.organisation,
        delayed=True,
        received_at__gt=last_cutoff,
        received_at__lte=cutoff,
        timestamp__lt=period.start,
    ).aggregate(at=Min("timestamp"))["at"]
    if earliest is None:
        return
    for old in previous.filter(period_end__gt=earliest).order_by("period_start"):
        late = UsageEvent.objects.filter(
            organisation=subscription.organisation,
            delayed=True,
            received_at__gt=last_cutoff,
            received_at__lte=cutoff,
            timestamp__gte=old.period_start,
            timestamp__lt=old.period_end,
        )
        if not late.exists():
            continue
        rerated = period_cost(subscription=subscription, period=old.period, received_until=cutoff)
        for line in rerated.lines:
            billed = InvoiceLine.objects.filter(
                invoice__subscription=subscription,
                meter=line.meter,
                usage_start=old.period_start,
                kind__in=_USAGE_KINDS,
            ).aggregate(
                amount=Sum("amount_exact"),
                # A true-up bills money, not units.
                quantity=Sum("quantity", filter=~Q(kind=InvoiceLine.Kind.TRUE_UP)),
            )
            billed_amount = billed["amount"] or Decimal(0)
            billed_quantity = billed["quantity"] or Decimal(0)
            difference = exact_sum([line.cost.amount, -billed_amount])
            if not difference:
                continue
            yield {
                "kind": InvoiceLine.Kind.ADJUSTMENT,
                "description": f"{line.price.label}: late usage for "
                f"{old.period_start:%Y-%m-%d} to {old.period_end:%Y-%m-%d} ({old.number})",
                "amount": difference,
                "meter": line.meter,
                "price_version": line.version,
                "usage_start": old.period_start,
                "usage_end": old.period_end,
                "quantity": line.usage - billed_quantity,
                "unit": line.meter.unit,
                "breakdown": {"rerated": line.cost.to_json(), "billed": str(billed_amount)},
            }


def invoice_preview(*, subscription: Subscription, at: datetime) -> InvoiceDraft:
    """The current period as a draft invoice, with the credits that would apply."""
    tz, months = subscription.tzinfo, subscription.plan.months
    _, period = billing_period(subscription.anchor, at, tz, months)
    period = Period(max(period.start, subscription.start), period.end)
    draft = invoice_draft(subscription=subscription, period=period, cutoff=at)
    available = credit_balance(
        organisation=subscription.organisation, currency=draft.currency, at=at
    )
    usable = min(available, max(draft.subtotal_minor, 0))
    if usable:
        draft.lines.append(_credit_line(draft, usable, "Credits (estimated)"))
    return draft


def _credit_line(draft: InvoiceDraft, amount_minor: int, description: str) -> InvoiceLine:
    exponent = Decimal(10) ** -currency_exponent(draft.currency)
    return InvoiceLine(
        position=len(draft.lines) + 1,
        kind=InvoiceLine.Kind.CREDIT,
        description=description,
        amount_exact=-Decimal(amount_minor) * exponent,
        amount_minor=-amount_minor,
    )


def document_number_allocate(*, prefix: str, year: int) -> str:
    """Take the next number of a series and year (INV-2026-000123); see the plural."""
    [number] = document_numbers_allocate(prefix=prefix, year=year, count=1)
    return number


def document_numbers_allocate(*, prefix: str, year: int, count: int) -> list[str]:
    """Take the next `count` numbers of a series and year under a row lock: gapless, because
    they are taken inside the issuing transaction and given back if that rolls back."""
    InvoiceNumberSequence.objects.get_or_create(prefix=prefix, year=year)
    sequence = InvoiceNumberSequence.objects.select_for_update().get(prefix=prefix, year=year)
    first = sequence.last_number + 1
    sequence.last_number += count
    sequence.save(update_fields=["last_number"])
    return [f"{prefix}-{year}-{n:06d}" for n in range(first, first + count)]


@transaction.atomic
def period_close(
    *, subscription: Subscription, period: Period, as_of: datetime
) -> tuple[Invoice, bool]:
    """Invoice one period exactly once; return the invoice and whether this call created it.

    The billing period row is locked first: a second closer waits, then finds the invoice. A
    closer that dies half-way rolls back entirely (its number too) and the next run starts over
    with the same cutoff, so the same amounts.
    """
    stored, _ = BillingPeriod.objects.get_or_create(
        subscription=subscription, start=period.start, defaults={"end": period.end}
    )
    stored = BillingPeriod.objects.select_for_update().get(pk=stored.pk)
    existing = Invoice.objects.filter(billing_period=stored).first()
    if existing is not None:
        return existing, False

    cutoff = close_cutoff(as_of)
    draft = invoice_draft(subscription=subscription, period=period, cutoff=cutoff)
    invoice = Invoice.objects.create(
        organisation=subscription.organisation,
        subscription=subscription,
        billing_period=stored,
        period_start=period.start,
        period_end=period.end,
        currency=draft.currency,
        cutoff=cutoff,
    )
    invoice.number = document_number_allocate(prefix="INV", year=as_of.year)
    subtotal = draft.subtotal_minor
    for grant, used in credits_apply(
        organisation=subscription.organisation,
        currency=draft.currency,
        amount_minor=max(subtotal, 0),
        at=as_of,
        reference=invoice.number,
    ):
        label = grant.description or f"{grant.get_category_display()} credit"
        draft.lines.append(_credit_line(draft, used, f"Credit applied: {label}"))
    for line in draft.lines:
        line.invoice = invoice
    InvoiceLine.objects.bulk_create(draft.lines)
    invoice.subtotal_minor = draft.subtotal_minor
    invoice.credits_minor = draft.credits_minor
    invoice.total_minor = draft.total_minor
    invoice.status = Invoice.Status.FINALIZED
    invoice.issued_at = as_of
    invoice.due_at = as_of + timedelta(days=settings.INVOICE_DUE_DAYS)
    invoice.save()
    transaction.on_commit(lambda: async_task("invoices.tasks.invoice_document_render", invoice.pk))
    return invoice, True


@dataclass
class CloseSummary:
    closed: int = 0
    already: int = 0
    total_minor: dict[str, int] = field(default_factory=dict)
    invoices: list[str] = field(default_factory=list)


def periods_due(
    *, as_of: datetime, organisation: Organisation | None = None
) -> list[tuple[Subscription, Period]]:
    """Every subscription period that ended at least BILLING_GRACE before `as_of` and has no
    invoice yet, oldest first."""
    until = as_of - settings.BILLING_GRACE
    subscriptions = Subscription.objects.select_related("plan", "organisation").filter(
        start__lt=until
    )
    if organisation is not None:
        subscriptions = subscriptions.filter(organisation=organisation)
    last_invoiced = dict(
        Invoice.objects.filter(subscription__in=subscriptions)
        .values("subscription")
        .annotate(end=Max("period_end"))
        .values_list("subscription", "end")
    )
    due = []
    for subscription in subscriptions.order_by("id"):
        after = last_invoiced.get(subscription.pk)
        for period in subscription_periods(subscription=subscription, after=after, until=until):
            due.append((subscription, period))
    return due


def periods_close(
    *,
    as_of: datetime,
    organisation: Organisation | None = None,
    progress: Callable[[int], object] | None = None,
    batch_size: int = 500,
    due: list[tuple[Subscription, Period]] | None = None,
) -> CloseSummary:
    """Close every due period (see `periods_due`; `due` if the caller has already listed them)
    in batches of subscriptions sharing a period.

    Each batch is one transaction that reads usage for all its customers in one query per
    meter and writes in bulk; what it bills is what `period_close` bills one by one. Periods
    another closer is working on (locked rows) are skipped, not waited for.
    """
    summary = CloseSummary()
    by_period: dict[Period, list[Subscription]] = {}
    if due is None:
        due = periods_due(as_of=as_of, organisation=organisation)
    for subscription, period in due:
        by_period.setdefault(period, []).append(subscription)
    for period, subscriptions in sorted(by_period.items(), key=lambda item: item[0].start):
        for offset in range(0, len(subscriptions), batch_size):
            batch = subscriptions[offset : offset + batch_size]
            invoices, skipped = _close_batch(period=period, subscriptions=batch, as_of=as_of)
            summary.already += skipped
            for invoice in invoices:
                summary.closed += 1
                summary.invoices.append(invoice.number or "")
                summary.total_minor[invoice.currency] = (
                    summary.total_minor.get(invoice.currency, 0) + invoice.total_minor
                )
            if progress:
                progress(len(batch))
    return summary


def close_cutoff(as_of: datetime) -> datetime:
    """The receipt instant a close counts events up to (see BILLING_CUTOFF_SETTLE)."""
    return as_of - settings.BILLING_CUTOFF_SETTLE


@transaction.atomic
def _close_batch(
    *, period: Period, subscriptions: list[Subscription], as_of: datetime
) -> tuple[list[Invoice], int]:
    """Invoice `period` for many subscriptions at once; return the invoices and how many were
    skipped (already invoiced, or being invoiced by another closer right now)."""
    BillingPeriod.objects.bulk_create(
        [BillingPeriod(subscription=s, start=period.start, end=period.end) for s in subscriptions],
        ignore_conflicts=True,
    )
    # Lock this batch's uninvoiced periods; rows another closer holds are skipped (it is
    # invoicing them). Without an invoice after the lock means nobody has.
    open_periods = {
        stored.subscription_id: stored
        for stored in BillingPeriod.objects.select_for_update(skip_locked=True, of=("self",))
        .filter(subscription__in=subscriptions, start=period.start, invoice__isnull=True)
        .order_by("subscription_id")
    }
    todo = [s for s in subscriptions if s.pk in open_periods]
    if not todo:
        return [], len(subscriptions)
    cutoff = close_cutoff(as_of)

    catalogue = price_catalogue(subscriptions=todo)
    meters = {p.meter_id: p.meter for prices in catalogue.values() for p in prices}
    organisation_ids = [s.organisation_id for s in todo]
    known: dict[int, dict[int, Decimal]] = {org_id: {} for org_id in organisation_ids}
    for meter in meters.values():
        if meter.spec.aggregation in BATCHABLE:
            totals = usage_totals(
                organisation_ids=organisation_ids, meter=meter, period=period, received_until=cutoff
            )
            for org_id, value in totals.items():
                known[org_id][meter.pk] = value
    late = _with_delayed_events(subscriptions=todo, period=period, cutoff=cutoff)
    with_credit = _organisations_with_credit(organisation_ids=organisation_ids, at=as_of)

    drafts = [
        invoice_draft(
            subscription=s,
            period=period,
            cutoff=cutoff,
            prices=catalogue[s.pk],
            known_usage=known[s.organisation_id],
            late=s.pk in late,
        )
        for s in todo
    ]
    numbers = document_numbers_allocate(prefix="INV", year=as_of.year, count=len(drafts))
    invoices = []
    for draft, number in zip(drafts, numbers, strict=True):
        subscription = draft.subscription
        if subscription.organisation_id in with_credit:
            _apply_credits(draft, number=number, at=as_of)
        invoices.append(
            Invoice(
                organisation_id=subscription.organisation_id,
                subscription=subscription,
                billing_period=open_periods[subscription.pk],
                period_start=period.start,
                period_end=period.end,
                currency=draft.currency,
                status=Invoice.Status.FINALIZED,
                number=number,
                cutoff=cutoff,
                issued_at=as_of,
                due_at=as_of + timedelta(days=settings.INVOICE_DUE_DAYS),
                subtotal_minor=draft.subtotal_minor,
                credits_minor=draft.credits_minor,
                total_minor=draft.total_minor,
            )
        )
    Invoice.objects.bulk_create(invoices)
    lines = []
    for invoice, draft in zip(invoices, drafts, strict=True):
        for line in draft.lines:
            line.invoice = invoice
            lines.append(line)
    InvoiceLine.objects.bulk_create(lines, batch_size=2000)
    ids = [invoice.pk for invoice in invoices]
    transaction.on_commit(lambda: async_task("invoices.tasks.invoice_documents_render", ids))
    return invoices, len(subscriptions) - len(todo)


def _apply_credits(draft: InvoiceDraft, *, number: str, at: datetime) -> None:
    for grant, used in credits_apply(
        organisation=draft.organisation,
        currency=draft.currency,
        amount_minor=max(draft.subtotal_minor, 0),
        at=at,
        reference=number,
    ):
        label = grant.description or f"{grant.get_category_display()} credit"
        draft.lines.append(_credit_line(draft, used, f"Credit applied: {label}"))


def _with_delayed_events(
    *, subscriptions: list[Subscription], period: Period, cutoff: datetime
) -> set[int]:
    """Subscriptions whose organisation has delayed events, received since its last invoice's
    cutoff, for earlier periods: only these need the late-adjustment check."""
    last_cutoffs = dict(
        Invoice.objects.filter(subscription__in=subscriptions, period_start__lt=period.start)
        .values("subscription")
        .annotate(at=Max("cutoff"))
        .values_list("subscription", "at")
    )
    if not last_cutoffs:
        return set()
    latest = dict(
        UsageEvent.objects.filter(
            organisation_id__in=[s.organisation_id for s in subscriptions],
            delayed=True,
            received_at__gt=min(last_cutoffs.values()),
            received_at__lte=cutoff,
            timestamp__lt=period.start,
        )
        .order_by()
        .values("organisation_id")
        .annotate(at=Max("received_at"))
        .values_list("organisation_id", "at")
    )
    return {
        s.pk
        for s in subscriptions
        if s.pk in last_cutoffs
        and s.organisation_id in latest
        and latest[s.organisation_id] > last_cutoffs[s.pk]
    }


def _organisations_with_credit(*, organisation_ids: list[int], at: datetime) -> set[int]:
    """Organisations with any credit grant in force at `at` (balance checked when applied)."""
    return set(
        CreditGrant.objects.filter(organisation_id__in=organisation_ids, effective_from__lte=at)
        .values_list("organisation_id", flat=True)
        .distinct()
    )


@transaction.atomic
def credit_note_issue(*, invoice: Invoice, amount_minor: int, reason: str) -> CreditNote:
    """Correct a finalized invoice with a new document; the invoice itself is never changed."""
    if invoice.status not in (Invoice.Status.FINALIZED, Invoice.Status.PAID):
        raise ValueError("Only finalized invoices are corrected by credit notes.")
    already = invoice.credit_notes.aggregate(total=Sum("amount_minor"))["total"] or 0
    if amount_minor <= 0 or already + amount_minor > invoice.total_minor:
        raise ValueError("A credit note is positive and at most what is left of the invoice.")
    now = timezone.now()
    number = document_number_allocate(prefix="CN", year=now.year)
    return CreditNote.objects.create(
        invoice=invoice, number=number, amount_minor=amount_minor, reason=reason, issued_at=now
    )
