"""Staff review invoices (read-only: finalized invoices never change) and issue credit notes."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from invoices.documents import invoice_document_create, invoice_render_html
from invoices.models import BillingPeriod, CreditNote, Invoice, InvoiceLine
from invoices.services import invoice_preview
from plans.models import Subscription


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
        "document_links",
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

    @admin.display(description="Document")
    def document_links(self, invoice: Invoice) -> str:
        html = reverse("admin:invoices_invoice_html", args=[invoice.pk])
        pdf = reverse("admin:invoices_invoice_pdf", args=[invoice.pk])
        return format_html('<a href="{}">HTML</a> · <a href="{}">PDF</a>', html, pdf)

    def get_urls(self) -> list[URLPattern]:
        return [
            path(
                "<int:pk>/html/",
                self.admin_site.admin_view(self.html_view),
                name="invoices_invoice_html",
            ),
            path(
                "<int:pk>/pdf/",
                self.admin_site.admin_view(self.pdf_view),
                name="invoices_invoice_pdf",
            ),
            path(
                "upcoming/<int:subscription_pk>/",
                self.admin_site.admin_view(self.upcoming_view),
                name="invoices_invoice_upcoming",
            ),
            *super().get_urls(),
        ]

    def html_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        invoice = get_object_or_404(Invoice, pk=pk)
        return HttpResponse(invoice_render_html(invoice))

    def upcoming_view(self, request: HttpRequest, subscription_pk: int) -> HttpResponse:
        """The subscription's open period as a draft invoice, rendered now (nothing stored)."""
        subscription = get_object_or_404(
            Subscription.objects.select_related("plan", "organisation"), pk=subscription_pk
        )
        draft = invoice_preview(subscription=subscription, at=timezone.now())
        return HttpResponse(invoice_render_html(draft))

    def pdf_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """The stored PDF of a finalized invoice (rendered and stored now if the task has not
        run yet)."""
        invoice = get_object_or_404(Invoice, pk=pk)
        pdf = bytes(invoice_document_create(invoice=invoice).pdf)
        response = HttpResponse(pdf, content_type="application/pdf")
        response["Content-Disposition"] = f'inline; filename="{invoice.number}.pdf"'
        return response


@admin.register(BillingPeriod)
class BillingPeriodAdmin(admin.ModelAdmin[BillingPeriod]):
    list_display = ["subscription", "start", "end", "created_at"]
    readonly_fields = ["subscription", "start", "end"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False
