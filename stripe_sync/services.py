"""Writes of the Stripe sync: customer and meter links, the meter-event outbox and its flush,
period summaries, invoice pushes and what webhooks tell us.

Our database is the system of record. Every send carries an identifier or idempotency key built
from our ids, so any step can be re-run after a crash: Stripe deduplicates, we count a duplicate
as delivered. Rows are only ever marked sent after Stripe answered.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import stripe
from django.conf import settings
from django.db import connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from accounts.models import Organisation
from core.backoff import backoff_delay
from core.periods import Period
from invoices.models import Invoice
from stripe_sync import gateway
from stripe_sync.gateway import MeterEvent
from stripe_sync.models import (
    MeterEventState,
    OutboxEvent,
    PeriodSummaryEvent,
    StripeCustomer,
    StripeInvoice,
    StripeMeter,
    WebhookEventSeen,
)
from stripe_sync.selectors import Difference, streamed_meter_ids
from usage.models import Meter, UsageEvent
from usage.selectors import usage_totals
from usage.signals import StoredEvent

logger = logging.getLogger(__name__)

# --- Customers ----------------------------------------------------------------------------------


def customer_ensure(*, organisation: Organisation) -> StripeCustomer:
    """Return the organisation's Stripe customer, creating it at Stripe on first need."""
    existing = StripeCustomer.objects.filter(organisation=organisation).first()
    if existing is not None:
        return existing
    data = gateway.customer_create(
        organisation_id=organisation.pk,
        name=organisation.name,
        email=organisation.billing_email,
        # Two flushers creating it at once get the same customer back from Stripe.
        idempotency_key=f"meterline-customer:{organisation.pk}",
    )
    link, _ = StripeCustomer.objects.get_or_create(
        organisation=organisation, defaults=_customer_fields(data)
    )
    return link


def customer_link(*, organisation: Organisation, stripe_id: str) -> StripeCustomer:
    """Link the organisation to an existing Stripe customer (checked at Stripe first)."""
    data = gateway.customer_retrieve(stripe_id=stripe_id)
    link, _ = StripeCustomer.objects.update_or_create(
        organisation=organisation, defaults=_customer_fields(data)
    )
    return link


def _customer_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "stripe_id": data["id"],
        "email": data.get("email") or "",
        "name": data.get("name") or "",
    }


# --- Meters -------------------------------------------------------------------------------------


def meter_configure(*, meter: Meter, mode: str) -> StripeMeter:
    """Say how a meter reaches Stripe; nothing is sent until it is provisioned."""
    link = StripeMeter.objects.filter(meter=meter).first() or StripeMeter(
        meter=meter, event_name=f"meterline_{meter.code}"
    )
    link.mode = mode
    link.full_clean()
    link.save()
    return link


def meter_provision(*, stripe_meter: StripeMeter, now: datetime | None = None) -> StripeMeter:
    """Create the meter's Stripe Billing Meter once and store its id."""
    if stripe_meter.stripe_id:
        return stripe_meter
    data = gateway.meter_create(
        display_name=stripe_meter.meter.name,
        event_name=stripe_meter.event_name,
        idempotency_key=f"meterline-meter:{stripe_meter.meter_id}",
    )
    StripeMeter.objects.filter(pk=stripe_meter.pk, stripe_id="").update(
        stripe_id=data["id"], provisioned_at=now or timezone.now()
    )
    stripe_meter.refresh_from_db()
    return stripe_meter


def meters_provision(*, now: datetime | None = None) -> list[StripeMeter]:
    return [
        meter_provision(stripe_meter=link, now=now)
        for link in StripeMeter.objects.select_related("meter").filter(stripe_id="")
    ]


# --- The outbox (stream mode) -------------------------------------------------------------------


def event_identifier(event_id: int) -> str:
    """The meter event's identifier: our event's id, so every resend is the same event."""
    return OutboxEvent(event_id=event_id).identifier


def outbox_record(*, organisation: Organisation, events: list[StoredEvent]) -> int:
    """Queue the stored events of stream-mode meters; called inside the storing transaction."""
    streamed = streamed_meter_ids()
    chosen = [event for event in events if event.meter.pk in streamed]
    if not chosen:
        return 0
    ids = [event.id for event in chosen]
    # The time range lets PostgreSQL read only the months' partitions the events are in.
    earliest = connection.ops.adapt_datetimefield_value(min(event.timestamp for event in chosen))
    latest = connection.ops.adapt_datetimefield_value(max(event.timestamp for event in chosen))
    # Copied in SQL from the rows just stored: a third of the cost of building model instances
    # for bulk_create, on the ingestion path (bench/stripe_outbox.py).
    quote = connection.ops.quote_name
    columns = (
        "event_id, organisation_id, meter_id, quantity, "
        f"{quote('timestamp')}, state, attempts, next_attempt_at, claim, last_error, created_at"
    )
    now = connection.ops.adapt_datetimefield_value(timezone.now())
    with connection.cursor() as cursor:
        for start in range(0, len(ids), 900):  # within SQLite's limit of bound parameters
            chunk = ids[start : start + 900]
            cursor.execute(
                # Table and column names are ours, not input; the values are bound parameters.
                f"INSERT INTO {quote(OutboxEvent._meta.db_table)} ({columns}) "  # noqa: S608
                f"SELECT id, organisation_id, meter_id, quantity, {quote('timestamp')}, "
                f"%s, 0, %s, '', '', %s FROM {quote(UsageEvent._meta.db_table)} "
                f"WHERE {quote('timestamp')} >= %s AND {quote('timestamp')} <= %s "
                f"AND id IN ({', '.join(['%s'] * len(chunk))})",
                [MeterEventState.PENDING, now, now, earliest, latest, *chunk],
            )
    return len(ids)


@dataclass
class FlushReport:
    off: bool = False
    requests: int = 0
    sent: int = 0
    duplicates: int = 0
    retried: int = 0
    parked: int = 0
    expired: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if self.off:
            return "Stripe is off (no STRIPE_SECRET_KEY): the outbox keeps its rows."
        return (
            f"sent {self.sent} in {self.requests} request(s), duplicates {self.duplicates}, "
            f"to retry {self.retried}, parked {self.parked}, too old {len(self.expired)}"
        )


def retry_delay(attempts: int) -> timedelta:
    """Exponential back-off with jitter: half to all of base * 2**(attempts - 1), capped."""
    return backoff_delay(
        attempts, base=settings.STRIPE_RETRY_BASE, cap=settings.STRIPE_RETRY_CAP, jitter=(0.5, 1.0)
    )


def _due(now: datetime) -> QuerySet[OutboxEvent]:
    return OutboxEvent.objects.filter(
        Q(claimed_until__isnull=True) | Q(claimed_until__lte=now),
        state=MeterEventState.PENDING,
        next_attempt_at__lte=now,
    )


def _claim(*, now: datetime, limit: int) -> tuple[str, list[OutboxEvent]]:
    """Take up to `limit` due rows for this flusher until the lease ends.

    The UPDATE re-checks that each row is still unclaimed, so two flushers never hold the same
    row; on PostgreSQL SKIP LOCKED lets them take different rows without waiting.
    """
    claim = uuid.uuid4().hex
    with transaction.atomic():
        candidates = _due(now).order_by("next_attempt_at", "id")
        if connection.features.has_select_for_update_skip_locked:
            candidates = candidates.select_for_update(skip_locked=True)
        ids = list(candidates.values_list("id", flat=True)[:limit])
        _due(now).filter(id__in=ids).update(
            claim=claim, claimed_until=now + settings.STRIPE_FLUSH_LEASE
        )
    rows = list(
        # By id first: `claim` has no index (it is written for every row sent).
        OutboxEvent.objects.filter(id__in=ids, claim=claim)
        .select_related("organisation", "meter")
        .order_by("id")
    )
    return claim, rows


def _settle(claim: str, ids: Iterable[int], **fields: Any) -> int:
    """Write the outcome of rows this flusher still holds, and let go of them."""
    return OutboxEvent.objects.filter(claim=claim, id__in=list(ids)).update(
        claim="", claimed_until=None, **fields
    )


def outbox_flush(
    *, now: datetime | None = None, batch_size: int | None = None, max_batches: int | None = None
) -> FlushReport:
    """Send due outbox rows to Stripe's meter event stream, a batch per request.

    A 429, a 5xx or no answer puts the batch back with a back-off and ends this run; a batch the
    stream refuses is sent again event by event (v1), so that only the events Stripe refuses are
    parked. Rows held by a flusher that died are taken again when its lease ends.
    """
    report = FlushReport()
    if not gateway.enabled():
        report.off = True
        return report
    size = min(batch_size or settings.STRIPE_FLUSH_BATCH, 100)
    batches = 0
    while max_batches is None or batches < max_batches:
        # The real time of each batch (unless a test runs a clock of its own): a long run's
        # later claims must not carry a lease that has already ended.
        clock = now or timezone.now()
        claim, rows = _claim(now=clock, limit=size)
        if not rows:
            break
        batches += 1
        if not _flush_batch(claim, rows, now=clock, report=report):
            break
    return report


def _flush_batch(
    claim: str, rows: list[OutboxEvent], *, now: datetime, report: FlushReport
) -> bool:
    """Send one claimed batch; return whether the flush may go on with the next."""
    events: list[MeterEvent] = []
    oldest = now - settings.STRIPE_METER_EVENT_MAX_AGE
    too_old = [row for row in rows if row.timestamp < oldest]
    if too_old:
        _settle(
            claim,
            (row.pk for row in too_old),
            state=MeterEventState.EXPIRED,
            last_error="Older than Stripe's 35-day window for meter events; not sent.",
        )
        report.expired.extend(row.identifier for row in too_old)
        logger.warning("Stripe: %d meter event(s) too old to send", len(too_old))
    rows = [row for row in rows if row.timestamp >= oldest]
    if not rows:
        return True
    try:
        events = _meter_events(rows, now=now)
        report.requests += 1
        gateway.meter_events_stream(events)
    except stripe.StripeError as exc:
        # Not the events' fault when the customer or meter could not be made: back off too.
        if gateway.classify(exc) == "retry" or not events:
            _retry(claim, rows, now=now, error=gateway.describe(exc))
            report.retried += len(rows)
            report.errors.append(gateway.describe(exc))
            return False
        # The stream refused the request as a whole: find the events at fault one by one.
        return _flush_one_by_one(claim, rows, events, now=now, report=report)
    report.sent += _settle(
        claim, (row.pk for row in rows), state=MeterEventState.SENT, sent_at=now, last_error=""
    )
    return True


def _flush_one_by_one(
    claim: str,
    rows: list[OutboxEvent],
    events: list[MeterEvent],
    *,
    now: datetime,
    report: FlushReport,
) -> bool:
    for index, (row, event) in enumerate(zip(rows, events, strict=True)):
        try:
            report.requests += 1
            gateway.meter_event_create(event)
        except stripe.StripeError as exc:
            outcome = gateway.classify(exc)
            if outcome == "retry":
                _retry(claim, rows[index:], now=now, error=gateway.describe(exc))
                report.retried += len(rows) - index
                return False
            if outcome == "refused":
                _settle(
                    claim, [row.pk], state=MeterEventState.PARKED, last_error=gateway.describe(exc)
                )
                report.parked += 1
                continue
            report.duplicates += 1
        _settle(claim, [row.pk], state=MeterEventState.SENT, sent_at=now, last_error="")
        report.sent += 1
    return True


def _retry(claim: str, rows: list[OutboxEvent], *, now: datetime, error: str) -> None:
    # One delay for the batch: it goes back together, after Stripe had time to recover.
    attempts = max(row.attempts for row in rows) + 1
    OutboxEvent.objects.filter(claim=claim, id__in=[row.pk for row in rows]).update(
        claim="",
        claimed_until=None,
        attempts=F("attempts") + 1,
        next_attempt_at=now + retry_delay(attempts),
        last_error=error,
    )


def _meter_events(rows: list[OutboxEvent], *, now: datetime) -> list[MeterEvent]:
    customers = {
        org.pk: customer_ensure(organisation=org).stripe_id
        for org in {row.organisation for row in rows}
    }
    links = {
        link.meter_id: link
        for link in StripeMeter.objects.select_related("meter").filter(
            meter_id__in={row.meter_id for row in rows}
        )
    }
    for link in links.values():
        meter_provision(stripe_meter=link, now=now)
    return [
        MeterEvent(
            event_name=links[row.meter_id].event_name,
            identifier=row.identifier,
            customer=customers[row.organisation_id],
            value=_value(row.quantity),
            timestamp=row.timestamp,
        )
        for row in rows
    ]


def _value(quantity: Decimal) -> str:
    # "12.5", never "12.500000" or "1.25E+1".
    text = format(quantity.normalize(), "f")
    return text


def outbox_requeue(*, ids: Iterable[int], now: datetime | None = None) -> int:
    """Put parked rows back in line (staff fixed the cause)."""
    return OutboxEvent.objects.filter(id__in=list(ids), state=MeterEventState.PARKED).update(
        state=MeterEventState.PENDING, next_attempt_at=now or timezone.now(), attempts=0
    )


# --- Period summaries ---------------------------------------------------------------------------


def summary_identifier(*, invoice_id: int, meter_id: int) -> str:
    """The period's one meter event: the invoice and the meter, so it is sent once."""
    return f"meterline-inv-{invoice_id}-mtr-{meter_id}"


def period_summaries_record(*, now: datetime | None = None) -> int:
    """Queue one summary event per finalized invoice and period_summary meter, once.

    The value is the meter's total over the invoice's period, counted with the invoice's own
    cutoff (what the invoice billed). Invoices whose period ended before Stripe's 35-day window
    are not queued: Stripe would refuse them. Periods with nothing to report send nothing.
    """
    now = now or timezone.now()
    links = list(
        StripeMeter.objects.select_related("meter").filter(mode=StripeMeter.Mode.PERIOD_SUMMARY)
    )
    if not links:
        return 0
    invoices = list(
        Invoice.objects.filter(
            status__in=[Invoice.Status.FINALIZED, Invoice.Status.PAID],
            period_end__gt=now - settings.STRIPE_METER_EVENT_MAX_AGE,
        ).order_by("id")
    )
    queued = 0
    for link in links:
        done = set(
            PeriodSummaryEvent.objects.filter(
                meter=link.meter, invoice_id__in=[i.pk for i in invoices]
            ).values_list("invoice_id", flat=True)
        )
        # One query per (period, cutoff): a batch close gives many invoices the same of both.
        groups: dict[tuple[Period, datetime], list[Invoice]] = {}
        for invoice in invoices:
            if invoice.pk not in done:
                groups.setdefault((invoice.period, invoice.cutoff), []).append(invoice)
        for (period, cutoff), members in groups.items():
            totals = usage_totals(
                organisation_ids=[i.organisation_id for i in members],
                meter=link.meter,
                period=period,
                received_until=cutoff,
            )
            rows = [
                PeriodSummaryEvent(
                    invoice=invoice,
                    meter=link.meter,
                    organisation_id=invoice.organisation_id,
                    summary_id=summary_identifier(invoice_id=invoice.pk, meter_id=link.meter_id),
                    value=totals[invoice.organisation_id],
                    # The period's last whole second: inside it, whatever Stripe's rounding.
                    timestamp=period.end.replace(microsecond=0) - timedelta(seconds=1),
                    next_attempt_at=now,
                )
                for invoice in members
                if totals[invoice.organisation_id]
            ]
            # The unique (invoice, meter) constraint makes a concurrent second run a no-op.
            queued += len(PeriodSummaryEvent.objects.bulk_create(rows, ignore_conflicts=True))
    return queued


def period_summaries_send(*, now: datetime | None = None) -> FlushReport:
    """Send queued summary events through v1, one a call (a few per customer and period).

    Two senders at once may both send a row: Stripe keeps the first and answers the second
    "already exists", which counts as delivered.
    """
    report = FlushReport()
    if not gateway.enabled():
        report.off = True
        return report
    now = now or timezone.now()
    rows = (
        PeriodSummaryEvent.objects.filter(state=MeterEventState.PENDING, next_attempt_at__lte=now)
        .select_related("organisation", "meter")
        .order_by("id")
    )
    for row in rows:
        outcome = _summary_send(row, now=now, report=report)
        if outcome == "retry":
            break
    return report


def _summary_send(row: PeriodSummaryEvent, *, now: datetime, report: FlushReport) -> str:
    pending = PeriodSummaryEvent.objects.filter(pk=row.pk, state=MeterEventState.PENDING)
    if row.timestamp < now - settings.STRIPE_METER_EVENT_MAX_AGE:
        pending.update(state=MeterEventState.EXPIRED, last_error="Older than 35 days; not sent.")
        report.expired.append(row.identifier)
        return "expired"
    try:
        link = meter_provision(stripe_meter=StripeMeter.objects.get(meter=row.meter), now=now)
        report.requests += 1
        gateway.meter_event_create(
            MeterEvent(
                event_name=link.event_name,
                identifier=row.identifier,
                customer=customer_ensure(organisation=row.organisation).stripe_id,
                value=_value(row.value),
                timestamp=row.timestamp,
            )
        )
    except stripe.StripeError as exc:
        outcome = gateway.classify(exc)
        if outcome == "retry":
            pending.update(
                attempts=F("attempts") + 1,
                next_attempt_at=now + retry_delay(row.attempts + 1),
                last_error=gateway.describe(exc),
            )
            report.retried += 1
            report.errors.append(gateway.describe(exc))
            return "retry"
        if outcome == "refused":
            pending.update(state=MeterEventState.PARKED, last_error=gateway.describe(exc))
            report.parked += 1
            return "refused"
        report.duplicates += 1
    pending.update(state=MeterEventState.SENT, sent_at=now, last_error="")
    report.sent += 1
    return "sent"


# --- Reconciliation -----------------------------------------------------------------------------


class NotRepairable(ValueError):  # noqa: N818 - reads as what the difference is
    pass


def difference_repair(
    *, difference: Difference, period: Period, now: datetime | None = None
) -> str:
    """Send what Stripe lacks for one customer, meter and period as one meter event.

    Stripe has no list of the meter events it kept, so the missing quantity is sent, not the
    missing events. Its identifier names the customer, meter, period and what Stripe had: a
    second repair of the same state is the same event (Stripe deduplicates), and after Stripe
    counted it there is nothing left to repair. Stripe counting more than we do, or a period
    past Stripe's 35-day window, cannot be repaired this way and is refused.
    """
    now = now or timezone.now()
    if difference.missing <= 0:
        raise NotRepairable("Stripe counts more than we do: cancel its extra events there.")
    timestamp = min(period.end.replace(microsecond=0) - timedelta(seconds=1), now)
    if timestamp < now - settings.STRIPE_METER_EVENT_MAX_AGE or timestamp < period.start:
        raise NotRepairable("The period is outside Stripe's 35-day window for meter events.")
    identifier = (
        f"meterline-fix-{difference.organisation.pk}-{difference.stripe_meter.meter_id}-"
        f"{gateway.unix(period.start)}-{gateway.unix(period.end)}-{_value(difference.stripe)}"
    )
    event = MeterEvent(
        event_name=difference.stripe_meter.event_name,
        identifier=identifier,
        customer=difference.stripe_customer,
        value=_value(difference.missing),
        timestamp=timestamp,
    )
    try:
        gateway.meter_event_create(event)
    except stripe.StripeError as exc:
        if gateway.classify(exc) != "duplicate":
            raise
    return identifier


# --- Invoices (Meterline invoices, Stripe collects) ---------------------------------------------


class InvoiceNotPushable(ValueError):  # noqa: N818 - reads as the state of the invoice
    pass


def invoice_push(*, invoice: Invoice, now: datetime | None = None) -> StripeInvoice:
    """Push a finalized invoice to Stripe: one invoice item per line, then finalize it there.

    Every call carries an idempotency key built from our ids, so a push that died half-way is
    simply run again: Stripe answers the calls it already did with their first answers.
    """
    if invoice.status not in (Invoice.Status.FINALIZED, Invoice.Status.PAID):
        raise InvoiceNotPushable(f"{invoice} is {invoice.status}: only finalized invoices go.")
    now = now or timezone.now()
    pushed, _ = StripeInvoice.objects.get_or_create(invoice=invoice)
    if pushed.finalized_at is not None:
        return pushed
    customer = customer_ensure(organisation=invoice.organisation).stripe_id
    currency = invoice.currency.lower()
    if pushed.stripe_id:
        # A push that died after creating the Stripe invoice: go on with it (Stripe forgets
        # idempotency keys after 24 hours, so the lines it has are looked up, not re-sent).
        draft_id = pushed.stripe_id
        current = gateway.invoice_retrieve(stripe_id=draft_id)
        if current["status"] != "draft":  # finalized there before the crash: record it
            StripeInvoice.objects.filter(pk=pushed.pk).update(
                stripe_status=current["status"], finalized_at=now, last_error=""
            )
            pushed.refresh_from_db()
            return pushed
        done = gateway.invoice_line_ids(stripe_id=draft_id)
    else:
        draft_id = _stripe_invoice_create(invoice, pushed, customer=customer)
        done = set()
    for line in invoice.lines.order_by("position"):
        if str(line.pk) in done:
            continue
        start = line.usage_start or invoice.period_start
        end = line.usage_end or invoice.period_end
        gateway.invoice_item_create(
            params={
                "customer": customer,
                "invoice": draft_id,
                # Integer minor units, as stored: Stripe's amounts are minor units too.
                "amount": line.amount_minor,
                "currency": currency,
                "description": line.description,
                "period": {"start": gateway.unix(start), "end": gateway.unix(end)},
                "metadata": {"meterline_invoice_line_id": str(line.pk)},
            },
            idempotency_key=f"meterline-invoice-line:{line.pk}",
        )
    finalized = gateway.invoice_finalize(
        stripe_id=draft_id, idempotency_key=f"meterline-invoice-finalize:{invoice.pk}"
    )
    if finalized.get("total") != invoice.total_minor:
        # Stripe added something (tax, a discount): ours is the invoice of record; say so.
        logger.warning(
            "Stripe invoice %s totals %s, ours %s",
            draft_id,
            finalized.get("total"),
            invoice.total_minor,
        )
    StripeInvoice.objects.filter(pk=pushed.pk).update(
        stripe_status=finalized.get("status") or "", finalized_at=now, last_error=""
    )
    pushed.refresh_from_db()
    return pushed


def _stripe_invoice_create(invoice: Invoice, pushed: StripeInvoice, *, customer: str) -> str:
    """Create the Stripe draft and store its id at once, before any item goes in."""
    currency = invoice.currency.lower()
    due_in = (
        (invoice.due_at - invoice.issued_at).days if invoice.due_at and invoice.issued_at else 30
    )
    draft = gateway.invoice_create(
        params={
            "customer": customer,
            "currency": currency,
            # Meterline sent the invoice (and its PDF); Stripe collects it by its due date.
            "collection_method": "send_invoice",
            "days_until_due": max(due_in, 0),
            "auto_advance": False,
            # Only the items below: never other pending items of the customer.
            "pending_invoice_items_behavior": "exclude",
            "description": f"Invoice {invoice.number}",
            "metadata": {"meterline_invoice_id": str(invoice.pk), "number": invoice.number or ""},
        },
        idempotency_key=f"meterline-invoice:{invoice.pk}",
    )
    StripeInvoice.objects.filter(pk=pushed.pk).update(stripe_id=draft["id"])
    return str(draft["id"])


def invoices_push(*, now: datetime | None = None) -> tuple[int, list[str]]:
    """Push every finalized invoice not yet finalized at Stripe; return the count and errors.

    An invoice Stripe refuses keeps its error for staff and is tried again on the next run.
    """
    if not (settings.STRIPE_PUSH_INVOICES and gateway.enabled()):
        return 0, []
    waiting = Invoice.objects.filter(status=Invoice.Status.FINALIZED).exclude(
        pk__in=StripeInvoice.objects.filter(finalized_at__isnull=False).values("invoice_id")
    )
    pushed, errors = 0, []
    for invoice in waiting.select_related("organisation").order_by("id"):
        try:
            invoice_push(invoice=invoice, now=now)
        except stripe.StripeError as exc:
            StripeInvoice.objects.filter(invoice=invoice).update(last_error=gateway.describe(exc))
            errors.append(f"{invoice}: {gateway.describe(exc)}")
            if gateway.classify(exc) == "retry":
                break
        else:
            pushed += 1
    return pushed, errors


# --- Webhooks -----------------------------------------------------------------------------------


def webhook_handle(*, event_id: str, event_type: str, obj: dict[str, Any]) -> bool:
    """Act on one Stripe event once; return False for a delivery already handled.

    Runs in dj-stripe's webhook transaction: if anything fails, the event is not recorded as
    handled and Stripe's next delivery tries again.
    """
    _, created = WebhookEventSeen.objects.get_or_create(
        stripe_event_id=event_id, defaults={"type": event_type}
    )
    if not created:
        return False
    match event_type:
        case "invoice.paid":
            _invoice_paid(obj)
        case "invoice.payment_failed":
            _invoice_payment_failed(obj)
        case "customer.created" | "customer.updated":
            _customer_changed(obj)
        case "customer.deleted":
            # The organisation gets a new customer the next time one is needed.
            StripeCustomer.objects.filter(stripe_id=obj["id"]).delete()
    return True


def _pushed(obj: dict[str, Any]) -> StripeInvoice | None:
    pushed = StripeInvoice.objects.filter(stripe_id=obj["id"]).first()
    ours = (obj.get("metadata") or {}).get("meterline_invoice_id")
    if pushed is None and ours and str(ours).isdigit():
        # A push that died before storing Stripe's id: the invoice says whose it is.
        pushed = StripeInvoice.objects.filter(invoice_id=int(ours), stripe_id=None).first()
        if pushed is not None:
            StripeInvoice.objects.filter(pk=pushed.pk).update(stripe_id=obj["id"])
    return pushed


def _invoice_paid(obj: dict[str, Any]) -> None:
    pushed = _pushed(obj)
    if pushed is None:
        return  # not one of ours (Stripe invoicing from its meters, say)
    paid_at = obj.get("status_transitions", {}).get("paid_at")
    StripeInvoice.objects.filter(pk=pushed.pk).update(
        stripe_status="paid",
        paid_at=datetime.fromtimestamp(paid_at, tz=UTC) if paid_at else timezone.now(),
    )
    # Only the status moves on a finalized invoice; a conditional update is idempotent.
    Invoice.objects.filter(pk=pushed.invoice_id, status=Invoice.Status.FINALIZED).update(
        status=Invoice.Status.PAID
    )


def _invoice_payment_failed(obj: dict[str, Any]) -> None:
    pushed = _pushed(obj)
    if pushed is None:
        return
    attempts = int(obj.get("attempt_count") or 0)
    retry_at = obj.get("next_payment_attempt")
    note = f"Payment attempt {attempts} failed"
    if retry_at:
        note += f"; Stripe retries at {datetime.fromtimestamp(retry_at, tz=UTC).isoformat()}"
    # Stripe's attempt count, not our own counter: a redelivered event changes nothing.
    StripeInvoice.objects.filter(pk=pushed.pk, payment_failures__lte=attempts).update(
        payment_failures=attempts, last_payment_error=note, stripe_status=obj.get("status") or ""
    )


def _customer_changed(obj: dict[str, Any]) -> None:
    fields = {"email": obj.get("email") or "", "name": obj.get("name") or ""}
    if StripeCustomer.objects.filter(stripe_id=obj["id"]).update(**fields):
        return
    organisation_id = (obj.get("metadata") or {}).get("meterline_organisation_id")
    if organisation_id and Organisation.objects.filter(pk=organisation_id).exists():
        # Created for one of our organisations (from the dashboard, say): link it if it has none.
        StripeCustomer.objects.get_or_create(
            organisation_id=int(organisation_id), defaults={"stripe_id": obj["id"], **fields}
        )
