"""Plans, their prices per meter (versioned), subscriptions and per-customer price overrides."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models

from accounts.models import Organisation, validate_currency, validate_timezone
from plans.pricing import PriceSpec, PriceSpecError, parse_price_spec
from usage.models import Meter


class Plan(models.Model):
    class Interval(models.TextChoices):
        MONTH = "month", "Monthly"
        YEAR = "year", "Yearly"

    code = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    currency = models.CharField(max_length=3, default="USD", validators=[validate_currency])
    interval = models.CharField(max_length=8, choices=Interval.choices, default=Interval.MONTH)
    # The recurring fee per period, in currency units at full precision (rounded on the invoice).
    base_fee = models.DecimalField(max_digits=24, decimal_places=12, default=0)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(base_fee__gte=0), name="plan_base_fee_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(interval__in=["month", "year"]), name="plan_interval_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.code})"

    @property
    def months(self) -> int:
        return 12 if self.interval == self.Interval.YEAR else 1


class Subscription(models.Model):
    """An organisation on a plan. Periods step from `anchor` in `timezone`."""

    class Status(models.TextChoices):
        ACTIVE = "active", "Active"
        ENDED = "ended", "Ended"

    organisation = models.ForeignKey(
        Organisation, on_delete=models.PROTECT, related_name="subscriptions"
    )
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    # Periods are [anchor + k months, anchor + k+1 months) in `timezone`, stored in UTC.
    anchor = models.DateTimeField()
    start = models.DateTimeField()
    end = models.DateTimeField(null=True, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.ACTIVE)
    # Copied from the organisation at creation, so that a later change there does not move the
    # boundaries of periods already billed.
    timezone = models.CharField(max_length=64, validators=[validate_timezone])
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organisation"],
                condition=models.Q(status="active"),
                name="subscription_one_active_per_organisation",
            ),
            models.CheckConstraint(
                condition=models.Q(end__isnull=True) | models.Q(end__gt=models.F("start")),
                name="subscription_ends_after_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.organisation} on {self.plan.code}"

    @property
    def tzinfo(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class Price(models.Model):
    """What one meter costs: on a plan for everyone, or on one subscription as an override.

    The spec lives in versions: a version is never edited, an edit is a new version.
    """

    plan = models.ForeignKey(
        Plan, null=True, blank=True, on_delete=models.CASCADE, related_name="prices"
    )
    subscription = models.ForeignKey(
        Subscription, null=True, blank=True, on_delete=models.CASCADE, related_name="overrides"
    )
    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="+")
    description = models.CharField(max_length=200, blank=True, help_text="Shown on invoices.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(plan__isnull=False, subscription__isnull=True)
                | models.Q(plan__isnull=True, subscription__isnull=False),
                name="price_on_plan_or_subscription",
            ),
            models.UniqueConstraint(
                fields=["plan", "meter"],
                condition=models.Q(plan__isnull=False),
                name="price_one_per_plan_meter",
            ),
            models.UniqueConstraint(
                fields=["subscription", "meter"],
                condition=models.Q(subscription__isnull=False),
                name="price_one_override_per_subscription_meter",
            ),
        ]

    def __str__(self) -> str:
        owner = self.plan.code if self.plan else f"override for {self.subscription}"
        return f"{self.meter.code} on {owner}"

    @property
    def is_override(self) -> bool:
        return self.subscription_id is not None

    @property
    def label(self) -> str:
        return self.description or self.meter.name


class PriceVersion(models.Model):
    """One price spec, in force for periods that start at or after `effective_from`."""

    price = models.ForeignKey(Price, on_delete=models.CASCADE, related_name="versions")
    spec = models.JSONField()
    effective_from = models.DateTimeField()
    note = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["price", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["price", "effective_from"], name="price_version_unique_instant"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.price} from {self.effective_from:%Y-%m-%d %H:%M}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise ValueError("Price versions are never edited; add a new version instead.")
        super().save(*args, **kwargs)

    def clean(self) -> None:
        try:
            parse_price_spec(self.spec)
        except PriceSpecError as exc:
            raise ValidationError({"spec": f"{exc.field}: {exc.message}"}) from exc

    @property
    def parsed(self) -> PriceSpec:
        return parse_price_spec(self.spec)


class CreditGrant(models.Model):
    """Credit given to an organisation, used up by invoices until it runs out or expires.

    Its balance is the sum of its ledger entries; nothing here is updated after creation.
    """

    class Category(models.TextChoices):
        PAID = "paid", "Paid (prepaid by the customer)"
        PROMOTIONAL = "promotional", "Promotional"

    organisation = models.ForeignKey(
        Organisation, on_delete=models.PROTECT, related_name="credit_grants"
    )
    currency = models.CharField(max_length=3, validators=[validate_currency])
    # Integer minor units of `currency` (cents for USD, yen for JPY).
    amount_minor = models.BigIntegerField()
    category = models.CharField(max_length=12, choices=Category.choices)
    # Lower numbers are used first; among equals, the soonest expiry.
    priority = models.PositiveSmallIntegerField(default=100)
    effective_from = models.DateTimeField()
    expires_at = models.DateTimeField(null=True, blank=True)
    description = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["priority", "expires_at", "effective_from", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(amount_minor__gt=0), name="credit_grant_amount_positive"
            ),
            models.CheckConstraint(
                condition=models.Q(expires_at__isnull=True)
                | models.Q(expires_at__gt=models.F("effective_from")),
                name="credit_grant_expires_after_start",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.amount_minor} {self.currency} minor units for {self.organisation}"


class CreditLedgerEntry(models.Model):
    """One movement of a grant's balance: granted, applied to an invoice, or expired."""

    class Kind(models.TextChoices):
        GRANT = "grant", "Granted"
        APPLY = "apply", "Applied to an invoice"
        EXPIRE = "expire", "Expired"

    grant = models.ForeignKey(CreditGrant, on_delete=models.PROTECT, related_name="entries")
    kind = models.CharField(max_length=8, choices=Kind.choices)
    # Minor units: positive when granted, negative when applied or expired.
    amount_minor = models.BigIntegerField()
    at = models.DateTimeField()
    # The invoice number an application went to.
    reference = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "credit ledger entries"
        ordering = ["at", "id"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(kind="grant", amount_minor__gt=0)
                | (~models.Q(kind="grant") & models.Q(amount_minor__lt=0)),
                name="credit_entry_sign_matches_kind",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.amount_minor} @ {self.at:%Y-%m-%d}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise ValueError("The credit ledger is append-only.")
        super().save(*args, **kwargs)
