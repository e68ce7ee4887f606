"""Alert evaluation: the every-minute check of every rule, and the check after one ingestion.

    .venv/bin/python bench/alerts.py                      # 1,000 organisations, ~1M events
    .venv/bin/python bench/alerts.py --organisations 200 --events-per-org 500 --keep-db

By itself it: creates a scratch PostgreSQL database (dropped at the end unless --keep-db), runs
`manage.py migrate`, then runs Django in this process on it (DEBUG off, django-q not in sync
mode). It creates the meters api_calls (count), ai_tokens (sum of `tokens`) and storage_gb
(weighted_sum of `gb`), a USD plan pricing all three, N organisations subscribed since the start
of the current UTC month, each with three rules through `alerts.services.alert_rule_create`
(api_calls usage at 50/80/100% of the free tier, ai_tokens cost at 100 and 1,000 USD, projected
invoice at 500 USD), and about M events per organisation between the month's start and now
(`bulk_load_events`, then VACUUM ANALYZE).

Measured: `alerts_evaluate(as_of=now)` over every organisation (the `check-alerts` schedule's
work, sending nothing), first when thresholds fire and then again when nothing is new, with its
statement count and time in SQL; and `alerts.tasks.check_organisation` for one organisation
(the check queued after an ingestion), median of 20. Checks: every firing's observed value
equals the usage recomputed by plain SQL for a sample of organisations.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import psycopg
from _common import (
    app_environment,
    bench_catalogue,
    bulk_load_events,
    database_drop,
    database_recreate,
    database_url,
    machine_info,
    manage,
)
from dashboard import METER_SHARES, django_start


def say(text: str = "") -> None:
    print(text, flush=True)


def setup(count: int, anchor: datetime) -> tuple[list[int], dict[str, int]]:
    from django.db import transaction

    from accounts.models import Organisation
    from alerts.models import AlertRule
    from alerts.services import alert_rule_create
    from plans.models import Subscription

    with transaction.atomic():
        meters, plan = bench_catalogue()
        organisations = Organisation.objects.bulk_create(
            Organisation(name=f"Customer {n}", slug=f"customer-{n}") for n in range(count)
        )
        Subscription.objects.bulk_create(
            Subscription(organisation=o, plan=plan, anchor=anchor, start=anchor, timezone="UTC")
            for o in organisations
        )
        for organisation in organisations:
            alert_rule_create(
                organisation=organisation,
                metric=AlertRule.Metric.USAGE,
                meter=meters["api_calls"],
                thresholds=[("percent", Decimal(p)) for p in (50, 80, 100)],
                email_to=["ops@example.com"],
            )
            alert_rule_create(
                organisation=organisation,
                metric=AlertRule.Metric.COST,
                meter=meters["ai_tokens"],
                thresholds=[("absolute", Decimal(100)), ("absolute", Decimal(1000))],
            )
            alert_rule_create(
                organisation=organisation,
                metric=AlertRule.Metric.PROJECTED_COST,
                thresholds=[("absolute", Decimal(500))],
            )
    return [o.pk for o in organisations], {code: m.pk for code, m in meters.items()}


def timed_evaluation(**kwargs: Any) -> tuple[float, int, float, Any]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from alerts.services import alerts_evaluate

    with CaptureQueriesContext(connection) as queries:
        began = time.perf_counter()
        summary = alerts_evaluate(send=False, **kwargs)
        seconds = time.perf_counter() - began
    sql = sum(float(q["time"]) for q in queries.captured_queries)
    return seconds, len(queries), sql, summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--organisations", type=int, default=1000)
    parser.add_argument("--events-per-org", type=int, default=1000)
    parser.add_argument("--db", default="meterline_bench_alerts")
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args()

    for name, value in machine_info():
        say(f"{name:>18}: {value}")
    now = datetime.now(UTC)
    anchor = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    say(f"\nscratch database {args.db}; period {anchor:%Y-%m-%d} to now ({now:%Y-%m-%d %H:%M})")
    database_recreate(args.db)
    try:
        manage(app_environment(args.db), "migrate", "--noinput", timeout=600)
        import tempfile

        with tempfile.TemporaryDirectory() as static_root:
            django_start(args.db, static_root)
        organisation_ids, meters = setup(args.organisations, anchor)
        plan = [
            (org, meters[code], code, max(1, round(args.events_per_org * share)))
            for org in organisation_ids
            for code, share in METER_SHARES.items()
        ]
        with psycopg.connect(database_url(args.db), autocommit=True) as conn:
            loaded = bulk_load_events(
                conn,
                plan,
                timestamp_sql="%(start)s::timestamptz"
                " + random() * (%(end)s::timestamptz - %(start)s::timestamptz)",
                params={"start": anchor, "end": now},
                seed=0.7,
            )
            conn.execute("VACUUM ANALYZE")
        say(
            f"{args.organisations:,} organisations, {3 * args.organisations:,} rules, "
            f"{loaded.inserted:,} events loaded in {loaded.insert_seconds:.1f} s"
        )

        from django.db import connection

        from alerts.models import AlertFiring
        from alerts.tasks import check_organisation

        as_of = datetime.now(UTC)
        for label in ("first run (thresholds fire)", "second run (nothing new)"):
            seconds, count, sql, summary = timed_evaluation(as_of=as_of)
            say(
                f"\nevaluate all, {label}: {seconds:.2f} s, {count} statements "
                f"({sql:.2f} s in SQL); {summary}"
            )
        for batch in (50, 1000):
            seconds, count, _, _ = timed_evaluation(as_of=as_of, batch_size=batch)
            say(f"  batch_size={batch}: {seconds:.2f} s, {count} statements")

        times = []
        for org in organisation_ids[:20]:
            began = time.perf_counter()
            check_organisation(org, [meters["api_calls"], meters["ai_tokens"]])
            times.append((time.perf_counter() - began) * 1000)
        say(
            f"\ncheck after an ingestion (one organisation, its count/sum rules): median "
            f"{statistics.median(times):.1f} ms, max {max(times):.1f} ms over {len(times)}"
        )

        # The observed usage of every api_calls firing equals plain SQL's count at as_of.
        mismatches = 0
        firings = AlertFiring.objects.filter(rule__meter_id=meters["api_calls"])[:200]
        with connection.cursor() as cursor:
            for firing in firings:
                cursor.execute(
                    "SELECT count(*) FROM usage_usageevent WHERE organisation_id = %s "
                    "AND meter_id = %s AND timestamp >= %s AND timestamp < %s",
                    [firing.organisation_id, meters["api_calls"], anchor, as_of],
                )
                if Decimal(cursor.fetchone()[0]) != firing.observed:
                    mismatches += 1
        say(f"check: {len(firings)} api_calls firings against SQL counts, {mismatches} differ")
        return 1 if mismatches else 0
    finally:
        from django.db import connections

        connections.close_all()
        if not args.keep_db:
            database_drop(args.db)


if __name__ == "__main__":
    sys.exit(main())
