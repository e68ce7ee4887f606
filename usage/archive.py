"""Retention: old months of usage events exported to compressed JSON lines, and loaded back.

`events_archive(before=...)` takes each UTC month before `before` that holds events, one at a
time: it writes the month to `usage-events-YYYY-MM.jsonl.gz` (one event per line, every column,
ordered by id; a month archived again, say what an earlier run kept, to `...YYYY-MM.2.jsonl.gz`:
no file is ever overwritten) and a manifest beside it (`.json`: count, exact sum of quantities
and SHA-256 of the compressed file), both written to a temporary name, flushed to disk and
renamed. Only then, in one transaction that re-counts the month and gives up if anything changed
meanwhile, are the month's events removed: on PostgreSQL its partition is dropped
(`usage.partitions`), elsewhere the rows are deleted. The hourly rollups of the month are
rebuilt from what remains.

What stays. The idempotency keys (`UsageEventKey`): an archived event's key still answers
`duplicate`. And for each organisation and `weighted_sum` meter, its last reading before
`before`: later periods carry that level in from their start, so removing it would change them.
Those few events are in the file too and stay in the table.

Whether a month may go is the caller's question (`manage.py archive_events` asks the invoices
app that every period before it is invoiced); here it must end by INGEST_MAX_PAST ago, so the
API can no longer accept events for it.

`events_restore(path)` loads a file back: rows keep their ids (one already present is skipped),
the month's partition is created if needed, and its rollups are rebuilt. Loading is idempotent.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from django.conf import settings
from django.db import connection, transaction
from django.db.models.functions import TruncMonth

from core.periods import Period
from usage.aggregation import Aggregation
from usage.models import Meter, UsageEvent, UsageEventKey
from usage.partitions import (
    default_partition,
    month_after,
    month_start,
    partition_drop,
    partition_name,
    partitioned,
    partitions_ensure,
    partitions_list,
)
from usage.rollups import rollups_refold
from usage.selectors import _filtered, last_readings_before

# One archive line: every stored column of the event but the rollups' `xact_id`.
FIELDS = (
    "id",
    "organisation_id",
    "meter_id",
    "quantity",
    "properties",
    "timestamp",
    "received_at",
    "idempotency_key",
    "source",
    "delayed",
)
_READ_CHUNK = 10_000


class ArchiveError(ValueError):
    """An archive or restore that must not proceed; nothing was removed."""


@dataclass(frozen=True)
class ArchivedMonth:
    month: datetime
    path: Path
    events: int  # written to the file
    kept: int  # of those, left in the table (last level readings)
    total: Decimal  # exact sum of the quantities written


def archive_file(directory: Path, month: datetime, part: int = 1) -> Path:
    """The month's archive file; a month archived again (what was kept the first time, or
    events imported since) goes to part 2, 3, ...: a file is never overwritten."""
    suffix = "" if part == 1 else f".{part}"
    return directory / f"usage-events-{month:%Y-%m}{suffix}.jsonl.gz"


def _archive_file_new(directory: Path, month: datetime) -> Path:
    part = 1
    while archive_file(directory, month, part).exists():
        part += 1
    return archive_file(directory, month, part)


def months_to_archive(before: datetime) -> list[datetime]:
    """The UTC months before `before` that hold events, oldest first."""
    if partitioned():
        months = set()
        qn = connection.ops.quote_name
        with connection.cursor() as cursor:
            for partition in partitions_list():
                if partition.end <= before:
                    cursor.execute(f"SELECT EXISTS (SELECT 1 FROM {qn(partition.name)})")  # noqa: S608
                    if cursor.fetchone()[0]:
                        months.add(partition.start)
            cursor.execute(
                "SELECT DISTINCT date_trunc('month', timestamp AT TIME ZONE 'UTC') "  # noqa: S608
                f"FROM {qn(default_partition())} WHERE timestamp < %s",
                [before],
            )
            months |= {row[0].replace(tzinfo=UTC) for row in cursor.fetchall()}
        return sorted(months)
    return sorted(
        UsageEvent.objects.filter(timestamp__lt=before)
        .order_by()
        .annotate(month=TruncMonth("timestamp", tzinfo=UTC))
        .values_list("month", flat=True)
        .distinct()
    )


def archive_check(before: datetime, *, now: datetime) -> None:
    """Refuse a `before` that is not a month's start or is still inside the acceptance window."""
    if before != month_start(before):
        raise ArchiveError(f"--before must be the first instant of a UTC month, not {before}.")
    if before > now - settings.INGEST_MAX_PAST:
        raise ArchiveError(
            f"{before:%Y-%m-%d} is inside the acceptance window (INGEST_MAX_PAST_DAYS="
            f"{settings.INGEST_MAX_PAST.days}): events for it may still arrive."
        )


def events_archive(
    *, before: datetime, directory: Path, now: datetime | None = None
) -> list[ArchivedMonth]:
    """Export and remove every month of events before `before` (see the module docstring)."""
    now = now or datetime.now(UTC)
    archive_check(before, now=now)
    directory.mkdir(parents=True, exist_ok=True)
    kept = _kept_ids(before)
    done = []
    for month in months_to_archive(before):
        archived = _archive_month(month, directory, kept)
        if archived is not None:
            done.append(archived)
    return done


def _archive_month(month: datetime, directory: Path, kept: list[int]) -> ArchivedMonth | None:
    period = Period(month, month_after(month))
    kept_ids = list(_in_period(period).filter(id__in=kept).values_list("id", flat=True))
    if _in_period(period).count() == len(kept_ids):
        return None  # only readings kept by an earlier archive, still needed
    path = _archive_file_new(directory, month)
    count, total, digest = _export(period, path)
    with transaction.atomic():
        # Nothing may have arrived since the export (a history import, say).
        if _in_period(period).count() != count:
            raise ArchiveError(f"{month:%Y-%m} changed while it was exported; run again.")
        if any(partition.start == month for partition in partitions_list()):
            _partition_replace(month, kept_ids)
        else:
            _rows_delete(period, kept_ids)
        rollups_refold(period)
    _manifest_write(path, month=month, events=count, kept=len(kept_ids), total=total, sha256=digest)
    return ArchivedMonth(month, path, count, len(kept_ids), total)


def _in_period(period: Period) -> Any:
    return UsageEvent.objects.filter(timestamp__gte=period.start, timestamp__lt=period.end)


def _rows_delete(period: Period, kept_ids: list[int]) -> None:
    """Delete in SQL: the ORM's delete would load every row to look for cascades (a Stripe
    outbox row keeps its own copy of what it sends, and has no constraint on the event)."""
    qn = connection.ops.quote_name
    keep = f" AND id NOT IN ({', '.join(['%s'] * len(kept_ids))})" if kept_ids else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"DELETE FROM {qn(UsageEvent._meta.db_table)} "  # noqa: S608
            f"WHERE {qn('timestamp')} >= %s AND {qn('timestamp')} < %s{keep}",
            [
                connection.ops.adapt_datetimefield_value(period.start),
                connection.ops.adapt_datetimefield_value(period.end),
                *kept_ids,
            ],
        )


def _kept_ids(before: datetime) -> list[int]:
    """The last reading before `before` of each organisation's weighted_sum meters: later
    periods carry its level in."""
    kept: list[int] = []
    for meter in Meter.objects.filter(aggregation=Aggregation.WEIGHTED_SUM):
        events = _filtered(UsageEvent.objects.filter(meter=meter), meter)
        kept += (pk for pk, _ in last_readings_before(events, before).values())
    return sorted(kept)


def _rows(period: Period) -> Iterator[dict[str, Any]]:
    rows = _in_period(period).order_by("id").values(*FIELDS)
    yield from rows.iterator(chunk_size=_READ_CHUNK)


def _export(period: Period, path: Path) -> tuple[int, Decimal, str]:
    """Write the period's events to `path` (atomically); return (count, sum, sha256)."""
    temporary = path.with_name(path.name + ".partial")
    count, total = 0, Decimal(0)
    with open(temporary, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
            for row in _rows(period):
                count += 1
                total += row["quantity"]
                compressed.write(orjson.dumps(_encoded(row)) + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(temporary, path)
    return count, total, _sha256(path)


def _encoded(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **row,
        "quantity": str(row["quantity"]),
        "timestamp": row["timestamp"].astimezone(UTC).isoformat(),
        "received_at": row["received_at"].astimezone(UTC).isoformat(),
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl.gz") + ".json")


def _manifest_write(path: Path, **fields: Any) -> None:
    manifest = _manifest_path(path)
    body = {
        **fields,
        "month": fields["month"].strftime("%Y-%m"),
        "total": str(fields["total"]),
        "file": path.name,
    }
    temporary = manifest.with_name(manifest.name + ".partial")
    temporary.write_bytes(orjson.dumps(body, option=orjson.OPT_INDENT_2))
    os.replace(temporary, manifest)


def _partition_replace(month: datetime, kept_ids: list[int]) -> None:
    """Drop the month's partition, then put back an empty one holding only the kept rows."""
    qn = connection.ops.quote_name
    table, name = UsageEvent._meta.db_table, partition_name(month)
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE usage_archive_kept ON COMMIT DROP AS "  # noqa: S608
            f"SELECT * FROM {qn(name)} WHERE id = ANY(%s)",
            [kept_ids],
        )
        partition_drop(month)
        partitions_ensure(months=[month])
        cursor.execute(f"INSERT INTO {qn(table)} SELECT * FROM usage_archive_kept")  # noqa: S608
        cursor.execute("DROP TABLE usage_archive_kept")


def events_restore(*, path: Path) -> int:
    """Load an archive file back; return how many events were inserted (present ones skipped).

    Read in chunks, in one transaction: a failure part-way loads nothing."""
    manifest = _manifest_path(path)
    if manifest.exists():
        expected = orjson.loads(manifest.read_bytes())
        if expected.get("sha256") and expected["sha256"] != _sha256(path):
            raise ArchiveError(f"{path.name} does not match its manifest's SHA-256.")
    inserted, months = 0, set[datetime]()
    insert = _insert_rows_postgresql if connection.vendor == "postgresql" else _insert_rows
    with transaction.atomic():
        for chunk in _chunks(_read(path), _READ_CHUNK):
            touched = {month_start(row["timestamp"]) for row in chunk}
            if touched - months:
                partitions_ensure(months=touched - months)
                months |= touched
            inserted += insert(chunk)
        for month in sorted(months):
            rollups_refold(Period(month, month_after(month)))
    return inserted


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _read(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                row = orjson.loads(line)
                row["quantity"] = Decimal(row["quantity"])
                row["timestamp"] = datetime.fromisoformat(row["timestamp"])
                row["received_at"] = datetime.fromisoformat(row["received_at"])
                yield row


_RESTORE_STAGING = "usage_restore_staging"


def _insert_rows_postgresql(rows: list[dict[str, Any]]) -> int:
    """`_insert_rows` by COPY into a staging table (a tenth of the time of row-by-row inserts).

    The rows' `xact_id` is 0, below every watermark: `rollups_refold` (not the next fold) puts
    them in the buckets, so they are never counted twice."""
    qn = connection.ops.quote_name
    table, keys = qn(UsageEvent._meta.db_table), qn(UsageEventKey._meta.db_table)
    columns = ", ".join(qn(str(UsageEvent._meta.get_field(n).column)) for n in FIELDS)  # type: ignore[union-attr]
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_RESTORE_STAGING} "
            f"(LIKE {table} INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        with cursor.copy(f"COPY {_RESTORE_STAGING} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(
                    [
                        *(row[name] for name in FIELDS[:4]),
                        orjson.dumps(row["properties"]).decode(),
                        *(row[name] for name in FIELDS[5:]),
                    ]
                )
        cursor.execute(
            f"INSERT INTO {table} ({columns}, xact_id) "  # noqa: S608
            f"SELECT {columns}, 0 FROM {_RESTORE_STAGING} ON CONFLICT DO NOTHING"
        )
        inserted = cursor.rowcount
        cursor.execute(
            f"INSERT INTO {keys} (organisation_id, idempotency_key, event_id) "  # noqa: S608
            f"SELECT organisation_id, idempotency_key, id FROM {_RESTORE_STAGING} "
            "ON CONFLICT DO NOTHING"
        )
        cursor.execute(f"TRUNCATE {_RESTORE_STAGING}")
    return int(max(inserted, 0))


def _insert_rows(rows: list[dict[str, Any]]) -> int:
    """Insert with the original ids (SQLite); a row whose id is present is skipped."""
    qn = connection.ops.quote_name
    ops = connection.ops
    columns = ", ".join(qn(str(UsageEvent._meta.get_field(n).column)) for n in FIELDS)  # type: ignore[union-attr]
    with connection.cursor() as cursor:
        cursor.executemany(
            f"INSERT INTO {qn(UsageEvent._meta.db_table)} ({columns}) "  # noqa: S608
            f"VALUES ({', '.join(['%s'] * len(FIELDS))}) ON CONFLICT DO NOTHING",
            [
                [
                    row["id"],
                    row["organisation_id"],
                    row["meter_id"],
                    ops.adapt_decimalfield_value(row["quantity"]),
                    ops.adapt_json_value(row["properties"], None),
                    ops.adapt_datetimefield_value(row["timestamp"]),
                    ops.adapt_datetimefield_value(row["received_at"]),
                    row["idempotency_key"],
                    row["source"],
                    row["delayed"],
                ]
                for row in rows
            ],
        )
        inserted = int(max(cursor.rowcount, 0))
        cursor.executemany(
            f"INSERT INTO {qn(UsageEventKey._meta.db_table)} "  # noqa: S608
            "(organisation_id, idempotency_key, event_id) VALUES (%s, %s, %s) "
            "ON CONFLICT DO NOTHING",
            [(row["organisation_id"], row["idempotency_key"], row["id"]) for row in rows],
        )
    return inserted
