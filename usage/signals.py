"""What other apps may hear from ingestion, without usage importing them.

`events_stored` is sent once per `events_ingest` call that stored at least one new event, inside
the transaction that stored them: a receiver's own writes (an outbox row, say) commit or roll back
with the events. A receiver that must act only after the commit (a check that reads the events
from another connection, an email) schedules itself with `transaction.on_commit`.

Arguments: `sender` is UsageEvent, `organisation` the Organisation, `events` a list of
`StoredEvent` in key order. Duplicates and rejected events are not in it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.dispatch import Signal

from usage.models import Meter

events_stored = Signal()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One newly stored event, as a receiver needs it without reading it back."""

    id: int
    meter: Meter
    timestamp: datetime
    quantity: Decimal
    idempotency_key: str
