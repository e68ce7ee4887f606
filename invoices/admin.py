"""Staff review invoices (read-only: finalized invoices never change) and issue credit notes."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from invoices.models import BillingPeriod, CreditNote, Invoice, InvoiceLine


class InvoiceLineInline(admin.TabularInline[InvoiceLine, Invoice]):
    model = InvoiceLine
    extra = 0
    can_delete = False
    fields = readonly_fields = (
        "position",
        "kind",
        "description",
        "quantity",
        "unit",
        "amount_exact",
        "amount_minor",
    )

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class CreditNoteInline(admin.TabularInline[CreditNote, Invoice]):
    model = CreditNote
    extra = 0
    can_delete = False
    fields = readonly_fields = ("number", "amount_minor", "reason", "issued_at")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Invoice)
class InvoiceAdmin(admin.ModelAdmin[Invoice]):
    list_display = [
        "number",
        "organisation",
        "period_start",
        "period_end",
        "status",
        "currency",
        "subtotal_minor",
        "credits_minor",
        "total_minor",
        "issued_at",
    ]
    list_filter = ["status", "currency"]
    search_fields = ["number", "organisation__name", "organisation__slug"]
    inlines = [InvoiceLineInline, CreditNoteInline]
    readonly_fields = [
        "organisation",
        "subscription",
        "billing_period",
        "period_start",
        "period_end",
        "currency",
        "status",
        "number",
        "cutoff",
        "issued_at",
        "due_at",
        "subtotal_minor",
        "credits_minor",
        "total_minor",
    ]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(BillingPeriod)
class BillingPeriodAdmin(admin.ModelAdmin[BillingPeriod]):
    list_display = ["subscription", "start", "end", "created_at"]
    readonly_fields = ["subscription", "start", "end"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
