"""django-q2 entry points: thin, taking ids or ISO instants, each calling one service."""

from __future__ import annotations

from datetime import datetime

from django.utils import timezone

from invoices.models import Invoice
from invoices.services import periods_close
from plans.services import credits_expire


def _as_of(intended_date: str | None) -> datetime:
    # The schedule's intended run time, not the moment a worker got to it: a late or repeated
    # run closes with the same cutoff as a punctual one.
    return datetime.fromisoformat(intended_date) if intended_date else timezone.now()


def close_due_periods(intended_date: str | None = None) -> str:
    summary = periods_close(as_of=_as_of(intended_date))
    return f"closed {summary.closed}, already closed {summary.already}"


def expire_credits(intended_date: str | None = None) -> str:
    return f"expired {credits_expire(as_of=_as_of(intended_date))} grant(s)"


def invoice_document_render(invoice_id: int) -> None:
    from invoices.documents import invoice_document_create

    invoice_document_create(invoice=Invoice.objects.get(pk=invoice_id))


def invoice_documents_render(invoice_ids: list[int]) -> None:
    from invoices.documents import invoice_document_create

    for invoice in Invoice.objects.filter(pk__in=invoice_ids).order_by("pk"):
        invoice_document_create(invoice=invoice)
