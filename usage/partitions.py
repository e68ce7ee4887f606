"""Monthly partitions of the usage events table (PostgreSQL; SQLite keeps one plain table).

Layout. `usage_usageevent` is partitioned by range of `timestamp`, one partition per UTC month
(`usage_usageevent_y2026m11` holds `[2026-11-01, 2026-12-01)`), and a default partition
(`usage_usageevent_default`) catches any event whose month has no partition yet, so an insert
never fails for want of one. Its primary key is (id, timestamp): a unique constraint on a
partitioned table must include the partition key, which is also why idempotency keys live in
`UsageEventKey`. Ids still come from one sequence, so they stay unique across partitions.

Upkeep. `partitions_ensure` (the `ensure-event-partitions` schedule, daily, and the migration
that made the table) creates the months ahead of time: from INGEST_MAX_PAST back to
EVENT_PARTITIONS_AHEAD months forward. Creating a month whose events already sit in the default
partition moves them into the new partition in the same transaction, keeping every column
(ids, receipt times and the rollups' `xact_id`): nothing is counted again. A partition is
created detached and then attached, which takes a SHARE UPDATE EXCLUSIVE lock on the parent:
inserts go on meanwhile (PostgreSQL's own CREATE TABLE ... PARTITION OF would block them).

Retention. `usage.archive` exports a month's partition to JSON lines and drops it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import connection, transaction

from core.periods import add_months
from usage.models import UsageEvent

DEFAULT_SUFFIX = "default"
# Held while partitions are created, moved or dropped: one changer at a time.
_LOCK_KEY = 0x6D6C_7061  # "mlpa"


@dataclass(frozen=True, order=True)
class MonthPartition:
    """One month's partition: `[start, end)` in UTC."""

    start: datetime
    end: datetime

    @property
    def name(self) -> str:
        return partition_name(self.start)


def partitioned() -> bool:
    """Whether the events table is partitioned here (PostgreSQL after migration usage 0004)."""
    if connection.vendor != "postgresql":
        return False
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relkind = 'p' FROM pg_class c WHERE c.oid = to_regclass(%s)",
            [UsageEvent._meta.db_table],
        )
        row = cursor.fetchone()
    return bool(row and row[0])


def month_start(at: datetime) -> datetime:
    """The first instant of `at`'s UTC month."""
    at = at.astimezone(UTC)
    return datetime(at.year, at.month, 1, tzinfo=UTC)


def month_after(start: datetime) -> datetime:
    """The first instant of the UTC month after the one `start` (a month's start) begins."""
    return add_months(start, 1)


def months_between(start: datetime, end: datetime) -> list[datetime]:
    """The starts of the UTC months that `[start, end)` touches."""
    months, month = [], month_start(start)
    while month < end:
        months.append(month)
        month = month_after(month)
    return months


def partition_name(month: datetime) -> str:
    return f"{UsageEvent._meta.db_table}_y{month.year:04d}m{month.month:02d}"


def default_partition() -> str:
    return f"{UsageEvent._meta.db_table}_{DEFAULT_SUFFIX}"


def partitions_list() -> list[MonthPartition]:
    """The month partitions that exist, oldest first (the default partition is not listed)."""
    if not partitioned():
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(%s)",
            [UsageEvent._meta.db_table],
        )
        bounds = [row[0] for row in cursor.fetchall()]
    months = []
    for bound in bounds:
        if bound == "DEFAULT":
            continue
        # FOR VALUES FROM ('2026-11-01 00:00:00+00') TO ('2026-12-01 00:00:00+00')
        low, high = (part.split("'")[1] for part in bound.split(" TO "))
        months.append(MonthPartition(_parse_bound(low), _parse_bound(high)))
    return sorted(months)


def _parse_bound(text: str) -> datetime:
    return datetime.fromisoformat(text.replace(" ", "T")).astimezone(UTC)


@dataclass
class EnsureResult:
    created: list[str]
    moved: int  # events moved out of the default partition into new months


def partitions_ensure(
    *, now: datetime | None = None, months: Iterable[datetime] = ()
) -> EnsureResult:
    """Create the partitions of the acceptance window's months and EVENT_PARTITIONS_AHEAD months
    ahead, and of any month in `months`; a no-op where the table is not partitioned."""
    result = EnsureResult([], 0)
    if not partitioned():
        return result
    now = now or datetime.now(UTC)
    wanted = set(
        months_between(
            now - settings.INGEST_MAX_PAST,
            add_months(month_start(now), settings.EVENT_PARTITIONS_AHEAD + 1),
        )
    )
    wanted |= {month_start(month) for month in months}
    have = {partition.start for partition in partitions_list()}
    for month in sorted(wanted - have):
        result.moved += _partition_create(month)
        result.created.append(partition_name(month))
    return result


def _literal(at: datetime) -> str:
    """A timestamptz literal for DDL, which takes no bound parameters (`at` is ours, UTC)."""
    return "'" + at.astimezone(UTC).isoformat() + "'"


def _partition_create(month: datetime) -> int:
    """Create and attach one month's partition, moving its events out of the default partition;
    return how many were moved."""
    table, name, default = UsageEvent._meta.db_table, partition_name(month), default_partition()
    qn = connection.ops.quote_name
    end = month_after(month)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        cursor.execute("SELECT to_regclass(%s)", [name])
        if cursor.fetchone()[0] is not None:
            return 0  # created by another process meanwhile
        cursor.execute(
            f"CREATE TABLE {qn(name)} (LIKE {qn(table)} INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
        )
        # Events of this month that reached the default partition move in, every column kept;
        # attaching then checks them against the bounds and builds the indexes.
        cursor.execute(
            f"WITH moved AS (DELETE FROM {qn(default)} WHERE {qn('timestamp')} >= %s "  # noqa: S608
            f"AND {qn('timestamp')} < %s RETURNING *) INSERT INTO {qn(name)} SELECT * FROM moved",
            [month, end],
        )
        moved = int(max(cursor.rowcount, 0))
        cursor.execute(
            f"ALTER TABLE {qn(table)} ATTACH PARTITION {qn(name)} "
            f"FOR VALUES FROM ({_literal(month)}) TO ({_literal(end)})"
        )
    return moved


def partition_drop(month: datetime) -> None:
    """Detach and drop one month's partition (its events archived first: `usage.archive`)."""
    qn = connection.ops.quote_name
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_LOCK_KEY])
        # Deferred foreign-key checks of rows inserted earlier in this transaction would
        # otherwise keep the table from being dropped.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(
            f"ALTER TABLE {qn(UsageEvent._meta.db_table)} DETACH PARTITION "
            f"{qn(partition_name(month))}"
        )
        cursor.execute(f"DROP TABLE {qn(partition_name(month))}")
