"""Every django-q2 schedule, declared in one place; `manage.py setup_schedules` installs them."""

from __future__ import annotations

from dataclasses import dataclass

from django_q.models import Schedule


@dataclass(frozen=True)
class Planned:
    name: str
    func: str
    minutes: int
    purpose: str


SCHEDULES = [
    Planned(
        "fold-rollups",
        "usage.tasks.fold_rollups",
        1,
        "Fold newly committed usage events into the hourly rollups; rebuild changed meters.",
    ),
    Planned(
        "ensure-event-partitions",
        "usage.tasks.ensure_event_partitions",
        24 * 60,
        "PostgreSQL: create the events table's monthly partitions EVENT_PARTITIONS_AHEAD months "
        "ahead.",
    ),
    Planned(
        "close-periods",
        "invoices.tasks.close_due_periods",
        5,
        "Close billing periods that ended more than BILLING_GRACE ago into invoices.",
    ),
    Planned(
        "stripe-sync",
        "stripe_sync.tasks.sync_stripe",
        1,
        "Send the meter-event outbox and period summaries to Stripe (no-op without a key).",
    ),
    Planned(
        "expire-credits",
        "invoices.tasks.expire_credits",
        60,
        "Write expiry entries for credit grants past their expiry.",
    ),
    Planned(
        "check-alerts",
        "alerts.tasks.check_alerts",
        1,
        "Evaluate every alert rule; fire newly crossed thresholds; send or retry notifications.",
    ),
    Planned(
        "drain-ingest-buffer",
        "usage.tasks.drain_ingest_buffer",
        1,
        "Store the events queued in the ingestion buffer (INGEST_BUFFER=redis; else a no-op).",
    ),
]


def schedules_install() -> list[Schedule]:
    """Create or update each schedule by name; remove none the code no longer declares."""
    installed = []
    for planned in SCHEDULES:
        schedule, _ = Schedule.objects.update_or_create(
            name=planned.name,
            defaults={
                "func": planned.func,
                "schedule_type": Schedule.MINUTES,
                "minutes": planned.minutes,
                "repeats": -1,
                # The task gets its intended run time as its "as of".
                "intended_date_kwarg": "intended_date",
            },
        )
        installed.append(schedule)
    return installed
