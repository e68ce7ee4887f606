"""django-q2 entry points: thin, each calling services."""

from __future__ import annotations

import stripe

from stripe_sync import gateway
from stripe_sync.services import (
    invoices_push,
    meters_provision,
    outbox_flush,
    period_summaries_record,
    period_summaries_send,
)


def sync_stripe(intended_date: str | None = None) -> str:
    """Provision new meters; flush the meter-event outbox; queue and send the summaries of newly
    closed periods; push finalized invoices (when STRIPE_PUSH_INVOICES).

    The outbox's clock (back-off, lease) is the real time of the run, not the schedule's
    intended time: a late run must not wait for a back-off that has already passed.
    """
    if gateway.enabled():
        try:
            meters_provision()
        except stripe.StripeError as exc:  # the flush below retries with its back-off
            return f"Stripe unavailable: {gateway.describe(exc)}"
    flushed = outbox_flush()
    queued = period_summaries_record()
    summaries = period_summaries_send()
    pushed, errors = invoices_push()
    return (
        f"stream: {flushed}; summaries: {queued} queued, {summaries}; "
        f"invoices pushed: {pushed}, failed: {len(errors)}"
    )
