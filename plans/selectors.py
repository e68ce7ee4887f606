"""Reads for plans: the subscription in force, its periods, its prices, and what usage costs.

`period_cost` is the one place usage meets prices: the portal's "cost so far", the admin's price
preview and (later) the period close all read it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.db.models import Q, QuerySet, Sum

from accounts.models import Organisation
from core.periods import Period, billing_period
from plans.models import CreditLedgerEntry, Price, PriceVersion, Subscription
from plans.pricing import PriceSpec, Quote, exact_sum, quote, scale
from usage.aggregation import QUANTUM, Aggregation, level_average
from usage.models import Meter
from usage.selectors import event_values, meter_level_at, usage_so_far


def subscription_active(*, organisation: Organisation, at: datetime) -> Subscription | None:
    """Return the organisation's subscription in force at `at`, if any."""
    return (
        Subscription.objects.select_related("plan", "organisation")
        .filter(organisation=organisation, start__lte=at)
        .filter(Q(end__isnull=True) | Q(end__gt=at))
        .order_by("-start")
        .first()
    )


def subscription_period(*, subscription: Subscription, at: datetime) -> Period:
    """Return the billing period of `subscription` that contains `at`."""
    _, period = billing_period(
        subscription.anchor, at, subscription.tzinfo, subscription.plan.months
    )
    return period


def subscription_previous_period(*, subscription: Subscription, at: datetime) -> Period:
    current = subscription_period(subscription=subscription, at=at)
    return subscription_period(
        subscription=subscription, at=current.start - timedelta(microseconds=1)
    )


@dataclass(frozen=True)
class PriceInForce:
    price: Price
    version: PriceVersion

    @property
    def meter(self) -> Meter:
        return self.price.meter


def price_catalogue(*, subscriptions: list[Subscription]) -> dict[int, list[Price]]:
    """Every price (plan's and overrides, versions loaded) of many subscriptions, in 2 queries."""
    prices = list(
        Price.objects.filter(
            Q(plan__in={s.plan_id for s in subscriptions})
            | Q(subscription__in=[s.pk for s in subscriptions])
        )
        .select_related("meter")
        .prefetch_related("versions")
    )
    return {
        s.pk: [p for p in prices if p.plan_id == s.plan_id or p.subscription_id == s.pk]
        for s in subscriptions
    }


def prices_in_force(
    *, subscription: Subscription, period: Period, prices: list[Price] | None = None
) -> list[PriceInForce]:
    """Return, per meter, the version in force for `period`: the subscription's override if
    one applies, else the plan's. A version applies to periods starting at or after its
    `effective_from`. `prices` is this subscription's entry of a `price_catalogue`."""
    if prices is None:
        prices = price_catalogue(subscriptions=[subscription])[subscription.pk]
    chosen: dict[int, PriceInForce] = {}
    for price in sorted(prices, key=lambda p: p.is_override):  # overrides last: they win
        versions = [v for v in price.versions.all() if v.effective_from <= period.start]
        if versions:
            version = max(versions, key=lambda v: v.effective_from)
            chosen[price.meter_id] = PriceInForce(price, version)
    return sorted(chosen.values(), key=lambda p: p.meter.code)


@dataclass(frozen=True)
class MeterCost:
    """One priced meter over one period: usage and cost so far, and where they are heading."""

    meter: Meter
    price: Price
    version: PriceVersion
    spec: PriceSpec
    usage: Decimal
    cost: Quote
    projected_usage: Decimal
    projected_cost: Quote
    projection: str


@dataclass(frozen=True)
class PeriodCost:
    subscription: Subscription
    period: Period
    as_of: datetime
    base_fee: Decimal
    lines: list[MeterCost]

    @property
    def is_closed(self) -> bool:
        return self.as_of >= self.period.end

    @property
    def total(self) -> Decimal:
        """Cost so far, unrounded: the base fee (due for the period) plus usage charges."""
        return exact_sum([self.base_fee, *(line.cost.amount for line in self.lines)])

    @property
    def projected_total(self) -> Decimal:
        return exact_sum([self.base_fee, *(line.projected_cost.amount for line in self.lines)])


def period_cost(
    *,
    subscription: Subscription,
    period: Period,
    as_of: datetime | None = None,
    candidates: Mapping[int, PriceSpec] | None = None,
    received_until: datetime | None = None,
    prices: list[Price] | None = None,
    known_usage: Mapping[int, Decimal] | None = None,
    known_levels: Mapping[int, Decimal] | None = None,
) -> PeriodCost:
    """Price a subscription's usage over `period`, counting events before `as_of`.

    `as_of` defaults to the period's end (a whole period). `candidates` maps meter ids to specs
    to price with instead of the ones in force (the admin's "what if" preview).
    `received_until` counts only events received by then (the period close's cutoff).
    A batch (period close, alert evaluation) passes what it read for many subscriptions at once:
    `prices` (from `price_catalogue`) and `known_usage` (meter id -> `usage_so_far` at `as_of`,
    the whole period's value when `as_of` is the end) and `known_levels` (meter id ->
    `meter_level_at` at `as_of`, for projecting `weighted_sum` meters).
    """
    as_of = min(as_of or period.end, period.end)
    organisation = subscription.organisation
    lines = []
    for in_force in prices_in_force(subscription=subscription, period=period, prices=prices):
        meter = in_force.meter
        spec = (candidates or {}).get(meter.pk) or in_force.version.parsed
        lines.append(
            _meter_cost(
                organisation=organisation,
                in_force=in_force,
                spec=spec,
                period=period,
                as_of=as_of,
                received_until=received_until,
                known=(known_usage or {}).get(meter.pk),
                level=(known_levels or {}).get(meter.pk),
            )
        )
    return PeriodCost(subscription, period, as_of, subscription.plan.base_fee, lines)


def _meter_cost(
    *,
    organisation: Organisation,
    in_force: PriceInForce,
    spec: PriceSpec,
    period: Period,
    as_of: datetime,
    received_until: datetime | None,
    known: Decimal | None = None,
    level: Decimal | None = None,
) -> MeterCost:
    meter = in_force.meter
    if known is None:
        known = usage_so_far(
            organisation=organisation,
            meter=meter,
            period=period,
            as_of=as_of,
            received_until=received_until,
        )
    # A sum whose corrections outweigh its usage bills nothing, not a credit.
    usage = max(known, Decimal(0))
    elapsed = Decimal((as_of - period.start) / (period.end - period.start))
    values = None
    if spec.needs_events:
        values = list(
            event_values(
                organisation=organisation,
                meter=meter,
                period=Period(period.start, as_of),
                received_until=received_until,
            )
            if as_of > period.start
            else []
        )
    cost = quote(spec, usage, values)
    if as_of >= period.end:
        return MeterCost(
            meter, in_force.price, in_force.version, spec, usage, cost, usage, cost, "final"
        )

    # How each aggregation projects to the period's end:
    aggregation = meter.spec.aggregation
    if spec.needs_events:
        # Per-event prices: the charge so far at its run rate (events keep arriving as they have).
        factor = 1 / elapsed if elapsed else Decimal(0)
        projected_cost = scale(spec, cost, factor) if elapsed else cost
        return MeterCost(
            meter,
            in_force.price,
            in_force.version,
            spec,
            usage,
            cost,
            (usage * factor).quantize(QUANTUM, ROUND_HALF_UP) if elapsed else usage,
            projected_cost,
            "run rate of charges so far",
        )
    if aggregation in (Aggregation.COUNT, Aggregation.SUM):
        # Counts and sums grow with time: usage so far at its run rate over the whole period.
        projected = (usage / elapsed).quantize(QUANTUM, ROUND_HALF_UP) if elapsed else usage
        method = "run rate"
    elif aggregation == Aggregation.WEIGHTED_SUM:
        # A level holds until changed: what accrued so far plus the current level to the end.
        if level is None:
            level = meter_level_at(organisation=organisation, meter=meter, instant=as_of)
        remaining = Period(as_of, period.end)
        projected = usage + level_average(level * remaining.microseconds, period)
        method = "current level held to period end"
    elif aggregation == Aggregation.LATEST:
        # The last reading is the bill if nothing changes: the current value.
        projected = usage
        method = "current value"
    else:
        # A peak or a distinct count only grows by new highs or new values, which cannot be
        # foreseen: the figure so far is the projection (a floor).
        projected = usage
        method = "so far (cannot be extrapolated)"
    return MeterCost(
        meter,
        in_force.price,
        in_force.version,
        spec,
        usage,
        cost,
        projected,
        quote(spec, projected, None),
        method,
    )


def credit_balance(*, organisation: Organisation, currency: str, at: datetime) -> int:
    """Return the credit (minor units) usable at `at`: ledger entries up to then, of grants in
    force and not expired."""
    total = (
        CreditLedgerEntry.objects.filter(
            grant__organisation=organisation, grant__currency=currency, at__lte=at
        )
        .filter(grant__effective_from__lte=at)
        .filter(Q(grant__expires_at__isnull=True) | Q(grant__expires_at__gt=at))
        .aggregate(total=Sum("amount_minor"))["total"]
    )
    return int(total or 0)


def credit_ledger(*, organisation: Organisation) -> QuerySet[CreditLedgerEntry]:
    return (
        CreditLedgerEntry.objects.filter(grant__organisation=organisation)
        .select_related("grant")
        .order_by("-at", "-id")
    )
