"""What other apps may hear from ingestion, without usage importing them.

`events_stored` is sent once per `events_ingest` call that stored at least one new event, inside
the transaction that stored them: a receiver's own writes (an outbox row, say) commit or roll back
with the events. A receiver that must act only after the commit (a check that reads the events
from another connection, an email) schedules itself with `transaction.on_commit`.

Arguments: `sender` is UsageEvent, `organisation` the Organisation, `events` a list of
`StoredEvent` in key order. Duplicates and rejected events are not in it.

`events_will_store` is asked first, with the `organisation` and the `meter_ids` of the events
about to be stored: a receiver answers True when its `events_stored` receiver will write for
them. Only then does the direct insert (one atomic statement by itself) run in a transaction
with the receivers; otherwise `events_stored` is sent after the insert committed, and
`on_commit` callbacks run at once. A receiver that writes must answer True, or its rows would
not commit with the events.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.dispatch import Signal

from usage.models import Meter

events_stored = Signal()
events_will_store = Signal()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """One newly stored event, as a receiver needs it without reading it back."""

    id: int
    meter: Meter
    timestamp: datetime
    quantity: Decimal
    idempotency_key: str
