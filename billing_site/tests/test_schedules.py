import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django_q.models import Schedule

from billing_site.schedules import SCHEDULES


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_setup_schedules_installs_every_declared_schedule_once():
    run("setup_schedules")
    run("setup_schedules")
    assert Schedule.objects.count() == len(SCHEDULES)
    close = Schedule.objects.get(name="close-periods")
    assert (close.func, close.minutes, close.intended_date_kwarg) == (
        "invoices.tasks.close_due_periods",
        5,
        "intended_date",
    )
    assert timedelta(minutes=close.minutes) < timedelta(hours=1)
