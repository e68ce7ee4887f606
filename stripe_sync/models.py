"""What Meterline knows about Stripe: links to Stripe objects, the meter-event outbox and pushes.

Stripe ids are plain strings here, not foreign keys to dj-stripe's mirror: the outbox must work
before (and without) any Stripe object being mirrored.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.db import models

from accounts.models import Organisation
from invoices.models import Invoice
from usage.models import Meter, UsageEvent


class StripeCustomer(models.Model):
    """The Stripe customer an organisation is billed as: created on demand, or linked by staff."""

    organisation = models.OneToOneField(
        Organisation, on_delete=models.CASCADE, related_name="stripe_customer"
    )
    stripe_id = models.CharField(max_length=255, unique=True)
    # As last heard from Stripe (customer.updated), for staff to recognise the customer.
    email = models.CharField(max_length=254, blank=True)
    name = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name = "Stripe customer"

    def __str__(self) -> str:
        return f"{self.organisation} = {self.stripe_id}"


class StripeMeter(models.Model):
    """How one of our meters reaches Stripe: its Billing Meter and the mode of sending usage."""

    class Mode(models.TextChoices):
        # Every event is sent (through the outbox); only for count and sum meters, whose
        # period value is the sum of the events' quantities.
        STREAM = "stream", "Stream every event"
        # One event per subscription and period, with the period's total, at close.
        PERIOD_SUMMARY = "period_summary", "One summary event per period"

    meter = models.OneToOneField(Meter, on_delete=models.CASCADE, related_name="stripe_meter")
    mode = models.CharField(max_length=16, choices=Mode.choices, default=Mode.STREAM)
    # The Stripe Billing Meter's event name: ours, prefixed, so it never clashes in the account.
    event_name = models.CharField(max_length=100, unique=True)
    # Empty until provisioned (no key yet): the outbox keeps the events meanwhile.
    stripe_id = models.CharField(max_length=255, blank=True, default="")
    provisioned_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "Stripe meter"
        constraints = [
            models.CheckConstraint(
                condition=models.Q(mode__in=["stream", "period_summary"]),
                name="stripe_meter_mode_valid",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.meter.code} -> {self.stripe_id or '(not provisioned)'} ({self.mode})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self.event_name:  # added in the admin, which shows it read-only
            self.event_name = f"meterline_{self.meter.code}"
        super().save(*args, **kwargs)
        from stripe_sync.selectors import streamed_meter_cache_clear

        streamed_meter_cache_clear()

    def clean(self) -> None:
        # Only these add up event by event (a max or latest meter streamed would be summed),
        # and only without filters (every stored event is streamed, filtered out or not).
        if self.mode != self.Mode.STREAM:
            return
        if self.meter.aggregation not in ("count", "sum"):
            raise ValidationError(
                f"{self.meter.code} aggregates by {self.meter.aggregation}: only count and sum "
                "meters can stream events; use period_summary."
            )
        if self.meter.filters:
            raise ValidationError(
                f"{self.meter.code} has filters: only meters without filters can stream events; "
                "use period_summary."
            )


class MeterEventState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    # Refused by Stripe (a 4xx other than a duplicate): kept, with the error, for staff.
    PARKED = "parked", "Parked"
    # Older than Stripe's 35-day window when its turn came: not sent, reported.
    EXPIRED = "expired", "Too old for Stripe"


class Delivery(models.Model):
    """Where a meter event stands on its way to Stripe."""

    state = models.CharField(
        max_length=8, choices=MeterEventState.choices, default=MeterEventState.PENDING
    )
    attempts = models.PositiveIntegerField(default=0)
    # Not to be tried before this instant (back-off after 429, 5xx, no answer).
    next_attempt_at = models.DateTimeField()
    last_error = models.TextField(blank=True, default="")
    sent_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        abstract = True

    def __str__(self) -> str:
        return f"{self.identifier} ({self.state})"

    @property
    def identifier(self) -> str:
        raise NotImplementedError


class OutboxEvent(Delivery):
    """One usage event waiting to be (or already) sent to Stripe as a meter event.

    Written in the transaction that stores the usage event, so it exists exactly when the event
    does. `identifier` is built from the event's id: Stripe deduplicates on it, so a resend after
    a crash is harmless.
    """

    # No database constraint: the events table is partitioned on PostgreSQL (usage.partitions),
    # and a foreign key can only reference a unique key, which there includes the timestamp.
    event = models.OneToOneField(
        UsageEvent, on_delete=models.CASCADE, related_name="+", db_constraint=False
    )
    # Copies of the event's own (so the flush needs no join); neither indexed nor constrained,
    # since the event's foreign keys already hold them, and each index or constraint check is
    # paid once per ingested event.
    organisation = models.ForeignKey(
        Organisation,
        on_delete=models.DO_NOTHING,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    meter = models.ForeignKey(
        Meter, on_delete=models.DO_NOTHING, related_name="+", db_index=False, db_constraint=False
    )
    quantity = models.DecimalField(max_digits=24, decimal_places=6)
    # The usage event's own time: Stripe attributes the meter event to it.
    timestamp = models.DateTimeField()
    # A flusher holds the row until this instant; after it, another flusher may take it.
    claimed_until = models.DateTimeField(null=True, blank=True)
    claim = models.CharField(max_length=32, blank=True, default="")

    class Meta:
        indexes = [
            models.Index(
                fields=["next_attempt_at", "id"],
                condition=models.Q(state="pending"),
                name="stripe_outbox_due",
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(state__in=[s.value for s in MeterEventState]),
                name="stripe_outbox_state_valid",
            ),
        ]

    @property
    def identifier(self) -> str:
        # Built from the event's id (unique already), so it needs no column of its own: Stripe
        # deduplicates on it, and a resend is the same event.
        return f"meterline-evt-{self.event_id}"


class PeriodSummaryEvent(Delivery):
    """The one meter event of a period_summary meter for one invoice (subscription period)."""

    invoice = models.ForeignKey(Invoice, on_delete=models.CASCADE, related_name="+")
    meter = models.ForeignKey(Meter, on_delete=models.CASCADE, related_name="+")
    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="+")
    # Stripe deduplicates on it: the invoice and the meter (see services.summary_identifier).
    summary_id = models.CharField(max_length=100, unique=True)
    # The period's value as billed (the invoice line's quantity).
    value = models.DecimalField(max_digits=24, decimal_places=6)
    # Inside the period (its last second), so Stripe counts it in the same period.
    timestamp = models.DateTimeField()

    class Meta:
        constraints = [
            # Exactly once per (invoice, meter), whatever runs twice.
            models.UniqueConstraint(fields=["invoice", "meter"], name="stripe_summary_once"),
        ]

    @property
    def identifier(self) -> str:
        return self.summary_id


class StripeInvoice(models.Model):
    """A finalized invoice of ours pushed to Stripe for collection, and what Stripe said since."""

    invoice = models.OneToOneField(Invoice, on_delete=models.CASCADE, related_name="+")
    stripe_id = models.CharField(max_length=255, unique=True, null=True, blank=True)
    # Stripe's status as last heard (draft, open, paid, uncollectible, void).
    stripe_status = models.CharField(max_length=16, blank=True, default="")
    finalized_at = models.DateTimeField(null=True, blank=True)
    paid_at = models.DateTimeField(null=True, blank=True)
    payment_failures = models.PositiveIntegerField(default=0)
    last_payment_error = models.TextField(blank=True, default="")
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "Stripe invoice"

    def __str__(self) -> str:
        return f"{self.invoice} -> {self.stripe_id or '(not pushed)'}"


class WebhookEventSeen(models.Model):
    """A Stripe event id our handlers acted on: Stripe delivers more than once."""

    stripe_event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    handled_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.type} {self.stripe_event_id}"
