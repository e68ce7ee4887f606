"""django-q2 entry points of usage: thin, each calling one service."""

from __future__ import annotations

import time

from django.conf import settings

from usage.buffer import buffer_consume, consumer_name
from usage.partitions import partitions_ensure
from usage.rollups import rollups_fold


def drain_ingest_buffer(intended_date: str | None = None, seconds: int = 50) -> str:
    """Store what the ingestion buffer holds, for up to `seconds` (the schedule runs each minute).

    The reads block for new entries, so with the schedule there is nearly always one consumer;
    `manage.py ingest_worker` processes keep the lag lower and add throughput.
    """
    if settings.INGEST_BUFFER != "redis":
        return "ingestion buffer off"
    deadline = time.monotonic() + seconds
    totals = buffer_consume(
        consumer=f"q-{consumer_name()}", should_stop=lambda: time.monotonic() >= deadline
    )
    return f"stored {totals.inserted} of {totals.events} events read in {totals.batches} batches"


def fold_rollups(intended_date: str | None = None, rebuild: bool = True) -> str:
    """Fold new events into the hourly rollups (the run time does not matter to a fold); the
    schedule also rebuilds meters whose spec changed, the fold queued after ingestion does not."""
    result = rollups_fold(rebuild=rebuild)
    if result.skipped:
        return "another fold is running"
    rebuilt = f", rebuilt {', '.join(result.rebuilt)}" if result.rebuilt else ""
    return f"folded {result.events} events into {result.buckets} buckets{rebuilt}"


def ensure_event_partitions(intended_date: str | None = None) -> str:
    """Create the events table's monthly partitions ahead of time (PostgreSQL; else a no-op)."""
    result = partitions_ensure()
    if not result.created:
        return "every partition needed exists"
    moved = f", {result.moved} events moved out of the default partition" if result.moved else ""
    return f"created {', '.join(result.created)}{moved}"
