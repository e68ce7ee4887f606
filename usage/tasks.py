"""django-q2 entry points of usage: thin, each calling one service."""

from __future__ import annotations

from usage.rollups import rollups_fold


def fold_rollups(intended_date: str | None = None) -> str:
    """Fold new events into the hourly rollups (the run time does not matter to a fold)."""
    result = rollups_fold()
    if result.skipped:
        return "another fold is running"
    rebuilt = f", rebuilt {', '.join(result.rebuilt)}" if result.rebuilt else ""
    return f"folded {result.events} events into {result.buckets} buckets{rebuilt}"
