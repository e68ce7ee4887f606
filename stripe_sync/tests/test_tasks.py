"""The schedule flushes the outbox through django-q2 (run inline in tests)."""

import pytest
from django.core.management import call_command
from django_q.scheduler import scheduler

from stripe_sync.models import OutboxEvent


@pytest.mark.django_db
def test_the_installed_schedule_flushes_the_outbox(streamed, stripe_on):
    streamed(3)
    call_command("setup_schedules")

    scheduler()  # runs every due schedule inline (sync mode)

    assert set(OutboxEvent.objects.values_list("state", flat=True)) == {"sent"}
    assert len(stripe_on.meter_events) == 3
