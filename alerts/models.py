"""Alert rules, their thresholds, and the record of each threshold crossed and each notification.

Exactly once is carried by two constraints: a threshold fires at most once per period
(`AlertFiring` unique on rule, threshold and period start) and each firing has one delivery per
channel and target (`AlertDelivery` unique on firing, channel, target), created in the same
transaction as the firing. Sending is recorded apart from firing: a failed send is retried from
its delivery row, never by firing again.
"""

from __future__ import annotations

import secrets

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from accounts.models import Organisation
from plans.models import Plan
from usage.models import Meter


def webhook_secret_new() -> str:
    return f"whsec_{secrets.token_urlsafe(24)}"


class AlertRule(models.Model):
    """What to watch, for an organisation (or, as a template, for every subscriber of a plan)."""

    class Metric(models.TextChoices):
        USAGE = "usage", "Usage in the current period"
        COST = "cost", "Cost so far in the current period"
        PROJECTED_COST = "projected_cost", "Projected cost at period end"

    # Exactly one of the two: an organisation's own rule, or a plan's default rule that is copied
    # to each organisation subscribing to the plan.
    organisation = models.ForeignKey(
        Organisation, on_delete=models.CASCADE, null=True, blank=True, related_name="alert_rules"
    )
    plan = models.ForeignKey(
        Plan, on_delete=models.CASCADE, null=True, blank=True, related_name="default_alert_rules"
    )
    name = models.CharField(max_length=200, blank=True)
    metric = models.CharField(max_length=16, choices=Metric.choices)
    # Usage rules name their meter; cost rules name one price's meter, or none for the invoice.
    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, null=True, blank=True)
    is_active = models.BooleanField(default=True)
    # Channels: any combination.
    email_to = models.JSONField(default=list, blank=True, help_text="Addresses to email.")
    webhook_url = models.URLField(max_length=500, blank=True)
    webhook_secret = models.CharField(max_length=64, default=webhook_secret_new, editable=False)
    show_banner = models.BooleanField(default=True, help_text="A portal banner until acknowledged.")
    # The plan rule this one was copied from, so a subscription copies each default once.
    copied_from = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="copies"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=Q(organisation__isnull=False, plan__isnull=True)
                | Q(organisation__isnull=True, plan__isnull=False),
                name="alertrule_organisation_or_plan",
            ),
            models.CheckConstraint(
                condition=~Q(metric="usage") | Q(meter__isnull=False),
                name="alertrule_usage_needs_meter",
            ),
            models.CheckConstraint(
                condition=Q(metric__in=["usage", "cost", "projected_cost"]),
                name="alertrule_metric_valid",
            ),
            models.UniqueConstraint(
                fields=["organisation", "copied_from"],
                condition=Q(copied_from__isnull=False),
                name="alertrule_default_copied_once",
            ),
        ]

    def __str__(self) -> str:
        return self.name or self.describe()

    def clean(self) -> None:
        if self.metric == self.Metric.USAGE and self.meter_id is None:
            raise ValidationError({"meter": "A usage rule watches one meter."})
        if (self.organisation_id is None) == (self.plan_id is None):
            raise ValidationError("A rule belongs to an organisation or to a plan, not both.")

    def describe(self) -> str:
        """The watched quantity, in words: "api_calls usage", "Cost of api_calls", "Projected
        invoice total"."""
        meter_name = self.meter.name if self.meter else ""
        if self.metric == self.Metric.USAGE:
            return f"{meter_name} usage"
        subject = f"cost of {meter_name}" if self.meter_id else "invoice total"
        prefix = "Projected " if self.metric == self.Metric.PROJECTED_COST else "Current "
        return prefix + subject

    @property
    def is_money(self) -> bool:
        return self.metric != self.Metric.USAGE


class AlertThreshold(models.Model):
    """One level of a rule: absolute (10,000 calls, 500 USD) or a percentage of what the plan
    includes (free units of the meter's price; for cost rules, the committed amount)."""

    class Kind(models.TextChoices):
        ABSOLUTE = "absolute", "Absolute"
        PERCENT = "percent", "Percent of the plan's allowance"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="thresholds")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    # Units for usage rules, currency units for cost rules, or a percentage.
    value = models.DecimalField(max_digits=24, decimal_places=6)

    class Meta:
        ordering = ["kind", "value"]
        constraints = [
            models.UniqueConstraint(fields=["rule", "kind", "value"], name="alertthreshold_unique"),
            models.CheckConstraint(condition=Q(value__gt=0), name="alertthreshold_positive"),
            models.CheckConstraint(
                condition=Q(kind__in=["absolute", "percent"]), name="alertthreshold_kind_valid"
            ),
        ]

    def __str__(self) -> str:
        value = self.value.normalize()
        return f"{value:f}%" if self.kind == self.Kind.PERCENT else f"{value:,f}"


class AlertFiring(models.Model):
    """A threshold crossed in a period: written once, whatever the number of evaluators."""

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="firings")
    threshold = models.ForeignKey(AlertThreshold, on_delete=models.CASCADE, related_name="firings")
    organisation = models.ForeignKey(
        Organisation, on_delete=models.CASCADE, related_name="alert_firings"
    )
    # The billing period it fired in, half-open [period_start, period_end), UTC.
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    # What was seen: the watched value, and the threshold in the same unit (a percentage resolved
    # against the allowance of that moment). Money in currency units at full precision.
    observed = models.DecimalField(max_digits=30, decimal_places=12)
    limit = models.DecimalField(max_digits=30, decimal_places=12)
    unit = models.CharField(max_length=32, help_text="The meter's unit or the currency code.")
    fired_at = models.DateTimeField()
    acknowledged_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-fired_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["rule", "threshold", "period_start"], name="alertfiring_once_per_period"
            ),
        ]
        indexes = [
            models.Index(
                fields=["organisation", "fired_at"],
                condition=Q(acknowledged_at__isnull=True),
                name="alertfiring_unacknowledged",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.rule} crossed {self.threshold} ({self.period_start:%Y-%m-%d})"


class AlertDelivery(models.Model):
    """One notification of one firing on one channel, retried until sent or given up."""

    class Channel(models.TextChoices):
        EMAIL = "email", "Email"
        WEBHOOK = "webhook", "Webhook"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        SENT = "sent", "Sent"
        FAILED = "failed", "Failed (gave up)"

    firing = models.ForeignKey(AlertFiring, on_delete=models.CASCADE, related_name="deliveries")
    channel = models.CharField(max_length=8, choices=Channel.choices)
    target = models.CharField(max_length=500, help_text="The address or URL.")
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["firing", "channel", "target"], name="alertdelivery_once_per_target"
            ),
        ]
        indexes = [
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="alertdelivery_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.channel} to {self.target}: {self.status}"


class DeliveryAttempt(models.Model):
    """Every try at sending, kept: when, how long, and what came back."""

    delivery = models.ForeignKey(AlertDelivery, on_delete=models.CASCADE, related_name="tries")
    at = models.DateTimeField()
    ok = models.BooleanField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    duration_ms = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {'ok' if self.ok else 'failed'}"
