"""Flushers racing and dying on PostgreSQL: every meter event reaches Stripe exactly once."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from stripe_sync.models import OutboxEvent
from stripe_sync.services import customer_ensure, meters_provision, outbox_flush
from stripe_sync.tests.conftest import SECRET_KEY
from stripe_sync.tests.test_outbox import assert_stripe_has_each_event_once, sent_identifiers

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_flushers_at_once_send_disjoint_batches(streamed, stripe_on, at_once):
    streamed(200)
    customer_ensure(organisation=streamed.organisation)
    meters_provision()
    errors = at_once(lambda: outbox_flush(batch_size=10), timeout=60)
    assert not errors, errors
    assert len(stripe_on.stream_requests()) == 20
    assert max(Counter(sent_identifiers(stripe_on)).values()) == 1  # no event sent twice
    assert OutboxEvent.objects.filter(state="sent").count() == 200
    assert_stripe_has_each_event_once(stripe_on, streamed)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_flusher_killed_mid_batch_and_rerun_sends_each_event_once(streamed, stripe_on):
    streamed(50)
    # Stripe takes the third batch, and the flusher is killed before the answer comes back.
    db = settings.DATABASES["default"]
    environment = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "DJANGO_SETTINGS_MODULE": "billing_site.test_settings",
        "STRIPE_FAKE_SECRET_KEY": SECRET_KEY,
    }
    hung = threading.Event()
    original = stripe_on.handle

    def handle(request):
        answer = original(request)
        if (
            request.path == "/v2/billing/meter_event_stream"
            and len(stripe_on.stream_requests()) == 3
        ):
            hung.set()
            time.sleep(5)  # the answer never reaches the flusher: it is killed meanwhile
        return answer

    stripe_on.handle = handle
    try:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "stripe_flush", "--batch-size", "10"],
            cwd=ROOT,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert hung.wait(timeout=60), process.stderr.read() if process.poll() is not None else ""
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        stripe_on.handle = original
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    states = Counter(OutboxEvent.objects.values_list("state", flat=True))
    assert states == {"sent": 20, "pending": 30}
    assert OutboxEvent.objects.filter(claimed_until__isnull=False).count() == 10
    assert len(stripe_on.meter_events) == 30  # Stripe has the third batch

    # The next run waits for the dead flusher's lease, then sends the rest.
    now = datetime.now(UTC)
    assert outbox_flush(now=now).sent == 20
    assert outbox_flush(now=now + timedelta(seconds=121)).sent == 10

    assert OutboxEvent.objects.filter(state="sent").count() == 50
    assert max(Counter(sent_identifiers(stripe_on)).values()) == 2  # the third batch, resent
    assert_stripe_has_each_event_once(stripe_on, streamed)
