"""Writes for plans, prices (as versions) and subscriptions."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from accounts.models import Organisation
from core.periods import billing_period
from plans.models import (
    CreditGrant,
    CreditLedgerEntry,
    Plan,
    Price,
    PriceVersion,
    Subscription,
)
from usage.models import Meter

# The first version of a plan price applies to every period, however old.
BEGINNING = datetime(2000, 1, 1, tzinfo=UTC)


def plan_create(
    *,
    code: str,
    name: str,
    currency: str = "USD",
    interval: str = Plan.Interval.MONTH,
    base_fee: Decimal = Decimal(0),
    description: str = "",
) -> Plan:
    plan = Plan(
        code=code,
        name=name,
        currency=currency.upper(),
        interval=interval,
        base_fee=base_fee,
        description=description,
    )
    plan.full_clean()
    plan.save()
    return plan


@transaction.atomic
def price_set(
    *,
    meter: Meter,
    spec: Mapping[str, Any],
    plan: Plan | None = None,
    subscription: Subscription | None = None,
    description: str | None = None,
    effective_from: datetime | None = None,
    note: str = "",
    created_by: User | None = None,
    now: datetime | None = None,
) -> PriceVersion:
    """Give `meter` a price on a plan, or on one subscription (an override), as a new version.

    Versions are never edited. By default a new version applies from the next period: for a
    plan price, from now (each subscription's current period started earlier and keeps the old
    version); for an override, from the start of the subscription's next period. The first
    version of a plan price applies to every period. A version may not be backdated.
    """
    if (plan is None) == (subscription is None):
        raise ValueError("A price belongs to a plan or to a subscription, not both.")
    now = now or timezone.now()
    price, _ = Price.objects.select_for_update().get_or_create(
        plan=plan, subscription=subscription, meter=meter
    )
    if description is not None and description != price.description:
        price.description = description
        price.save(update_fields=["description"])
    first = not price.versions.exists()
    if effective_from is None:
        if subscription is not None:
            _, current = billing_period(
                subscription.anchor, now, subscription.tzinfo, subscription.plan.months
            )
            effective_from = current.end
        else:
            effective_from = BEGINNING if first else now
    elif not first and effective_from < now:
        raise ValidationError(
            {"effective_from": "A new version cannot be backdated; billed periods keep theirs."}
        )
    version = PriceVersion(
        price=price,
        spec=dict(spec),
        effective_from=effective_from,
        note=note,
        created_by=created_by,
    )
    version.full_clean()
    version.save()
    return version


def subscription_create(
    *,
    organisation: Organisation,
    plan: Plan,
    start: datetime | None = None,
    anchor: datetime | None = None,
) -> Subscription:
    """Put an organisation on a plan; periods step from `anchor` (default: the start)."""
    start = start or timezone.now()
    if plan.currency != organisation.currency:
        raise ValidationError(
            {
                "plan": f"The plan bills in {plan.currency}; {organisation} pays in "
                f"{organisation.currency}."
            }
        )
    subscription = Subscription(
        organisation=organisation,
        plan=plan,
        start=start,
        anchor=anchor or start,
        timezone=organisation.timezone,
    )
    subscription.full_clean()
    subscription.save()
    return subscription


def subscription_end(*, subscription: Subscription, at: datetime | None = None) -> Subscription:
    subscription.end = at or timezone.now()
    subscription.status = Subscription.Status.ENDED
    subscription.full_clean()
    subscription.save(update_fields=["end", "status"])
    return subscription


def credit_grant_create(
    *,
    organisation: Organisation,
    amount_minor: int,
    currency: str,
    category: str = CreditGrant.Category.PROMOTIONAL,
    priority: int = 100,
    effective_from: datetime | None = None,
    expires_at: datetime | None = None,
    description: str = "",
    created_by: User | None = None,
) -> CreditGrant:
    """Grant credit in the organisation's own currency (another currency is refused)."""
    if currency.upper() != organisation.currency:
        raise ValidationError(
            {"currency": f"{organisation} is billed in {organisation.currency}, not {currency}."}
        )
    with transaction.atomic():
        grant = CreditGrant(
            organisation=organisation,
            amount_minor=amount_minor,
            currency=currency.upper(),
            category=category,
            priority=priority,
            effective_from=effective_from or timezone.now(),
            expires_at=expires_at,
            description=description,
            created_by=created_by,
        )
        grant.full_clean()
        grant.save()
        CreditLedgerEntry.objects.create(
            grant=grant,
            kind=CreditLedgerEntry.Kind.GRANT,
            amount_minor=amount_minor,
            at=grant.effective_from,
        )
    return grant


def credits_expire(*, organisation: Organisation | None = None, as_of: datetime) -> int:
    """Write an expiry entry for every grant that expired by `as_of` with a balance left."""
    grants = CreditGrant.objects.filter(expires_at__lte=as_of)
    if organisation is not None:
        grants = grants.filter(organisation=organisation)
    expired = 0
    with transaction.atomic():
        locked = list(grants.select_for_update())
        balances = _balances([grant.pk for grant in locked])
        for grant in locked:
            balance = balances.get(grant.pk, 0)
            if balance > 0 and grant.expires_at is not None:
                CreditLedgerEntry.objects.create(
                    grant=grant,
                    kind=CreditLedgerEntry.Kind.EXPIRE,
                    amount_minor=-balance,
                    at=grant.expires_at,
                )
                expired += 1
    return expired


def credits_apply(
    *, organisation: Organisation, currency: str, amount_minor: int, at: datetime, reference: str
) -> list[tuple[CreditGrant, int]]:
    """Use credit for up to `amount_minor`: by priority, then the soonest expiry, then the oldest.

    Run inside the caller's transaction (the invoice's finalization); grants are locked, so two
    invoices cannot spend the same credit. Returns what each grant gave.
    """
    credits_expire(organisation=organisation, as_of=at)
    remaining = amount_minor
    applied: list[tuple[CreditGrant, int]] = []
    if remaining <= 0:
        return applied
    grants = (
        CreditGrant.objects.select_for_update()
        .filter(organisation=organisation, currency=currency, effective_from__lte=at)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=at))
        .order_by("priority", F("expires_at").asc(nulls_last=True), "effective_from", "id")
    )
    locked = list(grants)
    balances = _balances([grant.pk for grant in locked])
    for grant in locked:
        if remaining == 0:
            break
        use = min(balances.get(grant.pk, 0), remaining)
        if use <= 0:
            continue
        CreditLedgerEntry.objects.create(
            grant=grant,
            kind=CreditLedgerEntry.Kind.APPLY,
            amount_minor=-use,
            at=at,
            reference=reference,
        )
        applied.append((grant, use))
        remaining -= use
    return applied


def _balances(grant_ids: list[int]) -> dict[int, int]:
    """Each grant's balance: the sum of its ledger entries (a separate query: PostgreSQL allows
    no FOR UPDATE with GROUP BY)."""
    rows = (
        CreditLedgerEntry.objects.filter(grant__in=grant_ids)
        .values("grant")
        .annotate(balance=Sum("amount_minor"))
        .values_list("grant", "balance")
    )
    return {grant: int(balance) for grant, balance in rows}
