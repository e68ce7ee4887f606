"""`manage.py archive_events`: it waits until every period before --before is invoiced."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command

from invoices.services import periods_close
from plans.tests.factories import make_plan, make_subscription
from usage.archive import archive_file
from usage.models import UsageEvent
from usage.tests.test_archive import AUG, JUL, NOW, SEP, months_setup


@pytest.fixture
def months(db):
    return months_setup()


@pytest.mark.django_db(transaction=True)
def test_the_command_waits_until_every_period_before_is_invoiced(months, tmp_path):
    organisation, tokens, _ = months
    plan = make_plan({tokens: {"model": "standard", "unit_price": "0.01"}})
    make_subscription(organisation, plan, JUL.start)
    args = ["archive_events", "--before", "2026-09-01T00:00:00Z", "--directory", str(tmp_path)]
    with pytest.raises(CommandError, match="reason"):
        call_command(*args)
    assert list(tmp_path.iterdir()) == []
    periods_close(as_of=NOW + timedelta(days=1))  # July to October invoiced, after receipt
    call_command(*args)
    assert archive_file(tmp_path, AUG.start).exists()
    assert not UsageEvent.objects.filter(meter=tokens, timestamp__lt=SEP.start).exists()
    call_command("archive_events", "--load", str(archive_file(tmp_path, JUL.start)))
    assert UsageEvent.objects.filter(meter=tokens, timestamp__lt=AUG.start).exists()
