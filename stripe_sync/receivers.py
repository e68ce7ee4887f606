"""Signal receivers: the outbox row of a streamed event, and the Stripe webhooks we act on."""

from __future__ import annotations

from typing import Any

from django.dispatch import receiver
from djstripe.event_handlers import djstripe_receiver

from stripe_sync.selectors import streamed_meter_ids
from stripe_sync.services import outbox_record, webhook_handle
from usage.models import UsageEvent
from usage.signals import StoredEvent, events_stored, events_will_store


@receiver(events_will_store, sender=UsageEvent, dispatch_uid="stripe_sync_outbox_ahead")
def _events_will_store(sender: object, meter_ids: frozenset[int], **_: Any) -> bool:
    # Outbox rows are written for streamed meters only: then the events' insert and the rows
    # share one transaction.
    return not meter_ids.isdisjoint(streamed_meter_ids())


@receiver(events_stored, sender=UsageEvent, dispatch_uid="stripe_sync_outbox")
def _events_stored(sender: object, organisation: Any, events: list[StoredEvent], **_: Any) -> None:
    # Inside the transaction that stored the events: the outbox rows commit or roll back with them.
    outbox_record(organisation=organisation, events=events)


@djstripe_receiver(  # type: ignore[untyped-decorator]
    [
        "invoice.paid",
        "invoice.payment_failed",
        "customer.created",
        "customer.updated",
        "customer.deleted",
    ]
)
def _stripe_event(sender: object, event: Any, **_: Any) -> None:
    # Runs inside dj-stripe's webhook transaction, after its own handler mirrored the object.
    webhook_handle(event_id=event.id, event_type=event.type, obj=event.data["object"])
