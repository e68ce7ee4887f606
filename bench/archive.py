"""Archiving a month of usage events and loading it back, on PostgreSQL's monthly partitions.

    .venv/bin/python bench/archive.py                        # 1,000,000 events in the old month
    .venv/bin/python bench/archive.py --events 200000 --keep-db

By itself it: creates a scratch PostgreSQL database (dropped at the end unless --keep-db), runs
`manage.py migrate`, sets Django up in this process, creates --organisations organisations and
the bench meters (api_calls count, ai_tokens sum, storage_gb weighted_sum), makes sure the old
month (three months before the current one) has its partition, and bulk-loads --events events
into that month and --live events into the current month (`_common.bulk_load_events`, keys
claimed in the guard as ingestion would), then folds them into the hourly rollups.

Measured: `events_archive(before=<the month after the old one>)` (export to JSON lines gzip,
then in one transaction the partition dropped and replaced by one holding the kept last level
readings, and the month's rollups rebuilt): seconds, events/s, file size; a month-so-far read
of the live month before and after (untouched); `events_restore` of the file: seconds,
events/s; and checks that the restored month's per-meter count and exact sum equal the loaded
ones and that `rollups_verify` finds no difference.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    app_environment,
    bench_catalogue,
    bulk_load_events,
    database_drop,
    database_recreate,
    database_url,
    events_table_size,
    machine_info,
    manage,
)
from close import django_start


def say(text: str = "") -> None:
    print(text, flush=True)


def month_figures(conn: psycopg.Connection[Any], start: datetime, end: datetime) -> list[Any]:
    return conn.execute(
        "SELECT m.code, count(*), sum(e.quantity) FROM usage_usageevent e "
        "JOIN usage_meter m ON m.id = e.meter_id "
        'WHERE e."timestamp" >= %s AND e."timestamp" < %s GROUP BY m.code ORDER BY m.code',
        [start, end],
    ).fetchall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--live", type=int, default=200_000)
    parser.add_argument("--organisations", type=int, default=200)
    parser.add_argument("--db", default="meterline_bench_archive")
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args()

    say("== Machine")
    for name, value in machine_info():
        say(f"  {name}: {value}")
    database_recreate(args.db)
    try:
        run(args)
    finally:
        if not args.keep_db:
            database_drop(args.db)


def run(args: argparse.Namespace) -> None:
    manage(app_environment(args.db), "migrate", "--no-input", timeout=900)
    django_start(args.db)
    from accounts.models import Organisation
    from core.periods import Period, add_months
    from usage.archive import events_archive, events_restore
    from usage.partitions import month_start, partition_name, partitions_ensure
    from usage.rollups import rollups_fold, rollups_verify
    from usage.selectors import usage_total

    now = datetime.now(UTC)
    old = Period(add_months(month_start(now), -3), add_months(month_start(now), -2))
    live = Period(month_start(now), now)
    partitions_ensure(months=[old.start])
    Organisation.objects.bulk_create(
        Organisation(name=f"Customer {n}", slug=f"customer-{n}") for n in range(args.organisations)
    )
    meters, _ = bench_catalogue()
    organisations = list(Organisation.objects.values_list("pk", flat=True))
    shares = {"api_calls": 0.6, "ai_tokens": 0.38, "storage_gb": 0.02}

    say(
        f"\n== Load: {args.events:,} events in {old.start:%Y-%m}, "
        f"{args.live:,} in {live.start:%Y-%m}"
    )
    for period, events, seed in ((old, args.events, 0.1), (live, args.live, 0.2)):
        with psycopg.connect(database_url(args.db), autocommit=True, connect_timeout=10) as conn:
            plan = [
                (org, meters[code].pk, code, max(1, round(events * share / len(organisations))))
                for org in organisations
                for code, share in shares.items()
            ]
            loaded = bulk_load_events(
                conn,
                plan,
                timestamp_sql="%(start)s::timestamptz"
                " + random() * (%(end)s::timestamptz - %(start)s::timestamptz)",
                params={"start": period.start, "end": period.end},
                seed=seed,
                key_prefix=f"{period.start:%Y%m}-",
            )
            say(
                f"  {loaded.inserted:,} events into {period.start:%Y-%m}: "
                f"{loaded.insert_seconds:.1f} s, indexes {loaded.rebuild_seconds:.1f} s"
            )
    with psycopg.connect(database_url(args.db), autocommit=True, connect_timeout=10) as conn:
        conn.execute("VACUUM ANALYZE")
        heap, total = events_table_size(conn)
        say(f"  usage_usageevent: {heap} heap, {total} with indexes (all partitions)")
        before = month_figures(conn, old.start, old.end)
    result = rollups_fold()
    say(f"  fold: {result.events:,} events into {result.buckets:,} buckets, {result.seconds:.1f} s")

    biggest = Organisation.objects.get(pk=organisations[0])
    meter = meters["ai_tokens"]
    live_before = usage_total(organisation=biggest, meter=meter, period=live)

    directory = Path(tempfile.mkdtemp(prefix="meterline-archive-"))
    say(f"\n== Archive {old.start:%Y-%m} (before={old.end:%Y-%m-%d})")
    began = time.perf_counter()
    done = events_archive(before=old.end, directory=directory, now=now)
    seconds = time.perf_counter() - began
    for month in done:
        size = month.path.stat().st_size
        say(
            f"  {month.month:%Y-%m}: {month.events:,} events to {month.path.name} "
            f"({size / 2**20:.1f} MiB, {size / max(month.events, 1):.0f} bytes/event), "
            f"{month.kept} last level readings kept in the table"
        )
    say(f"  archive: {seconds:.1f} s ({args.events / seconds:,.0f} events/s)")
    with psycopg.connect(database_url(args.db), autocommit=True, connect_timeout=10) as conn:
        left = conn.execute(f"SELECT count(*) FROM {partition_name(old.start)}").fetchone()  # noqa: S608
        say(f"  rows left in {partition_name(old.start)}: {left[0]:,}")  # type: ignore[index]
    live_after = usage_total(organisation=biggest, meter=meter, period=live)
    say(f"  live month read for one customer, before/after: {live_before} / {live_after}")
    assert live_before == live_after, "the live month changed"

    say("\n== Load back")
    began = time.perf_counter()
    inserted = sum(events_restore(path=month.path) for month in done)
    seconds = time.perf_counter() - began
    say(f"  restore: {inserted:,} events in {seconds:.1f} s ({inserted / seconds:,.0f} events/s)")
    with psycopg.connect(database_url(args.db), autocommit=True, connect_timeout=10) as conn:
        after = month_figures(conn, old.start, old.end)
    say(f"  per meter (count, exact sum) loaded:   {before}")
    say(f"  per meter (count, exact sum) restored: {after}")
    assert after == before, "the restored month differs from the loaded one"
    began = time.perf_counter()
    checked, differences = rollups_verify(period=old)
    say(
        f"  verify_rollups over {old.start:%Y-%m}: {checked:,} buckets, "
        f"{len(differences)} differences ({time.perf_counter() - began:.1f} s)"
    )
    assert not differences
    say("\nAll checks passed.")


if __name__ == "__main__":
    main()
