"""Billing periods, invoices with their lines, invoice numbers and credit notes.

Amounts charged are integer minor units of the invoice's currency; each line also keeps its
exact, unrounded amount and the engine's breakdown, so every figure can be explained.
"""

from __future__ import annotations

from typing import Any

from django.db import models

from accounts.models import Organisation
from core.periods import Period
from plans.models import PriceVersion, Subscription
from usage.models import Meter


class BillingPeriod(models.Model):
    """One stored period `[start, end)` of a subscription, UTC, stepped from its anchor."""

    subscription = models.ForeignKey(
        Subscription, on_delete=models.PROTECT, related_name="billing_periods"
    )
    start = models.DateTimeField()
    end = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["subscription", "start"]
        constraints = [
            models.UniqueConstraint(
                fields=["subscription", "start"], name="billing_period_unique_start"
            ),
            models.CheckConstraint(
                condition=models.Q(end__gt=models.F("start")), name="billing_period_not_empty"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.subscription}: {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}"

    @property
    def period(self) -> Period:
        return Period(self.start, self.end)


class Invoice(models.Model):
    class Status(models.TextChoices):
        DRAFT = "draft", "Draft"
        FINALIZED = "finalized", "Finalized"
        PAID = "paid", "Paid"
        VOID = "void", "Void"

    organisation = models.ForeignKey(Organisation, on_delete=models.PROTECT, related_name="+")
    subscription = models.ForeignKey(Subscription, on_delete=models.PROTECT, related_name="+")
    # One invoice per billing period, by this constraint: the close is exactly-once.
    billing_period = models.OneToOneField(
        BillingPeriod, on_delete=models.PROTECT, related_name="invoice"
    )
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    currency = models.CharField(max_length=3)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.DRAFT)
    # INV-2026-000123: gapless per year, allocated under a row lock at finalization.
    number = models.CharField(max_length=32, unique=True, null=True, blank=True)
    # Events received up to this instant are billed here; later arrivals become adjustments.
    cutoff = models.DateTimeField()
    issued_at = models.DateTimeField(null=True, blank=True)
    due_at = models.DateTimeField(null=True, blank=True)
    # Minor units: subtotal is the sum of the rounded non-credit lines; total = subtotal - credits.
    subtotal_minor = models.BigIntegerField(default=0)
    credits_minor = models.BigIntegerField(default=0)
    total_minor = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-period_start", "-id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(credits_minor__gte=0), name="invoice_credits_not_negative"
            ),
            models.CheckConstraint(
                condition=models.Q(
                    total_minor=models.F("subtotal_minor") - models.F("credits_minor")
                ),
                name="invoice_total_adds_up",
            ),
        ]

    def __str__(self) -> str:
        return self.number or f"draft invoice {self.pk or '(preview)'}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        # Once finalized, only the status moves on (paid, void); corrections are credit notes.
        if getattr(self, "_stored_status", self.Status.DRAFT) != self.Status.DRAFT and set(
            kwargs.get("update_fields") or ["*"]
        ) != {"status"}:
            raise ValueError("A finalized invoice never changes; issue a credit note instead.")
        super().save(*args, **kwargs)
        self._stored_status = self.status

    @classmethod
    def from_db(cls, db: Any, field_names: Any, values: Any) -> Invoice:
        instance = super().from_db(db, field_names, values)
        instance._stored_status = instance.status
        return instance

    @property
    def period(self) -> Period:
        return Period(self.period_start, self.period_end)


class InvoiceLine(models.Model):
    class Kind(models.TextChoices):
        BASE_FEE = "base_fee", "Base fee"
        USAGE = "usage", "Usage"
        TRUE_UP = "true_up", "Minimum commitment true-up"
        ADJUSTMENT = "adjustment", "Late usage adjustment"
        CREDIT = "credit", "Credit"

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="lines")
    position = models.PositiveSmallIntegerField()
    kind = models.CharField(max_length=12, choices=Kind.choices)
    description = models.CharField(max_length=300)
    meter = models.ForeignKey(
        Meter, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    price_version = models.ForeignKey(
        PriceVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The period whose usage this line bills: the invoice's own, or an earlier one for a late
    # adjustment.
    usage_start = models.DateTimeField(null=True, blank=True)
    usage_end = models.DateTimeField(null=True, blank=True)
    quantity = models.DecimalField(max_digits=24, decimal_places=6, default=0)
    unit = models.CharField(max_length=32, blank=True)
    # Exact amount from the engine (6-place quantity x 12-place price: up to 18 places).
    amount_exact = models.DecimalField(max_digits=40, decimal_places=18)
    # Rounded once, half-up, to the currency's minor unit; the invoice adds these up.
    amount_minor = models.BigIntegerField()
    breakdown = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["invoice", "position"]
        constraints = [
            models.UniqueConstraint(fields=["invoice", "position"], name="invoice_line_position"),
        ]

    def __str__(self) -> str:
        return f"{self.description}: {self.amount_minor}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise ValueError("Invoice lines are never changed; issue a credit note instead.")
        super().save(*args, **kwargs)


class InvoiceNumberSequence(models.Model):
    """The last number used in a series (INV, CN) and year; locked while the next is taken."""

    prefix = models.CharField(max_length=8)
    year = models.PositiveSmallIntegerField()
    last_number = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["prefix", "year"], name="number_sequence_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}-{self.year}: {self.last_number}"


class CreditNote(models.Model):
    """A correction to a finalized invoice, which itself never changes."""

    invoice = models.ForeignKey(Invoice, on_delete=models.PROTECT, related_name="credit_notes")
    number = models.CharField(max_length=32, unique=True)
    amount_minor = models.BigIntegerField()
    reason = models.CharField(max_length=300)
    issued_at = models.DateTimeField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(amount_minor__gt=0), name="credit_note_amount_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.number} for {self.invoice}"


class InvoiceDocument(models.Model):
    """The PDF of a finalized invoice, rendered once and served from here."""

    invoice = models.OneToOneField(Invoice, on_delete=models.CASCADE, related_name="document")
    pdf = models.BinaryField()
    rendered_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"PDF of {self.invoice}"
