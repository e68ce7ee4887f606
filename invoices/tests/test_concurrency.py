"""Closers racing and dying on PostgreSQL: every period is invoiced once, with exact totals."""

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from accounts.tests.factories import make_organisation
from invoices.models import Invoice
from invoices.services import periods_close
from plans.tests.factories import make_plan, make_subscription
from usage.models import UsageEvent
from usage.tests.factories import make_meter

ROOT = Path(__file__).resolve().parents[2]
ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)
AS_OF = datetime(2026, 2, 1, 2, tzinfo=UTC)
SUBSCRIPTIONS = 40


def setup_customers():
    calls = make_meter("count", code="calls")
    plan = make_plan({calls: {"model": "standard", "unit_price": "0.25"}}, base_fee=Decimal("10"))
    expected = {}
    for n in range(SUBSCRIPTIONS):
        org = make_organisation()
        subscription = make_subscription(org, plan, ANCHOR)
        UsageEvent.objects.bulk_create(
            UsageEvent(
                organisation=org,
                meter=calls,
                quantity=1,
                properties={},
                timestamp=ANCHOR + timedelta(hours=i),
                received_at=ANCHOR + timedelta(hours=i),
                idempotency_key=f"{n}-{i}",
            )
            for i in range(n + 1)
        )
        expected[subscription.pk] = 1000 + 25 * (n + 1)
    return expected


def assert_invoiced_once(expected):
    invoices = list(Invoice.objects.all())
    assert sorted(i.subscription_id for i in invoices) == sorted(expected)
    assert {i.subscription_id: i.total_minor for i in invoices} == expected
    numbers = sorted(int(i.number.rsplit("-", 1)[1]) for i in invoices)
    assert numbers == list(range(1, SUBSCRIPTIONS + 1))  # gapless


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_closers_at_once_invoice_each_period_once(at_once):
    expected = setup_customers()
    errors = at_once(lambda: periods_close(as_of=AS_OF, batch_size=7))
    assert not errors, errors
    assert_invoiced_once(expected)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_closer_killed_mid_batch_and_rerun_invoices_each_period_once():
    expected = setup_customers()
    db = settings.DATABASES["default"]
    environment = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "DJANGO_SETTINGS_MODULE": "billing_site.test_settings",
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "close_periods",
            "--as-of",
            AS_OF.isoformat(),
            "--batch-size",
            "4",
        ],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while Invoice.objects.count() < 4 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    # Its server session may still be finishing a statement; end it so that nothing of the dead
    # closer lingers (and the test database can be dropped afterwards).
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    killed_after = Invoice.objects.count()
    assert 0 < killed_after < SUBSCRIPTIONS, "the closer should die part-way"

    summary = periods_close(as_of=AS_OF)
    assert summary.closed == SUBSCRIPTIONS - killed_after
    assert_invoiced_once(expected)
