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
        "close-periods",
        "invoices.tasks.close_due_periods",
        5,
        "Close billing periods that ended more than BILLING_GRACE ago into invoices.",
    ),
    Planned(
        "expire-credits",
        "invoices.tasks.expire_credits",
        60,
        "Write expiry entries for credit grants past their expiry.",
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
