"""Writes of alerts: rules, evaluation (thresholds fire once per period) and delivery.

`alerts_evaluate` reads a batch of organisations at a time: their rules, subscriptions and
prices in a handful of queries, usage in one query per (period, meter) for all of them, then
prices it with `plans.selectors.period_cost` in memory. A crossed threshold is written as an
`AlertFiring` together with its `AlertDelivery` rows in one transaction; the unique constraint on
(rule, threshold, period start) makes a second firing impossible, also between two evaluators.
`deliveries_send` sends what is due, records every attempt, and backs off on failure.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from babel.dates import format_date
from babel.numbers import format_currency, format_decimal
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import EmailMultiAlternatives
from django.db import IntegrityError, transaction
from django.template.loader import render_to_string
from django.utils import timezone

from accounts.models import Organisation
from alerts.models import AlertDelivery, AlertFiring, AlertRule, AlertThreshold, DeliveryAttempt
from alerts.selectors import (
    Observation,
    ingest_rules_cache_clear,
    rules_observe,
    threshold_limit,
)
from alerts.webhooks import signature_header
from core.backoff import backoff_delay
from plans.models import Plan, Subscription
from usage.models import Meter

# --- Rules -----------------------------------------------------------------------------------


def alert_rule_create(
    *,
    organisation: Organisation | None = None,
    plan: Plan | None = None,
    metric: str,
    thresholds: Sequence[tuple[str, Decimal]],
    meter: Meter | None = None,
    name: str = "",
    email_to: Sequence[str] = (),
    webhook_url: str = "",
    show_banner: bool = True,
) -> AlertRule:
    """Create a rule with its thresholds ((kind, value) pairs); ValidationError when invalid."""
    if not thresholds:
        raise ValidationError({"thresholds": "Give at least one threshold."})
    with transaction.atomic():
        rule = AlertRule(
            organisation=organisation,
            plan=plan,
            metric=metric,
            meter=meter,
            name=name,
            email_to=list(dict.fromkeys(email_to)),
            webhook_url=webhook_url,
            show_banner=show_banner,
        )
        rule.full_clean()
        rule.save()
        for kind, value in dict.fromkeys(thresholds):
            threshold = AlertThreshold(rule=rule, kind=kind, value=value)
            threshold.full_clean(exclude=["rule"])
            threshold.save()
    ingest_rules_forget(rule.organisation_id)
    return rule


def alert_rule_delete(*, rule: AlertRule) -> None:
    organisation_id = rule.organisation_id
    rule.delete()
    ingest_rules_forget(organisation_id)


def alert_rule_set_active(*, rule: AlertRule, active: bool) -> AlertRule:
    """Pause or resume a rule. A paused rule does not fire; resumed, it fires at the next
    evaluation for what it missed in the current period."""
    rule.is_active = active
    rule.save(update_fields=["is_active"])
    ingest_rules_forget(rule.organisation_id)
    return rule


def alert_rules_copy_defaults(*, subscription: Subscription) -> list[AlertRule]:
    """Give the subscriber its own copy of each of the plan's default rules (once per rule).

    The copy emails the organisation's billing address; the customer can change it after."""
    organisation = subscription.organisation
    copies = []
    templates = AlertRule.objects.filter(plan=subscription.plan).prefetch_related("thresholds")
    for template in templates:
        if AlertRule.objects.filter(organisation=organisation, copied_from=template).exists():
            continue
        try:
            with transaction.atomic():
                copy = alert_rule_create(
                    organisation=organisation,
                    metric=template.metric,
                    meter=template.meter,
                    name=template.name,
                    thresholds=[(t.kind, t.value) for t in template.thresholds.all()],
                    email_to=[organisation.billing_email] if organisation.billing_email else [],
                    show_banner=template.show_banner,
                )
                copy.copied_from = template
                copy.save(update_fields=["copied_from"])
        except IntegrityError:  # a concurrent copy of the same default won
            continue
        copies.append(copy)
    return copies


def alert_firing_acknowledge(*, firing: AlertFiring, at: datetime | None = None) -> AlertFiring:
    """Hide a firing's banner. Acknowledging twice keeps the first time."""
    AlertFiring.objects.filter(pk=firing.pk, acknowledged_at__isnull=True).update(
        acknowledged_at=at or timezone.now()
    )
    firing.refresh_from_db(fields=["acknowledged_at"])
    return firing


# --- Which organisations ingestion should check ------------------------------------------------


def ingest_rules_forget(organisation_id: int | None) -> None:
    if organisation_id is not None:
        ingest_rules_cache_clear(organisation_id)


# --- Evaluation ---------------------------------------------------------------------------------


@dataclass
class EvaluationSummary:
    organisations: int = 0
    rules: int = 0
    fired: list[int] = field(default_factory=list)  # AlertFiring ids written by this run

    def __str__(self) -> str:
        return (
            f"{self.rules} rule(s) of {self.organisations} organisation(s) evaluated, "
            f"{len(self.fired)} threshold(s) fired"
        )


def alerts_evaluate(
    *,
    as_of: datetime,
    organisation_ids: Iterable[int] | None = None,
    meter_ids: Iterable[int] | None = None,
    batch_size: int = 200,
    send: bool = True,
) -> EvaluationSummary:
    """Evaluate every active rule (or those of `organisation_ids`, watching `meter_ids`) at
    `as_of`, fire each newly crossed threshold once, and (after commit) send its notifications.
    """
    rules = AlertRule.objects.filter(is_active=True, organisation__isnull=False)
    if organisation_ids is not None:
        rules = rules.filter(organisation_id__in=list(organisation_ids))
    if meter_ids is not None:
        rules = rules.filter(meter_id__in=list(meter_ids))
    all_ids = sorted(set(rules.values_list("organisation_id", flat=True)))
    summary = EvaluationSummary()
    for offset in range(0, len(all_ids), batch_size):
        batch = all_ids[offset : offset + batch_size]
        observations = rules_observe(
            rules=list(
                rules.filter(organisation_id__in=batch)
                .select_related("meter", "organisation")
                .prefetch_related("thresholds")
            ),
            as_of=as_of,
        )
        summary.organisations += len({o.rule.organisation_id for o in observations})
        summary.rules += len(observations)
        summary.fired += _fire(observations, as_of=as_of)
    if send and summary.fired:
        fired = list(summary.fired)
        transaction.on_commit(
            lambda: deliveries_send(now=timezone.now(), firing_ids=fired), robust=True
        )
    return summary


def _fire(observations: list[Observation], *, as_of: datetime) -> list[int]:
    """Write a firing (and its deliveries) for each threshold crossed and not yet fired."""
    if not observations:
        return []
    fired_before = set(
        AlertFiring.objects.filter(
            rule__in=[o.rule for o in observations],
            period_start__in={o.period.start for o in observations},
        ).values_list("rule_id", "threshold_id", "period_start")
    )
    fired = []
    for observation in observations:
        rule = observation.rule
        for threshold in rule.thresholds.all():
            if (rule.pk, threshold.pk, observation.period.start) in fired_before:
                continue
            limit = threshold_limit(threshold, observation.allowance)
            if limit is None or observation.value < limit:
                continue
            firing = _firing_create(observation, threshold, limit, as_of)
            if firing is not None:
                fired.append(firing.pk)
    return fired


def _firing_create(
    observation: Observation, threshold: AlertThreshold, limit: Decimal, as_of: datetime
) -> AlertFiring | None:
    """Insert the firing and its deliveries atomically; None when another evaluator won."""
    rule = observation.rule
    organisation = rule.organisation
    assert organisation is not None  # noqa: S101 - only organisations' rules are evaluated
    try:
        with transaction.atomic():
            firing = AlertFiring.objects.create(
                rule=rule,
                threshold=threshold,
                organisation=organisation,
                period_start=observation.period.start,
                period_end=observation.period.end,
                observed=observation.value,
                limit=limit,
                unit=observation.unit,
                fired_at=as_of,
            )
            targets = [(AlertDelivery.Channel.EMAIL, address) for address in rule.email_to]
            if rule.webhook_url:
                targets.append((AlertDelivery.Channel.WEBHOOK, rule.webhook_url))
            AlertDelivery.objects.bulk_create(
                AlertDelivery(firing=firing, channel=channel, target=target, next_attempt_at=as_of)
                for channel, target in targets
            )
    except IntegrityError:
        return None
    return firing


# --- Delivery -------------------------------------------------------------------------------------


def deliveries_send(
    *, now: datetime, firing_ids: Sequence[int] | None = None, limit: int = 100
) -> int:
    """Send pending deliveries that are due (or those of `firing_ids`); return how many were
    sent. Each is locked while it is sent, so two senders never send one twice."""
    due = AlertDelivery.objects.filter(status=AlertDelivery.Status.PENDING)
    due = (
        due.filter(firing_id__in=firing_ids) if firing_ids else due.filter(next_attempt_at__lte=now)
    )
    sent = 0
    for delivery_id in list(
        due.order_by("next_attempt_at", "id").values_list("id", flat=True)[:limit]
    ):
        with transaction.atomic():
            delivery = (
                AlertDelivery.objects.select_for_update(skip_locked=True, of=("self",))
                .select_related("firing__rule__meter", "firing__organisation", "firing__threshold")
                .filter(pk=delivery_id, status=AlertDelivery.Status.PENDING)
                .first()
            )
            if delivery is None:  # sent by another sender meanwhile, or being sent
                continue
            sent += _attempt(delivery, now)
    return sent


def _attempt(delivery: AlertDelivery, now: datetime) -> int:
    started = time.monotonic()
    status_code = None
    try:
        if delivery.channel == AlertDelivery.Channel.EMAIL:
            _email_send(delivery)
        else:
            status_code = _webhook_post(delivery)
        error = ""
    except Exception as exc:
        status_code = (
            getattr(exc, "code", None) if isinstance(exc, urllib.error.HTTPError) else None
        )
        error = f"{type(exc).__name__}: {exc}"[:2000]
    ok = not error
    DeliveryAttempt.objects.create(
        delivery=delivery,
        at=now,
        ok=ok,
        status_code=status_code,
        error=error,
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    delivery.attempts += 1
    if ok:
        delivery.status = AlertDelivery.Status.SENT
        delivery.sent_at = now
        delivery.last_error = ""
    else:
        delivery.last_error = error
        if delivery.attempts >= settings.ALERTS_DELIVERY_MAX_ATTEMPTS:
            delivery.status = AlertDelivery.Status.FAILED
        else:
            delivery.next_attempt_at = now + retry_delay(delivery.attempts)
    delivery.save(update_fields=["attempts", "status", "sent_at", "last_error", "next_attempt_at"])
    return int(ok)


def retry_delay(attempts: int) -> timedelta:
    """About base x 2^(attempts-1), capped, +-20%."""
    return backoff_delay(
        attempts,
        base=timedelta(seconds=settings.ALERTS_RETRY_BASE_SECONDS),
        cap=timedelta(seconds=settings.ALERTS_RETRY_MAX_SECONDS),
        jitter=(0.8, 1.2),
    )


def notification_context(firing: AlertFiring) -> dict[str, Any]:
    """What the email templates show, formatted for people (babel, the organisation's zone)."""
    rule = firing.rule
    organisation = firing.organisation
    zone = ZoneInfo(organisation.timezone)

    def amount(value: Decimal) -> str:
        if rule.is_money:
            return str(format_currency(value, firing.unit, locale="en"))
        number = format_decimal(value.normalize(), format="#,##0.######", locale="en")
        return f"{number} {firing.unit}"

    last_day = (firing.period_end.astimezone(zone) - timedelta(microseconds=1)).date()
    first_day = firing.period_start.astimezone(zone).date()
    return {
        "firing": firing,
        "rule": rule,
        "organisation": organisation,
        "threshold": firing.threshold,
        "watched": rule.describe(),
        "observed": amount(firing.observed),
        "limit": amount(firing.limit),
        "period": f"{format_date(first_day, 'd MMM y', locale='en')} to "
        f"{format_date(last_day, 'd MMM y', locale='en')}",
        "portal_url": settings.PORTAL_URL.rstrip("/") + "/portal/alerts/",
    }


def _email_send(delivery: AlertDelivery) -> None:
    context = notification_context(delivery.firing)
    subject = render_to_string("alerts/email/threshold_crossed_subject.txt", context)
    message = EmailMultiAlternatives(
        subject=" ".join(subject.split()),
        body=render_to_string("alerts/email/threshold_crossed.txt", context),
        to=[delivery.target],
        headers={"X-Meterline-Alert": f"firing-{delivery.firing.pk}"},
    )
    message.attach_alternative(
        render_to_string("alerts/email/threshold_crossed.html", context), "text/html"
    )
    message.send()


def webhook_payload(firing: AlertFiring) -> dict[str, Any]:
    rule = firing.rule
    return {
        "type": "alert.threshold_crossed",
        "id": f"alert_firing_{firing.pk}",
        "fired_at": firing.fired_at.isoformat(),
        "organisation": {"id": firing.organisation.pk, "slug": firing.organisation.slug},
        "rule": {
            "id": rule.pk,
            "name": str(rule),
            "metric": rule.metric,
            "meter": rule.meter.code if rule.meter else None,
        },
        "threshold": {"kind": firing.threshold.kind, "value": str(firing.threshold.value)},
        "observed": str(firing.observed.normalize()),
        "limit": str(firing.limit.normalize()),
        "unit": firing.unit,
        "period": {"start": firing.period_start.isoformat(), "end": firing.period_end.isoformat()},
    }


def _webhook_post(delivery: AlertDelivery) -> int:
    body = json.dumps(webhook_payload(delivery.firing), separators=(",", ":")).encode()
    request = urllib.request.Request(  # noqa: S310 - the customer's https/http URL, validated
        delivery.target,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "User-Agent": "Meterline-Alerts/1",
            "Meterline-Signature": signature_header(delivery.firing.rule.webhook_secret, body),
            "Meterline-Delivery": str(delivery.pk),
            "Meterline-Attempt": str(delivery.attempts + 1),
        },
    )
    with urllib.request.urlopen(  # noqa: S310
        request, timeout=settings.ALERTS_WEBHOOK_TIMEOUT_SECONDS
    ) as response:
        return int(response.status)
