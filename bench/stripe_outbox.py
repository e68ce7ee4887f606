"""What the Stripe outbox costs ingestion, and how fast the flush drains it (against the fake).

    .venv/bin/python bench/stripe_outbox.py [--batches 100] [--batch-size 1000]

Creates the scratch database `meterline_stripe_bench` (dropped at the end) with the test settings
(dj-stripe's tables from stripe_sync's test schema: seconds, not minutes), then times
`events_ingest` in batches (a) for a meter Stripe does not stream (the receiver only looks the
meters up) and (b) for a streamed meter (one outbox row per event, same transaction), and finally
`outbox_flush` of every row against the fake Stripe server on 127.0.0.1 (batches of 100).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import database_drop, database_recreate, database_url, machine_info

NAME = "meterline_stripe_bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=1000)
    args = parser.parse_args()
    for key, value in machine_info():
        print(f"{key}: {value}")
    database_recreate(NAME)
    os.environ["DATABASE_URL"] = database_url(NAME)
    os.environ["DJANGO_SETTINGS_MODULE"] = "billing_site.test_settings"
    try:
        run(args.batches, args.batch_size)
    finally:
        from django.db import connections

        connections.close_all()
        database_drop(NAME)


def run(batches: int, size: int) -> None:
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from accounts.services import organisation_create
    from stripe_sync.models import OutboxEvent
    from stripe_sync.services import meter_configure, outbox_flush
    from stripe_sync.tests.fake_stripe import start
    from usage.services import events_ingest, meter_create

    call_command("migrate", verbosity=0)
    org = organisation_create(name="Bench", slug="bench")
    meter_create(code="plain", spec={"aggregation": "sum", "property": "tokens"})
    streamed = meter_create(code="streamed", spec={"aggregation": "sum", "property": "tokens"})
    meter_configure(meter=streamed, mode="stream")
    now = datetime.now(UTC)

    def payloads(meter_code: str, batch: int) -> list[dict[str, object]]:
        return [
            {
                "event_name": meter_code,
                "idempotency_key": f"{meter_code}-{batch}-{i}",
                "properties": {"tokens": 7},
                "timestamp": (now - timedelta(seconds=i)).isoformat(),
            }
            for i in range(size)
        ]

    # Alternated batch by batch, so that both meet the same table sizes and machine load.
    spent = {"plain": 0.0, "streamed": 0.0}
    for batch in range(batches):
        for code in ("plain", "streamed") if batch % 2 else ("streamed", "plain"):
            body = payloads(code, batch)
            began = time.perf_counter()
            events_ingest(organisation=org, payloads=body, now=now)
            spent[code] += time.perf_counter() - began

    total = batches * size
    plain_s, streamed_s = spent["plain"], spent["streamed"]
    print(f"ingest, not streamed: {total} events in {plain_s:.2f} s = {total / plain_s:,.0f}/s")
    print(
        f"ingest, streamed (outbox rows): {total} events in {streamed_s:.2f} s = "
        f"{total / streamed_s:,.0f}/s ({streamed_s / plain_s - 1:+.0%})"
    )
    assert OutboxEvent.objects.count() == total

    fake, server = start(settings.STRIPE_FAKE_PORT)
    fake.secret_key = settings.STRIPE_SECRET_KEY = "sk_test_" + "BenchKey0123456789abcdefgh"
    try:
        began = time.perf_counter()
        report = outbox_flush()
        flush_s = time.perf_counter() - began
    finally:
        server.shutdown()
    assert report.sent == total == len(fake.meter_events), report
    print(
        f"flush: {report.sent} events in {report.requests} stream requests, {flush_s:.2f} s = "
        f"{report.sent / flush_s:,.0f} events/s (fake Stripe on 127.0.0.1, same machine)"
    )


if __name__ == "__main__":
    main()
