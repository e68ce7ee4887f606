"""Hooks into other apps' writes: new events (check cheap rules at once), new subscriptions
(copy the plan's default rules)."""

from __future__ import annotations

from typing import Any

from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_save
from django.dispatch import receiver
from django_q.tasks import async_task

from accounts.models import Organisation
from alerts.selectors import ingest_checked_meters
from alerts.services import alert_rules_copy_defaults
from plans.models import Subscription
from usage.models import UsageEvent
from usage.signals import StoredEvent, events_stored


def pending_key(organisation_id: int) -> str:
    return f"alerts:check-pending:{organisation_id}"


@receiver(events_stored, sender=UsageEvent, dispatch_uid="alerts_events_stored")
def _events_stored(
    sender: type, organisation: Organisation, events: list[StoredEvent], **kwargs: Any
) -> None:
    watched = ingest_checked_meters(organisation.pk)
    if not watched or not any(event.meter.pk in watched for event in events):
        return

    def enqueue() -> None:
        # At most one check queued per organisation: the check clears the mark before it reads,
        # so events stored while it runs queue the next one and none goes unseen.
        if cache.add(pending_key(organisation.pk), 1, timeout=300):
            async_task("alerts.tasks.check_organisation", organisation.pk, sorted(watched))

    transaction.on_commit(enqueue, robust=True)


@receiver(post_save, sender=Subscription, dispatch_uid="alerts_subscription_defaults")
def _subscription_created(
    sender: type, instance: Subscription, created: bool, **kwargs: Any
) -> None:
    if created and not kwargs.get("raw"):
        transaction.on_commit(lambda: alert_rules_copy_defaults(subscription=instance), robust=True)
