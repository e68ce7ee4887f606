"""django-q2 entry points: thin, taking ids or ISO instants, each calling one service."""

from __future__ import annotations

from datetime import datetime

from django.core.cache import cache
from django.utils import timezone

from alerts.receivers import pending_key
from alerts.services import alerts_evaluate, deliveries_send


def _as_of(intended_date: str | None) -> datetime:
    return datetime.fromisoformat(intended_date) if intended_date else timezone.now()


def check_alerts(intended_date: str | None = None) -> str:
    """The every-minute evaluation of every rule, then the deliveries due (retries)."""
    as_of = _as_of(intended_date)
    summary = alerts_evaluate(as_of=as_of, send=False)
    sent = deliveries_send(now=timezone.now())
    return f"{summary}; {sent} notification(s) sent"


def check_organisation(organisation_id: int, meter_ids: list[int]) -> str:
    """The check right after ingestion: this organisation's rules on the meters just used."""
    cache.delete(pending_key(organisation_id))
    summary = alerts_evaluate(
        as_of=timezone.now(), organisation_ids=[organisation_id], meter_ids=meter_ids
    )
    return str(summary)
