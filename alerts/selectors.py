"""Reads of alerts: what each rule sees now, the banners to show, the rules and their history.

`rules_observe` is the evaluation's reading half: for a batch of organisations it loads their
subscriptions and prices in a few queries, usage in one query per (period, meter) for all of
them, and prices it in memory with `plans.selectors.period_cost`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.conf import settings
from django.db.models import Q, QuerySet

from accounts.models import Organisation
from alerts.models import AlertFiring, AlertRule, AlertThreshold
from core.periods import Period
from plans.models import Subscription
from plans.pricing import PriceSpec, Quote, included_units
from plans.selectors import (
    PeriodCost,
    period_cost,
    price_catalogue,
    prices_in_force,
    subscription_period,
)
from usage.aggregation import Aggregation
from usage.models import Meter
from usage.selectors import meter_levels_at, usage_so_far_totals

# Aggregations whose value ingestion can re-read cheaply (an index-only count or sum), so their
# rules are also checked right after events are stored.
INGEST_CHECKED = frozenset({Aggregation.COUNT, Aggregation.SUM})


# organisation id -> (monotonic expiry, meter ids): each process's own copy, asked on every
# ingestion request, so it costs no query and no cache round trip while fresh.
_INGEST_METERS: dict[int, tuple[float, frozenset[int]]] = {}


def ingest_rules_cache_clear(organisation_id: int | None = None) -> None:
    """Forget what ingestion checks (one organisation's, or all): this process sees a rule
    change at once, others within ALERTS_RULE_CACHE_SECONDS."""
    if organisation_id is None:
        _INGEST_METERS.clear()
    else:
        _INGEST_METERS.pop(organisation_id, None)


def ingest_checked_meters(organisation_id: int) -> frozenset[int]:
    """Meter ids whose new events may cross one of the organisation's rules cheaply (usage or
    cost of a count/sum meter). Cached briefly per process: ingestion asks on every request."""
    now = time.monotonic()
    cached = _INGEST_METERS.get(organisation_id)
    if cached is not None and cached[0] > now:
        return cached[1]
    rows = AlertRule.objects.filter(
        organisation_id=organisation_id,
        is_active=True,
        metric__in=[AlertRule.Metric.USAGE, AlertRule.Metric.COST],
        meter__aggregation__in=[a.value for a in INGEST_CHECKED],
    ).values_list("meter_id", flat=True)
    meters = frozenset(meter_id for meter_id in rows if meter_id is not None)
    _INGEST_METERS[organisation_id] = (now + settings.ALERTS_RULE_CACHE_SECONDS, meters)
    return meters


@dataclass(frozen=True)
class Observation:
    """What one rule sees now: the value, its unit, and the allowance percentages refer to."""

    rule: AlertRule
    period: Period
    value: Decimal
    unit: str
    allowance: Decimal | None


def rules_observe(*, rules: list[AlertRule], as_of: datetime) -> list[Observation]:
    by_organisation: dict[int, list[AlertRule]] = defaultdict(list)
    for rule in rules:
        by_organisation[rule.organisation_id].append(rule)  # type: ignore[index]
    subscriptions = _subscriptions_at(list(by_organisation), as_of)
    catalogue = price_catalogue(subscriptions=list(subscriptions.values()))
    periods = {
        org_id: subscription_period(subscription=s, at=as_of) for org_id, s in subscriptions.items()
    }

    # Which meters each organisation's rules need: the watched meter, or every priced meter for
    # an invoice-total rule.
    needed: dict[int, set[int]] = {}
    meters: dict[int, Meter] = {}
    for org_id, subscription in subscriptions.items():
        wanted: set[int] = set()
        for rule in by_organisation[org_id]:
            if rule.meter_id is not None:
                wanted.add(rule.meter_id)
                meters[rule.meter_id] = rule.meter  # type: ignore[assignment]
            else:
                for price in catalogue[subscription.pk]:
                    wanted.add(price.meter_id)
                    meters[price.meter_id] = price.meter
        needed[org_id] = wanted

    usage, levels = _usage_so_far(needed, periods, meters, as_of)
    observations = []
    for org_id, subscription in subscriptions.items():
        period = periods[org_id]
        prices = [p for p in catalogue[subscription.pk] if p.meter_id in needed[org_id]]
        org_rules = by_organisation[org_id]
        cost: PeriodCost | None = None
        if any(rule.is_money for rule in org_rules):
            cost = period_cost(
                subscription=subscription,
                period=period,
                as_of=as_of,
                prices=prices,
                known_usage=usage[org_id],
                known_levels=levels[org_id],
            )
        in_force = {
            p.meter.pk: p.version.parsed
            for p in prices_in_force(subscription=subscription, period=period, prices=prices)
        }
        for rule in org_rules:
            if cost is not None and rule.is_money:
                observations.append(_money_observation(rule, cost, subscription.plan.currency))
            else:
                observations.append(_usage_observation(rule, period, usage[org_id], in_force))
    return observations


def _subscriptions_at(organisation_ids: list[int], at: datetime) -> dict[int, Subscription]:
    subscriptions = (
        Subscription.objects.select_related("plan", "organisation")
        .filter(organisation_id__in=organisation_ids, start__lte=at)
        .filter(Q(end__isnull=True) | Q(end__gt=at))
        .order_by("start")
    )
    return {s.organisation_id: s for s in subscriptions}  # the latest start wins


def _usage_so_far(
    needed: dict[int, set[int]],
    periods: dict[int, Period],
    meters: dict[int, Meter],
    as_of: datetime,
) -> tuple[dict[int, dict[int, Decimal]], dict[int, dict[int, Decimal]]]:
    """usage_so_far for every needed (organisation, meter), and the current level of level
    meters (for their projection): one query per (period, meter) for all organisations sharing
    that period, two more for a weighted_sum meter."""
    usage: dict[int, dict[int, Decimal]] = defaultdict(dict)
    levels: dict[int, dict[int, Decimal]] = defaultdict(dict)
    groups: dict[tuple[Period, int], list[int]] = defaultdict(list)
    for org_id, meter_ids in needed.items():
        for meter_id in meter_ids:
            groups[(periods[org_id], meter_id)].append(org_id)
    for (period, meter_id), org_ids in groups.items():
        meter = meters[meter_id]
        values = usage_so_far_totals(
            organisation_ids=org_ids, meter=meter, period=period, as_of=as_of
        )
        for org_id in org_ids:
            usage[org_id][meter_id] = values[org_id]
        if meter.spec.aggregation == Aggregation.WEIGHTED_SUM:
            at = meter_levels_at(organisation_ids=org_ids, meter=meter, instant=as_of)
            for org_id in org_ids:
                levels[org_id][meter_id] = at[org_id]
    return usage, levels


def _usage_observation(
    rule: AlertRule, period: Period, usage: dict[int, Decimal], in_force: dict[int, PriceSpec]
) -> Observation:
    meter = rule.meter
    assert meter is not None  # noqa: S101 - a constraint: usage rules have a meter
    spec = in_force.get(meter.pk)
    allowance = included_units(spec) if spec is not None else None
    return Observation(rule, period, usage.get(meter.pk, Decimal(0)), meter.unit, allowance)


def _spend(quote: Quote) -> Decimal:
    """What usage has cost: after discounts and caps, before a minimum's true-up (which would
    put every price at its minimum from the first day)."""
    return quote.amount - quote.true_up


def _money_observation(rule: AlertRule, cost: PeriodCost, currency: str) -> Observation:
    projected = rule.metric == AlertRule.Metric.PROJECTED_COST
    allowance: Decimal | None
    if rule.meter_id is None:
        quotes = [line.projected_cost if projected else line.cost for line in cost.lines]
        value = cost.base_fee + sum((_spend(q) for q in quotes), Decimal(0))
        # The commitment of the whole invoice: the base fee plus each price's minimum.
        minimums = [line.spec.minimum_amount or Decimal(0) for line in cost.lines]
        allowance = cost.base_fee + sum(minimums, Decimal(0))
    else:
        line = next((line for line in cost.lines if line.meter.pk == rule.meter_id), None)
        if line is None:  # the meter is not priced on this plan: it costs nothing
            return Observation(rule, cost.period, Decimal(0), currency, None)
        value = _spend(line.projected_cost if projected else line.cost)
        allowance = line.spec.minimum_amount
    return Observation(rule, cost.period, value, currency, allowance or None)


def threshold_limit(threshold: AlertThreshold, allowance: Decimal | None) -> Decimal | None:
    """The threshold in the rule's unit, or None when a percentage has nothing to refer to."""
    if threshold.kind == AlertThreshold.Kind.ABSOLUTE:
        return threshold.value
    if not allowance:
        return None
    return allowance * threshold.value / 100


def rules_of(*, organisation: Organisation) -> QuerySet[AlertRule]:
    return (
        AlertRule.objects.filter(organisation=organisation)
        .select_related("meter")
        .prefetch_related("thresholds")
    )


def banners_active(*, organisation: Organisation, limit: int = 5) -> list[AlertFiring]:
    """Unacknowledged firings of rules that show a banner, newest first."""
    return list(
        AlertFiring.objects.filter(
            organisation=organisation, acknowledged_at__isnull=True, rule__show_banner=True
        )
        .select_related("rule__meter", "threshold")
        .order_by("-fired_at", "-id")[:limit]
    )


def firings_of(*, organisation: Organisation, limit: int = 50) -> list[AlertFiring]:
    return list(
        AlertFiring.objects.filter(organisation=organisation)
        .select_related("rule__meter", "threshold")
        .prefetch_related("deliveries")
        .order_by("-fired_at", "-id")[:limit]
    )


@dataclass(frozen=True)
class ThresholdStatus:
    threshold: AlertThreshold
    limit: Decimal | None  # None: a percentage of an allowance the plan does not have
    firing: AlertFiring | None  # fired in the current period

    @property
    def state(self) -> str:
        if self.firing is not None:
            return "fired"
        if self.limit is None:
            return "no allowance"
        return "armed"


@dataclass(frozen=True)
class RuleStatus:
    """A rule as its owner sees it: the value now and where each threshold stands."""

    rule: AlertRule
    observation: Observation | None  # None without a subscription (no period)
    thresholds: list[ThresholdStatus]

    @property
    def crossed_unfired(self) -> list[ThresholdStatus]:
        """Thresholds the value is past but that have not fired yet (the next evaluation
        fires them)."""
        if self.observation is None:
            return []
        value = self.observation.value
        return [
            t
            for t in self.thresholds
            if t.firing is None and t.limit is not None and value >= t.limit
        ]


def rule_statuses(*, organisation: Organisation, as_of: datetime) -> list[RuleStatus]:
    rules = list(rules_of(organisation=organisation))
    observed = {o.rule.pk: o for o in rules_observe(rules=rules, as_of=as_of)}
    periods = {o.period.start for o in observed.values()}
    firings = {
        (f.rule_id, f.threshold_id): f
        for f in AlertFiring.objects.filter(organisation=organisation, period_start__in=periods)
    }
    statuses = []
    for rule in rules:
        observation = observed.get(rule.pk)
        thresholds = [
            ThresholdStatus(
                t,
                threshold_limit(t, observation.allowance) if observation else None,
                firings.get((rule.pk, t.pk)) if observation else None,
            )
            for t in rule.thresholds.all()
        ]
        statuses.append(RuleStatus(rule, observation, thresholds))
    return statuses
