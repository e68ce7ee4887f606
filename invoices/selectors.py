"""Reads for invoices: an organisation's invoices, one invoice with its lines, late events."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.models import Organisation
from invoices.models import Invoice


def invoice_list(*, organisation: Organisation) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organisation=organisation).order_by("-period_start", "-id")


def invoice_get(*, organisation: Organisation, pk: int) -> Invoice:
    """Return the organisation's invoice `pk` with its lines; Invoice.DoesNotExist otherwise."""
    return (
        Invoice.objects.select_related("organisation", "subscription__plan")
        .prefetch_related("lines__meter", "credit_notes")
        .get(organisation=organisation, pk=pk)
    )
