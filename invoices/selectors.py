"""Reads for invoices: an organisation's invoices, one invoice with its lines, late events."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Max, QuerySet

from accounts.models import Organisation
from invoices.models import Invoice
from plans.models import Subscription
from usage.models import UsageEvent


def invoice_list(*, organisation: Organisation) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organisation=organisation).order_by("-period_start", "-id")


def invoice_get(*, organisation: Organisation, pk: int) -> Invoice:
    """Return the organisation's invoice `pk` with its lines; Invoice.DoesNotExist otherwise."""
    return (
        Invoice.objects.select_related("organisation", "subscription__plan")
        .prefetch_related("lines__meter", "credit_notes")
        .get(organisation=organisation, pk=pk)
    )


def archive_blockers(*, before: datetime) -> list[str]:
    """Why usage events before `before` may not be archived yet (empty: they may).

    Every subscription's periods holding an instant before `before` must be invoiced (not a
    draft), and each late event dated before it must already be billed as an adjustment
    (received before its organisation's last cutoff): otherwise a close still needs the raw
    events.
    """
    blockers = []
    invoiced = dict(
        Invoice.objects.exclude(status=Invoice.Status.DRAFT)
        .values("subscription")
        .annotate(end=Max("period_end"))
        .values_list("subscription", "end")
    )
    subscriptions = Subscription.objects.filter(start__lt=before).select_related("organisation")
    for subscription in subscriptions.order_by("id"):
        needed = before if subscription.end is None else min(before, subscription.end)
        through = invoiced.get(subscription.pk)
        if through is None or through < needed:
            blockers.append(
                f"{subscription.organisation.slug}: subscription {subscription.pk} is invoiced "
                f"only up to {through.isoformat() if through else 'nothing'}, "
                f"events before {needed.isoformat()} are still to bill"
            )
    drafts = Invoice.objects.filter(status=Invoice.Status.DRAFT, period_start__lt=before)
    for invoice in drafts.select_related("organisation").order_by("id"):
        blockers.append(f"{invoice.organisation.slug}: invoice {invoice.pk} is still a draft")
    cutoffs = dict(
        Invoice.objects.values("organisation")
        .annotate(at=Max("cutoff"))
        .values_list("organisation", "at")
    )
    # Late events reach a close through the `delayed` partial index: one row per organisation.
    latest_late = (
        UsageEvent.objects.filter(delayed=True, timestamp__lt=before)
        .filter(organisation_id__in=subscriptions.values("organisation_id"))
        .order_by()
        .values("organisation_id")
        .annotate(at=Max("received_at"))
        .values_list("organisation_id", "at")
    )
    waiting = [
        organisation_id
        for organisation_id, received in latest_late
        if cutoffs.get(organisation_id) is None or received > cutoffs[organisation_id]
    ]
    slugs = dict(Organisation.objects.filter(pk__in=waiting).values_list("pk", "slug"))
    for organisation_id in sorted(slugs):
        blockers.append(
            f"{slugs[organisation_id]}: late events dated before {before.isoformat()} are not "
            "billed yet (the next close bills them)"
        )
    return blockers
