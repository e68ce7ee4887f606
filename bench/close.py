"""Period close throughput: `invoices.services.periods_close` over a month of usage events.

    .venv/bin/python bench/close.py                      # 10,000 subscriptions, ~3.4M events
    .venv/bin/python bench/close.py --subscriptions 2000 --keep-db
    .venv/bin/python bench/close.py --covering-index --no-what-if

By itself it: creates a scratch PostgreSQL database (dropped at the end unless --keep-db), runs
`manage.py migrate` on it, then runs Django in this process on it (DEBUG off, django-q not in
sync mode). It loads, without the API: three meters (api_calls count, ai_tokens sum of `tokens`,
storage_gb weighted_sum of `gb`), one USD plan with a base fee and three prices (graduated,
standard, package) set through `plans.services.price_set`, N organisations each with a
subscription anchored 2026-10-01T00:00Z (UTC) (bulk_create), and about 340 events per
organisation over October 2026 (skewed: the 10 biggest customers have 22%), inserted in time
order by one INSERT ... SELECT over generate_series (secondary indexes rebuilt after); then
VACUUM ANALYZE; then folds the events into the hourly rollups (`rollups_fold`, timed), as the
`fold-rollups` schedule keeps them in production.

Measured, in this order:
  1. SQL per invoice: the real `periods_close`, with `periods_due` patched to answer only a random
     sample (so the sample takes whatever path the close takes: one by one or in batches), every
     statement timed and attributed to the app functions that issued it (`execute_wrapper`);
  2. a cProfile of the same on another random sample;
     (both samples are then undone: invoices, billing periods, queued tasks, number sequence)
  3. what-if figures for a batched close: every customer's usage in one pass over the month, the
     same per batch of customers with the app's index and with a covering one, rating all lines
     in Python, and bulk-inserting every invoice and line (rolled back, then truncated);
  4. the real thing: `periods_close(as_of=2026-11-01T02:00Z)` over every subscription, with this
     process's CPU, PostgreSQL's CPU and a count of statements; stopped after --close-seconds
     (between two transactions) and extrapolated if slower.
Then SQL checks: one finalized invoice per subscription, numbers gapless from 1, four lines each,
PDF rendering queued for every invoice (the queued django-q tasks are decoded) and none rendered,
the what-if's totals equal to the invoices', and for --verify random subscriptions (and the
biggest customer) the total recomputed independently: plain SQL counts and sums, the weighted sum
integrated in Python from the raw readings, `plans.pricing.quote`, `core.money.to_minor_units`.
Every loop is bounded; all traffic goes to 127.0.0.1.
Target (issue): 10,000 subscriptions with 3 metered prices each closed in under 20 s.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import io
import json
import os
import pstats
import random
import re
import sys
import sysconfig
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import psycopg
from _common import (
    BASE_FEE,
    REPO,
    app_environment,
    bench_catalogue,
    bulk_load_events,
    cpu_delta,
    cpu_snapshot,
    database_drop,
    database_recreate,
    database_url,
    events_table_size,
    machine_info,
    manage,
    postgres_pids,
    wait_for_quiet,
)

ANCHOR = datetime(2026, 10, 1, tzinfo=UTC)
MONTH_END = datetime(2026, 11, 1, tzinfo=UTC)
AS_OF = datetime(2026, 11, 1, 2, tzinfo=UTC)
EVENTS_PER_ORGANISATION = 340  # 3.4 million for 10,000 organisations
TARGET_SECONDS_FOR_10K = 20.0
BATCH_SIZE: int | None = None  # --batch-size, passed to periods_close if it takes one
COVERING_INDEX = False  # --covering-index
TARGET_PER_S = 10_000 / TARGET_SECONDS_FOR_10K
# The big customers' shares of all events; the rest is spread log-normally over the others.
BIG_SHARES = (0.05, 0.04, 0.03, 0.02, 0.02, 0.015, 0.015, 0.01, 0.01, 0.01)
# Each organisation's events, per meter.
METER_SHARES = {"api_calls": 0.62, "ai_tokens": 0.35, "storage_gb": 0.03}


def say(text: str = "") -> None:
    print(text, flush=True)


def seconds_since(start: float) -> float:
    return time.perf_counter() - start


# --- Django in this process -----------------------------------------------------------------------


def django_start(db: str) -> None:
    """Configure Django on `db` like production (DEBUG off), in this process."""
    for key in ("REDIS_URL", "EMAIL_URL"):
        os.environ.pop(key, None)
    os.environ.update(app_environment(db))
    os.environ["DJANGO_SETTINGS_MODULE"] = "billing_site.settings"
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.conf import settings
    from django_q.conf import Conf

    if Conf.SYNC or settings.Q_CLUSTER.get("sync"):
        raise RuntimeError("django-q runs in sync mode: the PDF task would run inside the close")
    if settings.DEBUG:
        raise RuntimeError("DEBUG is on: every query would be logged in memory")


# --- Loading --------------------------------------------------------------------------------------


def event_counts(organisations: int, events: int, seed: int) -> list[int]:
    """Events per organisation: a few big customers, the rest log-normal, at least 3 each."""
    rng = random.Random(seed)
    big = list(BIG_SHARES[: max(1, organisations // 1000)])
    rest = organisations - len(big)
    weights = [rng.lognormvariate(0, 1.2) for _ in range(rest)]
    scale = (1 - sum(big)) / sum(weights)
    shares = big + [w * scale for w in weights]
    return [max(3, round(share * events)) for share in shares]


@dataclass
class Workload:
    organisation_ids: list[int]
    subscription_ids: list[int]
    meter_ids: dict[str, int]
    plan_id: int
    events: int = 0


def load(db: str, organisations: int, events: int, seed: int) -> Workload:
    from django.db import transaction

    from accounts.models import Organisation
    from plans.models import Subscription

    began = time.perf_counter()
    with transaction.atomic():
        meters, plan = bench_catalogue()
        orgs = Organisation.objects.bulk_create(
            [
                Organisation(
                    name=f"Customer {n:05d}",
                    slug=f"customer-{n:05d}",
                    timezone="UTC",
                    currency="USD",
                )
                for n in range(organisations)
            ],
            batch_size=2000,
        )
        subscriptions = Subscription.objects.bulk_create(
            [
                Subscription(
                    organisation=org, plan=plan, anchor=ANCHOR, start=ANCHOR, timezone="UTC"
                )
                for org in orgs
            ],
            batch_size=2000,
        )
    say(
        f"  meters, plan, 3 prices (price_set), {len(orgs):,} organisations and subscriptions "
        f"(bulk_create): {seconds_since(began):.1f} s"
    )
    workload = Workload(
        [org.pk for org in orgs],
        [sub.pk for sub in subscriptions],
        {code: meter.pk for code, meter in meters.items()},
        plan.pk,
    )
    counts = event_counts(organisations, events, seed)
    workload.events = load_events(db, workload, counts, seed)
    from usage.rollups import rollups_fold

    folded = rollups_fold()  # what the fold-rollups schedule keeps current in production
    say(
        f"  rollups_fold: {folded.events:,} events into {folded.buckets:,} hourly buckets: "
        f"{folded.seconds:.1f} s ({folded.events / max(folded.seconds, 1e-9):,.0f} events/s)"
    )
    return workload


def load_events(db: str, workload: Workload, counts: list[int], seed: int) -> int:
    """October's events for every organisation, by `bulk_load_events` (see _common)."""
    rows = []
    for org, total in zip(workload.organisation_ids, counts, strict=True):
        tokens = max(1, round(total * METER_SHARES["ai_tokens"]))
        storage = max(1, round(total * METER_SHARES["storage_gb"]))
        calls = max(1, total - tokens - storage)
        rows += [
            (org, workload.meter_ids["api_calls"], "api_calls", calls),
            (org, workload.meter_ids["ai_tokens"], "ai_tokens", tokens),
            (org, workload.meter_ids["storage_gb"], "storage_gb", storage),
        ]
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        loaded = bulk_load_events(
            conn,
            rows,
            timestamp_sql="timestamptz '2026-10-01 00:00:00+00'"
            " + make_interval(secs => floor(random() * 2678400e6) / 1e6)",
            params={},
            seed=(seed % 1000) / 1000,
        )
        inserted = loaded.inserted
        say(f"  {inserted:,} events inserted: {loaded.insert_seconds:.1f} s")
        say(
            f"  {loaded.indexes} indexes and unique constraints rebuilt: "
            f"{loaded.rebuild_seconds:.1f} s"
        )
        if COVERING_INDEX:
            built = time.perf_counter()
            conn.execute(
                "CREATE INDEX bench_covering ON usage_usageevent "
                '(organisation_id, meter_id, "timestamp") INCLUDE (quantity, received_at)'
            )
            say(
                "  --covering-index: added (organisation, meter, timestamp) INCLUDE (quantity, "
                f"received_at), not part of the app's schema: {seconds_since(built):.1f} s"
            )
        vacuumed = time.perf_counter()
        conn.execute("VACUUM ANALYZE")
        say(f"  VACUUM ANALYZE: {seconds_since(vacuumed):.1f} s")
    return inserted


def describe_load(db: str) -> None:
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        for table in (
            "accounts_organisation",
            "plans_subscription",
            "plans_price",
            "plans_priceversion",
            "usage_usageevent",
        ):
            n = conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # noqa: S608
            say(f"  {table:<24} {n:>12,} rows")
        heap, total = events_table_size(conn)
        say(f"  usage_usageevent size: {heap} heap, {total} with indexes (all partitions)")
        per_meter = conn.execute(
            "SELECT m.code, count(*), min(e.timestamp), max(e.timestamp) FROM usage_usageevent e "
            "JOIN usage_meter m ON m.id = e.meter_id GROUP BY m.code ORDER BY m.code"
        ).fetchall()
        for code, n, first, last in per_meter:
            say(f"    {code:<12} {n:>10,} events, {first:%Y-%m-%d %H:%M} to {last:%Y-%m-%d %H:%M}")
        skew = conn.execute(
            """
            WITH per AS (SELECT organisation_id, count(*) AS n FROM usage_usageevent GROUP BY 1)
            SELECT max(n), percentile_disc(0.5) WITHIN GROUP (ORDER BY n), min(n),
                   (SELECT sum(n) FROM (SELECT n FROM per ORDER BY n DESC LIMIT 10) t)::float
                     / (SELECT sum(n) FROM per)
              FROM per
            """
        ).fetchone()
        say(
            f"  events per organisation: max {skew[0]:,}, median {skew[1]:,}, min {skew[2]:,}; "
            f"the 10 biggest have {skew[3]:.0%} of all events"
        )


# --- Instruments ----------------------------------------------------------------------------------

_APP_DIRS = tuple(
    str(REPO / name) + os.sep for name in ("accounts", "core", "usage", "plans", "invoices")
)
_TABLE_RE = re.compile(r'\b(?:FROM|INTO|UPDATE)\s+"?([A-Za-z0-9_]+)"?', re.IGNORECASE)


def _caller_chain(depth: int = 3) -> str:
    """The innermost `depth` app functions on the stack: "usage_total < usage_so_far < ..."."""
    frame = sys._getframe(2)
    chain: list[str] = []
    while frame is not None and len(chain) < depth:
        if frame.f_code.co_filename.startswith(_APP_DIRS):
            name = frame.f_code.co_name
            chain.append("on_commit lambda (async_task)" if name == "<lambda>" else name)
        frame = frame.f_back  # type: ignore[assignment]
    return " < ".join(chain) or "(outside the app: django-q)"


def _statement(sql: str) -> str:
    """A short name for a statement: its verb, what it computes, its first table."""
    words = sql.split(None, 1)
    verb = words[0].upper() if words else "?"
    table = _TABLE_RE.search(sql)
    if verb == "SELECT":
        upper = sql.upper()
        head = upper.split(" FROM ", 1)[0]
        for word in ("COUNT(", "SUM(", "MAX(", "MIN(", "LEAD("):
            if word in head or (word == "LEAD(" and word in upper):
                verb += " " + word.rstrip("(").lower()
        if "FOR UPDATE" in upper:
            verb += " for update"
    return f"{verb} {table.group(1) if table else ''}".strip()


@dataclass
class QueryLog:
    count: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    max_seconds: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        key = (_caller_chain(), _statement(sql))
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            elapsed = time.perf_counter() - start
            self.count[key] += 1
            self.seconds[key] += elapsed
            self.max_seconds[key] = max(self.max_seconds[key], elapsed)


def deadline_tick(
    seconds: float, total: int, report: Callable[[int, float], None]
) -> Callable[[int], None]:
    """A `progress` callback for periods_close that reports every 10% and stops the run (by
    raising _Stop between two transactions, each committed on its own) after `seconds`."""
    start = time.perf_counter()
    done = 0
    step = max(1, total // 10)
    next_report = step

    def tick(n: int) -> None:
        nonlocal done, next_report
        done += n
        elapsed = time.perf_counter() - start
        if done >= next_report:
            report(done, elapsed)
            next_report = (done // step + 1) * step
        if elapsed > seconds:
            raise _Stop(done)

    return tick


class _Stop(Exception):  # noqa: N818 - control flow only
    def __init__(self, done: int) -> None:
        self.done = done


# --- Measurements ---------------------------------------------------------------------------------


def due_periods() -> tuple[list[tuple[Any, Any]], float]:
    from invoices.services import periods_due

    began = time.perf_counter()
    due = periods_due(as_of=AS_OF)
    return due, seconds_since(began)


def close_cutoff() -> datetime:
    """The receipt instant the close counts events up to: the app's own rule when it has one."""
    from invoices import services

    rule = getattr(services, "close_cutoff", None)
    return rule(AS_OF) if rule else AS_OF


def close_options() -> dict[str, Any]:
    """Keyword arguments for periods_close beyond as_of (--batch-size, when it takes one)."""
    from invoices import services

    if BATCH_SIZE and "batch_size" in inspect.signature(services.periods_close).parameters:
        return {"batch_size": BATCH_SIZE}
    return {}


def close_sample(sample: list[tuple[Any, Any]]) -> None:
    """The real `periods_close`, with `periods_due` answering only `sample`: whatever path the
    close takes (one by one, or batches), the sample takes it too."""
    from invoices import services

    original = services.periods_due
    services.periods_due = lambda **_: list(sample)  # type: ignore[assignment]
    try:
        summary = services.periods_close(as_of=AS_OF, **close_options())
    finally:
        services.periods_due = original  # type: ignore[assignment]
    if summary.closed != len(sample):
        raise RuntimeError(f"the sample closed {summary.closed} of {len(sample)} periods")


def undo_closes(db: str) -> None:
    """Back to no invoice at all: the state before any close (ids aside)."""
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            "TRUNCATE invoices_invoiceline, invoices_invoice, invoices_billingperiod, "
            "invoices_invoicenumbersequence, django_q_ormq CASCADE"
        )
        conn.execute("ANALYZE invoices_invoice, invoices_billingperiod, invoices_invoiceline")


def measure_queries(sample: list[tuple[Any, Any]]) -> tuple[float, float, int]:
    """Close `sample` with every statement timed; print the statements per invoice."""
    from django.db import connection

    log = QueryLog()
    connection.ensure_connection()
    # COMMIT is no statement Django executes: time the driver's commit (a round trip and a WAL
    # flush) too. BEGIN is sent by psycopg inside the transaction's first execute().
    original_commit = connection._commit
    commit_key = ("transaction.atomic exit", "COMMIT")

    def timed_commit() -> None:
        start = time.perf_counter()
        try:
            original_commit()
        finally:
            elapsed = time.perf_counter() - start
            log.count[commit_key] += 1
            log.seconds[commit_key] += elapsed
            log.max_seconds[commit_key] = max(log.max_seconds[commit_key], elapsed)

    connection._commit = timed_commit  # type: ignore[method-assign]
    cpu = time.process_time()
    began = time.perf_counter()
    try:
        with connection.execute_wrapper(log):
            close_sample(sample)
    finally:
        del connection._commit  # back to the class's method
    wall = seconds_since(began)
    cpu = time.process_time() - cpu
    n = len(sample)
    queries = sum(count for key, count in log.count.items() if key != commit_key)
    db_seconds = sum(log.seconds.values())
    say(
        f"  {n} invoices: {wall / n * 1000:.2f} ms each (wall), {queries / n:.2f} SQL statements "
        f"+ {log.count[commit_key] / n:.2f} COMMIT each; {db_seconds / n * 1000:.2f} ms inside "
        f"execute()/commit() (driver + round trip + PostgreSQL), "
        f"{(wall - db_seconds) / n * 1000:.2f} ms elsewhere (ORM, pricing, ...); "
        f"this process's CPU {cpu / n * 1000:.2f} ms"
    )
    say("  (psycopg sends BEGIN inside the first statement's execute(); it is counted there)")
    say(f"  {'per invoice':>11} {'ms/inv':>7} {'max ms':>7}  statement   <- issued by")
    rows = sorted(log.count, key=lambda key: -log.seconds[key])
    for key in rows:
        chain, statement = key
        say(
            f"  {log.count[key] / n:>11.2f} {log.seconds[key] / n * 1000:>7.3f} "
            f"{log.max_seconds[key] * 1000:>7.2f}  {statement:<34} <- {chain}"
        )
    return wall, db_seconds, queries


def profile_closes(sample: list[tuple[Any, Any]], top: int) -> float:
    profiler = cProfile.Profile()
    began = time.perf_counter()
    profiler.enable()
    close_sample(sample)
    profiler.disable()
    wall = seconds_since(began)
    say(
        f"  {len(sample)} invoices under cProfile: {wall:.2f} s ({wall / len(sample) * 1000:.2f} "
        "ms each; the profiler itself slows Python down ~1.5-2x)"
    )
    site = str(Path(psycopg.__file__).resolve().parent.parent) + os.sep
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep
    for order, count in (("cumulative", top), ("tottime", 15)):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats(order).print_stats(count)
        text = (
            out.getvalue()
            .replace(str(REPO) + os.sep + ".venv" + os.sep, "")
            .replace(site, "")
            .replace(str(REPO) + os.sep, "")
            .replace(stdlib, "")
        )
        lines = text.splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        say(f"\n  -- top {count} by {order} time --")
        for line in lines[start:]:
            if line.strip():
                say("  " + line[:160])

    # Exclusive (own) time by component: where the Python time goes, summed over functions.
    by_part: dict[str, float] = defaultdict(float)
    for (filename, _, name), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        by_part[_component(filename, name)] += own
    total = sum(by_part.values())
    say(
        f"\n  -- own time by component (ms per invoice, under the profiler; total {total:.2f} s) --"
    )
    for part, own in sorted(by_part.items(), key=lambda item: -item[1]):
        if own / total >= 0.005:
            say(f"  {own / len(sample) * 1000:8.2f} ms {own / total:6.1%}  {part}")
    return wall


def _component(filename: str, name: str) -> str:
    path = filename.replace(os.sep, "/")
    if (
        "/psycopg/" in path
        or "psycopg_binary" in path
        or "psycopg" in name
        or (path == "~" and ("wait" in name or "poll" in name or "select" in name))
    ):
        # Sending, waiting and reading interleave in psycopg's generators: one figure.
        return "psycopg: adapting parameters, sending, waiting for PostgreSQL, reading rows"
    if "/django/db/models/" in path:
        return "Django ORM: building and compiling querysets, making model instances"
    if "/django/db/" in path:
        return "Django DB layer: cursor wrappers, transactions, savepoints, on_commit"
    if "/django_q/" in path or "/picklefield/" in path:
        return "django-q: async_task (uuid, pickling, signing the task)"
    if "/django/" in path:
        return "Django other (signals, timezone, utils)"
    for app in ("accounts", "core", "usage", "plans", "invoices"):
        if f"{REPO.as_posix()}/{app}/" in path:
            return "app: " + path.removeprefix(REPO.as_posix() + "/")
    if path == "~":
        return "builtins (getattr, isinstance, Decimal ops, ...)"
    return "stdlib and others: " + Path(path).name


@dataclass
class Counter:
    """The cheapest statement count: a number and the seconds inside execute(), no stack walk."""

    statements: int = 0
    seconds: float = 0.0

    def __call__(
        self, execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        start = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            self.seconds += time.perf_counter() - start
            self.statements += 1


def close_all(seconds: float, total: int) -> tuple[Any, int, float, float, float, Counter]:
    """The real code path: periods_close over every due period. Returns (summary or None, closed,
    wall, this process's CPU, PostgreSQL's CPU, statements)."""
    from django.db import connection

    from invoices.services import periods_close

    def report(done: int, elapsed: float) -> None:
        say(f"    {done:>7,} closed after {elapsed:6.1f} s ({done / elapsed:,.0f}/s)")

    counter = Counter()
    pg_before = cpu_snapshot(postgres_pids())
    cpu = time.process_time()
    began = time.perf_counter()
    summary = None
    try:
        tick = deadline_tick(seconds, total, report)
        with connection.execute_wrapper(counter):
            summary = periods_close(as_of=AS_OF, progress=tick, **close_options())
        closed = summary.closed
    except _Stop as stop:
        closed = stop.done
        say(f"  stopped after {seconds:.0f} s (--close-seconds): {closed:,} of {total:,} closed")
    wall = seconds_since(began)
    cpu = time.process_time() - cpu
    pg = cpu_delta(pg_before, cpu_snapshot(postgres_pids()))
    return summary, closed, wall, cpu, pg, counter


# --- What-if: a batched close ---------------------------------------------------------------------


def what_if(db: str, workload: Workload, batch: int) -> dict[int, int]:
    """Time the pieces a batched close would be made of (nothing is kept); return each
    organisation's total in minor units, to compare with periods_close's invoices."""
    from django.db import connection, transaction

    from core.money import to_minor_units
    from core.periods import Period
    from invoices.models import BillingPeriod, Invoice, InvoiceLine
    from plans.models import PriceVersion
    from plans.pricing import exact_sum, parse_price_spec, quote
    from usage.aggregation import level_average

    period = Period(ANCHOR, MONTH_END)
    meters = workload.meter_ids
    weighted = meters["storage_gb"]
    ids = workload.organisation_ids
    window = 'AND "timestamp" >= %s AND "timestamp" < %s AND received_at <= %s'
    # Counts and sums of the other meters per (organisation, meter); the level integral of each
    # organisation's weighted meter, by LEAD over its readings. `{orgs}` is either empty (every
    # organisation: a parallel sequential scan of the month) or a filter on a batch.
    totals_sql = (
        "SELECT organisation_id, meter_id, count(*), CAST(sum(quantity) AS TEXT) "
        "FROM usage_usageevent WHERE meter_id <> %s {orgs} " + window + " GROUP BY 1, 2"
    )
    levels_sql = (
        "SELECT organisation_id, CAST(sum(quantity * EXTRACT(EPOCH FROM "  # noqa: S608 - fixed text
        '(COALESCE(next_ts, %s) - "timestamp")) * 1000000) AS TEXT) FROM ('
        'SELECT organisation_id, quantity, "timestamp", LEAD("timestamp") OVER '
        '(PARTITION BY organisation_id ORDER BY "timestamp", id) AS next_ts '
        "FROM usage_usageevent WHERE meter_id = %s {orgs} " + window + ") seg GROUP BY 1"
    )
    cutoffs = [ANCHOR, MONTH_END, close_cutoff()]

    def fetch(cursor: Any, chunk: list[int] | None, into: dict[tuple[int, int], Decimal]) -> float:
        """Both statements, for `chunk` or everyone; returns the seconds of the weighted one."""
        orgs = "" if chunk is None else "AND organisation_id = ANY(%s)"
        extra = [] if chunk is None else [chunk]
        cursor.execute(totals_sql.format(orgs=orgs), [weighted, *extra, *cutoffs])
        for org, meter, n, total in cursor.fetchall():
            into[org, meter] = Decimal(n) if meter == meters["api_calls"] else Decimal(total)
        began = time.perf_counter()
        cursor.execute(levels_sql.format(orgs=orgs), [MONTH_END, weighted, *extra, *cutoffs])
        for org, integral in cursor.fetchall():
            into[org, weighted] = level_average(Decimal(integral), period)
        return seconds_since(began)

    usage: dict[tuple[int, int], Decimal] = {}
    batched_usage: dict[tuple[int, int], Decimal] = {}
    with connection.cursor() as cursor:
        began = time.perf_counter()
        levels_s = fetch(cursor, None, usage)
        aggregate_s = seconds_since(began)
        say(
            f"  every organisation's usage in one pass over the month (2 statements, no "
            f"organisation filter: count/sum GROUP BY organisation, meter; LEAD for the weighted "
            f"meter): {aggregate_s:.2f} s "
            f"({aggregate_s - levels_s:.2f} + {levels_s:.2f}), {len(usage):,} figures"
        )

        began = time.perf_counter()
        for offset in range(0, len(ids), batch):
            fetch(cursor, ids[offset : offset + batch], batched_usage)
        batches_s = seconds_since(began)
        cursor.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
            + totals_sql.format(orgs="AND organisation_id = ANY(%s)"),
            [weighted, ids[:batch], *cutoffs],
        )
        plan = cursor.fetchone()[0]
        plan = (plan if isinstance(plan, list) else json.loads(plan))[0]["Plan"]
        blocks = plan.get("Shared Hit Blocks", 0) + plan.get("Shared Read Blocks", 0)
        cursor.execute(
            "SELECT sum(c.relpages) FROM pg_partition_tree('usage_usageevent') t "
            "JOIN pg_class c ON c.oid = t.relid"
        )
        heap_pages = cursor.fetchone()[0]
        say(
            f"  the same per batch of {batch:,} organisations (ANY(array)): {batches_s:.2f} s in "
            f"{-(-len(ids) // batch)} batches; one batch's count/sum touches {blocks:,} buffers "
            f"(the heap has {heap_pages:,} pages): received_at is not in the index, so every "
            "event is fetched from a heap stored in time order"
        )
        if batched_usage != usage:
            say("  WARNING: per-batch and one-pass figures differ")

    # The same batches with received_at in the index too: index-only scans (once vacuumed).
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        began = time.perf_counter()
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute(
            "CREATE INDEX bench_whatif_covering ON usage_usageevent "
            '(organisation_id, meter_id, "timestamp") INCLUDE (quantity, received_at)'
        )
        conn.execute("VACUUM ANALYZE usage_usageevent")
        built_s = seconds_since(began)
    try:
        covered: dict[tuple[int, int], Decimal] = {}
        with connection.cursor() as cursor:
            began = time.perf_counter()
            for offset in range(0, len(ids), batch):
                fetch(cursor, ids[offset : offset + batch], covered)
            covered_s = seconds_since(began)
        say(
            f"  the same batches with an index on (organisation, meter, timestamp) INCLUDE "
            f"(quantity, received_at) (built and vacuumed in {built_s:.1f} s, then dropped): "
            f"{covered_s:.2f} s"
        )
        if covered != usage:
            say("  WARNING: figures with the covering index differ")
    finally:
        with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
            conn.execute("DROP INDEX IF EXISTS bench_whatif_covering")

    versions = {v.price.meter_id: v for v in PriceVersion.objects.select_related("price__meter")}
    specs = {meter: parse_price_spec(v.spec) for meter, v in versions.items()}
    began = time.perf_counter()
    priced: dict[int, list[tuple[int, Decimal, Any]]] = {}
    for org in ids:
        lines = []
        for meter in sorted(specs):
            quantity = max(usage.get((org, meter), Decimal(0)), Decimal(0))
            cost = quote(specs[meter], quantity)
            lines.append((meter, quantity, cost))
        priced[org] = lines
    rating_s = seconds_since(began)
    say(f"  rating {len(ids) * len(specs):,} lines with plans.pricing.quote: {rating_s:.2f} s")

    began = time.perf_counter()
    insert_s = 0.0
    subscriptions = dict(zip(ids, workload.subscription_ids, strict=True))
    with transaction.atomic():
        inserting = time.perf_counter()
        periods = BillingPeriod.objects.bulk_create(
            [
                BillingPeriod(subscription_id=subscriptions[org], start=ANCHOR, end=MONTH_END)
                for org in ids
            ],
            batch_size=2000,
        )
        insert_s += seconds_since(inserting)
        invoices = []
        all_lines = []
        totals: dict[int, int] = {}
        for number, (org, billing) in enumerate(zip(ids, periods, strict=True), start=1):
            invoice = Invoice(
                organisation_id=org,
                subscription_id=subscriptions[org],
                billing_period=billing,
                period_start=ANCHOR,
                period_end=MONTH_END,
                currency="USD",
                cutoff=AS_OF,
                number=f"WHATIF-2026-{number:06d}",
                status=Invoice.Status.FINALIZED,
                issued_at=AS_OF,
                due_at=AS_OF + timedelta(days=30),
            )
            lines = [
                InvoiceLine(
                    position=1,
                    kind=InvoiceLine.Kind.BASE_FEE,
                    description="Bench plan: base fee",
                    amount_exact=BASE_FEE,
                    amount_minor=to_minor_units(BASE_FEE, "USD"),
                    quantity=Decimal(1),
                )
            ]
            for position, (meter, quantity, cost) in enumerate(priced[org], start=2):
                amount = exact_sum([cost.usage_amount, -cost.discount, -cost.cap])
                lines.append(
                    InvoiceLine(
                        position=position,
                        kind=InvoiceLine.Kind.USAGE,
                        description=versions[meter].price.label,
                        meter_id=meter,
                        price_version=versions[meter],
                        usage_start=ANCHOR,
                        usage_end=MONTH_END,
                        quantity=quantity,
                        unit=versions[meter].price.meter.unit,
                        amount_exact=amount,
                        amount_minor=to_minor_units(amount, "USD"),
                        breakdown=cost.to_json(),
                    )
                )
            total = sum(line.amount_minor for line in lines)
            invoice.subtotal_minor = invoice.total_minor = totals[org] = total
            invoices.append(invoice)
            all_lines.append(lines)
        inserting = time.perf_counter()
        Invoice.objects.bulk_create(invoices, batch_size=2000)
        insert_s += seconds_since(inserting)
        flat = []
        for invoice, lines in zip(invoices, all_lines, strict=True):
            for line in lines:
                line.invoice = invoice
                flat.append(line)
        inserting = time.perf_counter()
        InvoiceLine.objects.bulk_create(flat, batch_size=2000)
        insert_s += seconds_since(inserting)
        write_s = seconds_since(began)
        transaction.set_rollback(True)
    say(
        f"  building and bulk-inserting {len(ids):,} billing periods, invoices and "
        f"{len(flat):,} lines (one transaction, rolled back): {write_s:.2f} s, of which "
        f"{insert_s:.2f} s in bulk_create and {write_s - insert_s:.2f} s building the objects "
        "(to_minor_units, breakdown JSON, model instances)"
    )
    say(
        f"  => a batched close's floor on this machine: about "
        f"{aggregate_s + rating_s + write_s:.1f} s for {len(ids):,} subscriptions "
        "(one-pass aggregation + rating + writes; PDF tasks enqueued in bulk would add a little)"
    )
    return totals


# --- Verification ---------------------------------------------------------------------------------


def queued_invoice_ids(conn: psycopg.Connection[Any]) -> tuple[set[int], int]:
    """The invoice ids the queued django-q tasks will render (one task per invoice or per
    batch, whichever the close queues), and how many tasks are queued."""
    from django_q.signing import SignedPackage

    ids: set[int] = set()
    payloads = [row[0] for row in conn.execute("SELECT payload FROM django_q_ormq")]
    for payload in payloads:
        task = SignedPackage.loads(payload)
        if "invoice_document" not in str(task["func"]):
            continue
        for arg in task["args"]:
            ids.update(arg if isinstance(arg, list | tuple) else [arg])
    return ids, len(payloads)


def verify(
    db: str,
    workload: Workload,
    *,
    closed: int,
    complete: bool,
    sample: int,
    seed: int,
    batched: dict[int, int] | None,
) -> bool:
    from core.money import to_minor_units
    from plans.pricing import parse_price_spec, quote

    ok = True

    def check(label: str, good: bool, detail: str = "") -> None:
        nonlocal ok
        ok = ok and good
        say(f"  {'ok  ' if good else 'FAIL'} {label}{': ' + detail if detail else ''}")

    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        subscriptions = len(workload.subscription_ids)
        invoices, distinct, finalized = conn.execute(
            "SELECT count(*), count(DISTINCT subscription_id), "
            "count(*) FILTER (WHERE status = 'finalized') FROM invoices_invoice"
        ).fetchone()
        expected = subscriptions if complete else closed
        check(
            "one finalized invoice per subscription closed",
            invoices == distinct == finalized == expected,
            f"{invoices:,} invoices, {distinct:,} subscriptions, {finalized:,} finalized, "
            f"expected {expected:,}",
        )
        if complete:
            missing = conn.execute(
                "SELECT count(*) FROM plans_subscription s WHERE NOT EXISTS "
                "(SELECT 1 FROM invoices_invoice i WHERE i.subscription_id = s.id)"
            ).fetchone()[0]
            check("no subscription without an invoice", missing == 0, f"{missing} missing")
        n, low, high, unique, odd = conn.execute(
            r"SELECT count(n), min(n), max(n), count(DISTINCT n), count(*) - count(n) FROM "
            r"(SELECT substring(number from '^INV-2026-(\d{6})$')::int AS n "
            r"FROM invoices_invoice) s"
        ).fetchone()
        check(
            "invoice numbers INV-2026-000001.. gapless",
            odd == 0 and unique == n == invoices and low == 1 and high == invoices,
            f"{n:,} numbers from {low} to {high}, {unique:,} distinct, {odd} malformed",
        )
        last = conn.execute(
            "SELECT last_number FROM invoices_invoicenumbersequence "
            "WHERE prefix = 'INV' AND year = 2026"
        ).fetchone()
        check(
            "number sequence at the last number",
            last is not None and last[0] == invoices,
            f"last_number {last[0] if last else None}",
        )
        lines = conn.execute(
            "SELECT count(*) FROM (SELECT invoice_id FROM invoices_invoiceline GROUP BY 1 "
            "HAVING count(*) = 4 AND count(*) FILTER (WHERE kind = 'usage') = 3) s"
        ).fetchone()[0]
        check(
            "each invoice: a base fee line and 3 usage lines",
            lines == invoices,
            f"{lines:,} of {invoices:,}",
        )
        documents = conn.execute("SELECT count(*) FROM invoices_invoicedocument").fetchone()[0]
        covered, tasks = queued_invoice_ids(conn)
        invoice_ids = {row[0] for row in conn.execute("SELECT id FROM invoices_invoice")}
        check(
            "PDF rendering queued for every invoice, not run inline",
            covered == invoice_ids and documents == 0,
            f"{tasks:,} tasks queued covering {len(covered & invoice_ids):,} of "
            f"{len(invoice_ids):,} invoices, {documents} PDFs rendered",
        )

        rng = random.Random(seed + 1)
        rows = conn.execute(
            "SELECT i.cutoff, i.organisation_id, i.total_minor, i.number "
            "FROM invoices_invoice i ORDER BY i.id"
        ).fetchall()
        specs = {
            meter: parse_price_spec(spec)
            for meter, spec in conn.execute(
                "SELECT p.meter_id, v.spec FROM plans_price p "
                "JOIN plans_priceversion v ON v.price_id = p.id"
            ).fetchall()
        }
        base = to_minor_units(conn.execute("SELECT base_fee FROM plans_plan").fetchone()[0], "USD")
        meters = workload.meter_ids
        period_us = (MONTH_END - ANCHOR) // timedelta(microseconds=1)
        mismatches = 0
        picked = rng.sample(rows, min(sample, len(rows)))
        # The biggest customer too, whatever the draw.
        biggest = workload.organisation_ids[0]
        picked += [row for row in rows if row[1] == biggest and row not in picked]
        for cutoff, org, total, number in picked:
            count, tokens = conn.execute(
                "SELECT count(*) FILTER (WHERE meter_id = %s), "
                "coalesce(sum(quantity) FILTER (WHERE meter_id = %s), 0) "
                "FROM usage_usageevent WHERE organisation_id = %s "
                'AND "timestamp" >= %s AND "timestamp" < %s AND received_at <= %s',
                [meters["api_calls"], meters["ai_tokens"], org, ANCHOR, MONTH_END, cutoff],
            ).fetchone()
            readings = conn.execute(
                'SELECT "timestamp", quantity FROM usage_usageevent '
                "WHERE organisation_id = %s AND meter_id = %s AND received_at <= %s "
                'AND "timestamp" < %s ORDER BY "timestamp", id',
                [org, meters["storage_gb"], cutoff, MONTH_END],
            ).fetchall()
            if readings and readings[0][0] < ANCHOR:
                raise AssertionError("readings before the period: the check assumes none")
            integral = Decimal(0)
            for (at, level), (after, _) in zip(
                readings, [*readings[1:], (MONTH_END, None)], strict=True
            ):
                integral += level * ((after - at) // timedelta(microseconds=1))
            gb = (integral / Decimal(period_us)).quantize(Decimal("0.000001"), ROUND_HALF_UP)
            quantities = {
                meters["api_calls"]: Decimal(count),
                meters["ai_tokens"]: Decimal(tokens),
                meters["storage_gb"]: gb,
            }
            expected_total = base + sum(
                to_minor_units(quote(specs[meter], quantity).amount, "USD")
                for meter, quantity in quantities.items()
            )
            if expected_total != total:
                mismatches += 1
                say(
                    f"       {number} (organisation {org}): invoice {total}, expected "
                    f"{expected_total} from {count} calls, {tokens} tokens, {gb} GB-months"
                )
        check(
            f"{len(picked)} invoices recomputed independently (incl. the biggest customer)",
            mismatches == 0,
            f"{mismatches} mismatches",
        )
        if batched is not None:
            differ = sum(1 for _, org, total, _ in rows if batched.get(org) != total)
            check(
                "the what-if's batched totals equal periods_close's, invoice by invoice",
                differ == 0,
                f"{differ} of {len(rows):,} differ",
            )
    return ok


# --- Orchestration --------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--subscriptions", type=int, default=10_000)
    parser.add_argument(
        "--events", type=int, help=f"default: {EVENTS_PER_ORGANISATION} x --subscriptions"
    )
    parser.add_argument("--query-sample", type=int, default=200)
    parser.add_argument("--profile-sample", type=int, default=500)
    parser.add_argument("--profile-top", type=int, default=25)
    parser.add_argument("--verify", type=int, default=20, help="invoices recomputed")
    parser.add_argument(
        "--close-seconds",
        type=float,
        default=600,
        help="stop the full close after this long and extrapolate",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="passed to periods_close if it takes batch_size (default: the app's default)",
    )
    parser.add_argument(
        "--covering-index",
        action="store_true",
        help="what-if: add an index on (organisation, meter, timestamp) INCLUDE (quantity, "
        "received_at) after loading, and measure everything with it",
    )
    parser.add_argument(
        "--what-if-batch", type=int, default=1000, help="what-if: organisations per batch"
    )
    parser.add_argument("--no-what-if", action="store_true")
    parser.add_argument("--quiet-wait", type=float, default=60)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--db", default="meterline_bench_close")
    parser.add_argument("--keep-db", action="store_true")
    args = parser.parse_args()
    if not 10 <= args.subscriptions <= 200_000:
        parser.error("--subscriptions in [10, 200000]")
    args.events = args.events or EVENTS_PER_ORGANISATION * args.subscriptions
    global BATCH_SIZE, COVERING_INDEX  # noqa: PLW0603 - set once, from the command line
    BATCH_SIZE = args.batch_size
    COVERING_INDEX = args.covering_index
    return args


def quiet(seconds: float) -> None:
    if seconds <= 0:
        return
    calm, waited = wait_for_quiet(seconds)
    if not calm:
        say(f"  (the machine stayed busy with other work for {waited:.0f} s; measuring anyway)")
    elif waited > 2:
        say(f"  (waited {waited:.0f} s for other work on the machine to stop)")


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    say(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    say("== Machine")
    for label, value in machine_info():
        say(f"{label:>18}: {value}")
    ok = True
    say(f"\n== Setup: database {args.db} (fresh), migrate, Django in this process (DEBUG off)")
    database_recreate(args.db)
    try:
        step = time.perf_counter()
        manage(app_environment(args.db), "migrate", "--noinput")
        say(f"  migrate: {seconds_since(step):.1f} s")
        django_start(args.db)
        from django.conf import settings

        say(
            f"  django-q: broker {'orm' if 'orm' in settings.Q_CLUSTER else 'redis'}, sync off "
            "(the PDF task is queued on commit, not run)"
        )
        from invoices import services

        doc = (services.periods_close.__doc__ or "").strip().splitlines()[0]
        say(
            f"  measuring periods_close{inspect.signature(services.periods_close)}: {doc!r}; "
            f"as_of {AS_OF.isoformat()}, events counted up to {close_cutoff().isoformat()}"
        )

        say(
            f"\n== Load: {args.subscriptions:,} subscriptions, about {args.events:,} events over "
            "October 2026"
        )
        step = time.perf_counter()
        workload = load(args.db, args.subscriptions, args.events, args.seed)
        say(f"  load total: {seconds_since(step):.1f} s")
        describe_load(args.db)

        due, due_s = due_periods()
        say(f"\n  periods_due(as_of={AS_OF.isoformat()}): {len(due):,} periods in {due_s:.2f} s")
        if len(due) != args.subscriptions:
            raise RuntimeError(f"{len(due)} periods due, expected {args.subscriptions}")
        rng = random.Random(args.seed)
        shuffled = rng.sample(due, len(due))
        query_sample = shuffled[: min(args.query_sample, len(due) // 2)]
        profile_sample = shuffled[len(query_sample) :][: min(args.profile_sample, len(due) // 2)]

        say(
            f"\n== (1) SQL per invoice: periods_close restricted to {len(query_sample)} random "
            "subscriptions (periods_due patched to answer only them), every statement timed"
        )
        quiet(args.quiet_wait / 3)
        q_wall, q_db, q_count = measure_queries(query_sample)

        say(
            f"\n== (2) cProfile: periods_close restricted to {len(profile_sample)} other random "
            "subscriptions"
        )
        quiet(args.quiet_wait / 3)
        profile_wall = profile_closes(profile_sample, args.profile_top)
        undo_closes(args.db)
        say("\n  (both samples undone: no invoice, billing period, queued task or number left)")

        batched = None
        if not args.no_what_if:
            say("\n== (3) What-if: the pieces of a batched close, timed on the same data")
            quiet(args.quiet_wait / 3)
            batched = what_if(args.db, workload, args.what_if_batch)
            undo_closes(args.db)

        say(
            f"\n== (4) periods_close(as_of={AS_OF.isoformat()}) over all {args.subscriptions:,} "
            f"subscriptions (at most {args.close_seconds:.0f} s)"
        )
        quiet(args.quiet_wait)
        summary, closed, wall, cpu, pg_cpu, counter = close_all(args.close_seconds, len(due))
        rate = closed / wall if wall else 0.0
        complete = summary is not None and closed == args.subscriptions
        say(
            f"  closed {closed:,} invoices in {wall:.1f} s: {rate:,.0f} invoices/s, "
            f"{wall / max(closed, 1) * 1000:.2f} ms each"
        )
        say(
            f"  CPU: this process (Django) {cpu:.1f} s ({cpu / wall:.0%} of the wall time), "
            f"PostgreSQL {pg_cpu:.1f} s ({pg_cpu / wall:.0%})"
        )
        say(
            f"  SQL: {counter.statements:,} statements ({counter.statements / max(closed, 1):.2f} "
            f"per invoice; COMMITs not included), {counter.seconds:.1f} s inside execute() "
            f"({counter.seconds / wall:.0%} of the wall time)"
        )
        if summary is not None:
            say(
                f"  summary: {summary.closed:,} closed, {summary.already} already, "
                f"totals {summary.total_minor}"
            )
        extrapolated = 10_000 / rate if rate else float("inf")
        if not complete or args.subscriptions != 10_000:
            say(
                f"  extrapolated to 10,000 subscriptions at this rate: {extrapolated:,.0f} s "
                "(linear: the work is per subscription)"
            )

        say("\n== Verification (SQL)")
        ok = verify(
            args.db,
            workload,
            closed=closed,
            complete=complete,
            sample=args.verify,
            seed=args.seed,
            batched=batched,
        )

        say("\n== Result")
        measured = complete and args.subscriptions == 10_000
        seconds_10k = wall if measured else extrapolated
        met = seconds_10k < TARGET_SECONDS_FOR_10K
        say(
            f"  periods_close: {rate:,.0f} invoices/s; 10,000 subscriptions in "
            f"{seconds_10k:,.1f} s{'' if measured else ' (extrapolated)'}"
            f" (target {TARGET_SECONDS_FOR_10K:.0f} s: {'met' if met else 'MISSED'}, "
            f"{seconds_10k / TARGET_SECONDS_FOR_10K:.1f}x the target)"
        )
        say(
            f"  per invoice: {q_count / len(query_sample):.1f} SQL statements, "
            f"{q_wall / len(query_sample) * 1000:.2f} ms instrumented ({q_db / q_wall:.0%} inside "
            f"execute()); cProfile sample {profile_wall / len(profile_sample) * 1000:.2f} ms"
        )
        say(f"  checks: {'all passed' if ok else 'FAILED'}")
    finally:
        if "django.db" in sys.modules:
            from django.conf import settings as django_settings
            from django.db import connections

            if django_settings.configured:
                connections.close_all()
        if args.keep_db:
            say(f"kept database {args.db}")
        else:
            database_drop(args.db)
            say(f"dropped database {args.db}")
        say(f"total time {time.monotonic() - began:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
