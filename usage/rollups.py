"""Hourly rollups of usage: folding new events into buckets, and checking them against raw events.

What is kept. `HourlyUsage` holds, per organisation, meter and UTC hour, what the hour's events
aggregate to for every aggregation that merges (count, sum, max, the latest reading by
(timestamp, id)) and the latest receipt time among them; `HourlyUniqueValue` holds the distinct
values a `unique_count` meter saw in that hour. For `weighted_sum` a bucket also keeps its first
reading and the level's integral between its first and last readings; a reader joins buckets by
carrying each one's last level to the next one's first reading. Readers (`usage.selectors`)
take whole hours from the buckets and everything else from raw events, so every figure stays
exact.

The watermark. `RollupState` says which events are in the buckets; a fold moves it forward and
writes the buckets in the same transaction, so a fold that fails changes nothing and no event is
folded twice. Event ids cannot be the watermark on PostgreSQL: ids are drawn when a row is
inserted, not when it commits, so id 41 can commit after id 42 was folded and would be skipped.
Instead each event carries `xact_id`, the id of the transaction that inserted it (a column
default, so every insert path sets it, COPY included). A fold reads PostgreSQL's snapshot:
`xmax` (every transaction id from there on is yet to start) and the ids still running below it.
The watermark is "`xact_id < cursor` and not pending": cursor = xmax, pending = the running ids
(and the fold's own, so a fold inside a transaction that stored events leaves them). A fold
takes exactly the events the new watermark covers and the old one did not: those of
transactions that ended since the last fold, early or late ids alike. A pending transaction
(ours or any other session's on the server, even in another database) delays only its own
events, which readers meanwhile find after the watermark. On SQLite one writer holds the
database at a time and ids are given in commit order, so the watermark is the largest id folded.

Late and backdated events land in their own hour's bucket (a bucket is merged, not only
appended to); a read "as received until R" (a period close's cutoff) reads raw the hours whose
bucket holds an event received after R.

Readers run several statements; each reads the state's version before and after and starts again
if a fold committed in between. A meter whose spec changed since its buckets were built is read
raw until the next scheduled fold rebuilds its buckets.

When. After each ingestion commit (the `events_stored` signal and `transaction.on_commit`, at
most once per ROLLUP_FOLD_INTERVAL per process; skipped when another fold holds the state row),
and every minute by the `fold-rollups` schedule, which also rebuilds changed meters.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Max, Q, QuerySet, Window
from django.db.models.functions import RowNumber, TruncHour
from django.utils import timezone

from core.periods import Period, duration_microseconds
from usage.aggregation import Aggregation
from usage.models import (
    HourlyUniqueValue,
    HourlyUsage,
    Meter,
    MeterRollup,
    RollupState,
    UsageEvent,
)
from usage.selectors import (
    HOUR,
    ROLLED_UP,
    ExactSum,
    UniqueText,
    Watermark,
    _filtered,
    folded,
    hour_floor,
    unfolded,
)

WRITE_BATCH = 2000
_LEVEL_FIELDS = ["first_timestamp", "first_id", "first_quantity", "level_integral"]
_BUCKET_FIELDS = [
    "events",
    "total",
    "peak",
    "last_timestamp",
    "last_id",
    "last_quantity",
    "received_max",
]


@dataclass
class FoldResult:
    """What one fold did. `skipped` when another fold held the state row."""

    skipped: bool = False
    events: int = 0
    buckets: int = 0
    rebuilt: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Partial:
    """A bucket's worth of aggregated events (new ones, or all of an hour when verifying)."""

    events: int = 0
    total: Decimal = Decimal(0)
    peak: Decimal | None = None
    last: tuple[datetime, int, Decimal] | None = None
    received_max: datetime | None = None


def rollups_fold(*, rebuild: bool = True) -> FoldResult:
    """Fold the events committed since the last fold into the hourly buckets; move the cursor.

    With `rebuild`, meters whose spec changed (or that have never been folded) get their
    buckets rebuilt from all folded events; without it (the after-ingestion fold, which must
    stay quick) they are left for the scheduled fold, and read raw until then.
    """
    began = time.perf_counter()
    result = FoldResult()
    RollupState.objects.bulk_create([RollupState(pk=1)], ignore_conflicts=True)
    with transaction.atomic():
        state = RollupState.objects.select_for_update(skip_locked=True).filter(pk=1).first()
        if state is None:
            result.skipped = True
            return result
        lower = Watermark(state.cursor, tuple(state.pending))
        upper = _horizon(lower)
        specs = dict(MeterRollup.objects.values_list("meter_id", "spec"))
        changed = upper != lower
        for meter in Meter.objects.order_by("pk"):
            if meter.spec.aggregation not in ROLLED_UP:
                continue
            if specs.get(meter.pk) == meter.spec_document():
                if upper != lower:
                    events, buckets = _fold_meter(meter, lower=lower, upper=upper)
                    result.events += events
                    result.buckets += buckets
            elif rebuild:
                HourlyUsage.objects.filter(meter=meter).delete()
                HourlyUniqueValue.objects.filter(meter=meter).delete()
                events, buckets = _fold_meter(meter, lower=None, upper=upper)
                result.events += events
                result.buckets += buckets
                MeterRollup.objects.update_or_create(
                    meter=meter, defaults={"spec": meter.spec_document()}
                )
                result.rebuilt.append(meter.code)
                changed = True
        if changed:
            state.cursor, state.pending = upper.cursor, list(upper.pending)
            state.version += 1
            state.folded_at = timezone.now()
            state.save(update_fields=["cursor", "pending", "version", "folded_at"])
    result.seconds = time.perf_counter() - began
    return result


def rollups_refold(period: Period) -> int:
    """Rebuild the buckets of the whole UTC hours of `period` from the raw events the watermark
    covers (after events were archived or loaded back); return how many buckets now hold them.

    Runs under the fold lock (it waits for a running fold) and bumps the version, so readers
    that overlapped it read again."""
    buckets = 0
    RollupState.objects.bulk_create([RollupState(pk=1)], ignore_conflicts=True)
    with transaction.atomic():
        state = RollupState.objects.select_for_update().get(pk=1)
        mark = Watermark(state.cursor, tuple(state.pending))
        specs = dict(MeterRollup.objects.values_list("meter_id", "spec"))
        hours = Q(hour__gte=period.start, hour__lt=period.end)
        for meter in Meter.objects.order_by("pk"):
            if meter.spec.aggregation not in ROLLED_UP:
                continue
            if specs.get(meter.pk) != meter.spec_document():
                continue  # read raw until the scheduled fold rebuilds it whole
            HourlyUsage.objects.filter(hours, meter=meter).delete()
            HourlyUniqueValue.objects.filter(hours, meter=meter).delete()
            buckets += _fold_meter(meter, lower=None, upper=mark, during=period)[1]
        state.version += 1
        state.save(update_fields=["version"])
    return buckets


def _horizon(lower: Watermark) -> Watermark:
    """The new watermark: every event it covers is committed, and stays the only one covered."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_snapshot_xmax(s)::text::bigint, "
                "ARRAY(SELECT x::text::bigint FROM pg_snapshot_xip(s) AS x), "
                "pg_current_xact_id_if_assigned()::text::bigint "
                "FROM (SELECT pg_current_snapshot() AS s) AS snapshot"
            )
            xmax, running, own = cursor.fetchone()
        pending = {*running, *([own] if own is not None else [])}
        return Watermark(max(int(xmax), lower.cursor), tuple(sorted(pending)))
    top = int(UsageEvent.objects.aggregate(top=Max("id"))["top"] or 0)
    return Watermark(max(top, lower.cursor))


def _range(lower: Watermark | None, upper: Watermark) -> Q:
    """Events `upper` covers and `lower` did not."""
    condition = folded(upper)
    return condition if lower is None else condition & unfolded(lower)


def _fold_meter(
    meter: Meter, *, lower: Watermark | None, upper: Watermark, during: Period | None = None
) -> tuple[int, int]:
    """Merge the meter's events between the cursors (and in `during`, hour-aligned, if given)
    into its buckets; return (events, buckets)."""
    events = _filtered(UsageEvent.objects.filter(meter=meter), meter).filter(_range(lower, upper))
    if during is not None:
        events = events.filter(timestamp__gte=during.start, timestamp__lt=during.end)
    if meter.spec.aggregation == Aggregation.WEIGHTED_SUM:
        return _fold_levels(meter, events, upper)
    if connection.vendor == "postgresql":
        return _fold_in_sql(meter, events)
    partials = _partials(meter, events)
    if not partials:
        return 0, 0
    for chunk in _chunks(list(partials.items()), WRITE_BATCH):
        organisations = {organisation_id for (organisation_id, _), _ in chunk}
        hours = {hour for (_, hour), _ in chunk}
        existing = {
            (bucket.organisation_id, bucket.hour): bucket
            for bucket in HourlyUsage.objects.filter(
                meter=meter, organisation_id__in=organisations, hour__in=hours
            )
        }
        merged = []
        for (organisation_id, hour), partial in chunk:
            bucket = existing.get((organisation_id, hour)) or HourlyUsage(
                organisation_id=organisation_id, meter=meter, hour=hour, total=Decimal(0)
            )
            _merge(bucket, partial)
            merged.append(bucket)
        HourlyUsage.objects.bulk_create(
            merged,
            update_conflicts=True,
            unique_fields=["organisation", "meter", "hour"],
            update_fields=_BUCKET_FIELDS,
        )
    if meter.spec.aggregation == Aggregation.UNIQUE_COUNT:
        HourlyUniqueValue.objects.bulk_create(
            (
                HourlyUniqueValue(
                    organisation_id=organisation_id, meter=meter, hour=hour, value=value
                )
                for organisation_id, hour, value in _unique_values(meter, events)
            ),
            batch_size=WRITE_BATCH,
            ignore_conflicts=True,
        )
    return sum(partial.events for partial in partials.values()), len(partials)


# PostgreSQL folds in one statement: the new events grouped per (organisation, hour) and merged
# into existing buckets by ON CONFLICT; the same merge as `_merge`.
_FOLD_SQL = """
WITH e AS ({events}),
grouped AS (
    SELECT e.organisation_id, date_trunc('hour', e."timestamp" AT TIME ZONE 'UTC')
               AT TIME ZONE 'UTC' AS hour,
           count(*) AS events, sum(e.quantity) AS total, max(e.quantity) AS peak,
           max(e.received_at) AS received_max,
           {latest}
      FROM e GROUP BY 1, 2
),
merged AS (
    INSERT INTO usage_hourlyusage AS b (organisation_id, meter_id, hour, events, total, peak,
                                        last_timestamp, last_id, last_quantity, received_max)
    SELECT organisation_id, %s, hour, events, total, peak, last_timestamp, last_id,
           last_quantity, received_max
      FROM grouped
    ON CONFLICT (organisation_id, meter_id, hour) DO UPDATE SET
        events = b.events + EXCLUDED.events,
        total = b.total + EXCLUDED.total,
        peak = GREATEST(b.peak, EXCLUDED.peak),
        received_max = GREATEST(b.received_max, EXCLUDED.received_max),
        last_timestamp = CASE WHEN {newer} THEN EXCLUDED.last_timestamp ELSE b.last_timestamp END,
        last_id = CASE WHEN {newer} THEN EXCLUDED.last_id ELSE b.last_id END,
        last_quantity = CASE WHEN {newer} THEN EXCLUDED.last_quantity ELSE b.last_quantity END
    RETURNING 1
)
SELECT (SELECT coalesce(sum(events), 0) FROM grouped), (SELECT count(*) FROM merged)
"""
_LATEST_SQL = """max(e."timestamp") AS last_timestamp,
           (array_agg(e.id ORDER BY e."timestamp" DESC, e.id DESC))[1] AS last_id,
           (array_agg(e.quantity ORDER BY e."timestamp" DESC, e.id DESC))[1] AS last_quantity"""
_NO_LATEST_SQL = """NULL::timestamptz AS last_timestamp, NULL::bigint AS last_id,
           NULL::numeric AS last_quantity"""
_NEWER_SQL = (
    "(EXCLUDED.last_timestamp IS NOT NULL AND (b.last_timestamp IS NULL OR "
    "(EXCLUDED.last_timestamp, EXCLUDED.last_id) > (b.last_timestamp, b.last_id)))"
)
_UNIQUE_SQL = """
INSERT INTO usage_hourlyuniquevalue (organisation_id, meter_id, hour, value)
SELECT DISTINCT v.organisation_id, %s, v._h, v._v FROM ({values}) v
ON CONFLICT DO NOTHING
"""


def _fold_in_sql(meter: Meter, events: QuerySet[UsageEvent]) -> tuple[int, int]:
    """The fold of one meter's new events in PostgreSQL (what the loop below does in Python)."""
    latest = meter.spec.aggregation == Aggregation.LATEST
    inner, params = (
        events.order_by()
        .values("organisation_id", "timestamp", "id", "quantity", "received_at")
        .query.sql_with_params()
    )
    query = _FOLD_SQL.format(
        events=inner, latest=_LATEST_SQL if latest else _NO_LATEST_SQL, newer=_NEWER_SQL
    )
    with connection.cursor() as cursor:
        cursor.execute(query, [*params, meter.pk])
        folded_events, buckets = cursor.fetchone()
        if meter.spec.aggregation == Aggregation.UNIQUE_COUNT and folded_events:
            values, value_params = _unique_rows(meter, events).query.sql_with_params()
            cursor.execute(_UNIQUE_SQL.format(values=values), [meter.pk, *value_params])
    return int(folded_events), int(buckets)


def _fold_levels(meter: Meter, events: QuerySet[UsageEvent], upper: Watermark) -> tuple[int, int]:
    """Recompute the weighted_sum buckets the new events touch from all their folded events.

    A level's integral depends on the order of the hour's events, so a late event in the middle
    of an hour cannot be merged: its hour is recomputed (level meters see few events an hour).
    """
    touched = set(events.order_by().annotate(_h=_hour()).values_list("organisation_id", "_h"))
    if not touched:
        return 0, 0
    hours = [hour for _, hour in touched]
    around = _filtered(UsageEvent.objects.filter(meter=meter), meter).filter(
        folded(upper),
        organisation_id__in={organisation_id for organisation_id, _ in touched},
        timestamp__gte=min(hours),
        timestamp__lt=max(hours) + HOUR,
    )
    buckets = [bucket for key, bucket in _level_buckets(meter, around).items() if key in touched]
    HourlyUsage.objects.bulk_create(
        buckets,
        batch_size=WRITE_BATCH,
        update_conflicts=True,
        unique_fields=["organisation", "meter", "hour"],
        update_fields=_BUCKET_FIELDS + _LEVEL_FIELDS,
    )
    return events.count(), len(buckets)


def _level_buckets(
    meter: Meter, events: QuerySet[UsageEvent]
) -> dict[tuple[int, datetime], HourlyUsage]:
    """Whole buckets of a weighted_sum meter from its events, in (timestamp, id) order."""
    buckets: dict[tuple[int, datetime], HourlyUsage] = {}
    rows = events.order_by("organisation_id", "timestamp", "id").values_list(
        "organisation_id", "timestamp", "id", "quantity", "received_at"
    )
    for organisation_id, at, event_id, value, received in rows.iterator(chunk_size=5000):
        quantity = Decimal(str(value))
        key = (organisation_id, hour_floor(at))
        bucket = buckets.get(key)
        if bucket is None:
            bucket = buckets[key] = HourlyUsage(
                organisation_id=organisation_id,
                meter=meter,
                hour=key[1],
                events=0,
                total=Decimal(0),
                first_timestamp=at,
                first_id=event_id,
                first_quantity=quantity,
                level_integral=Decimal(0),
                received_max=received,
            )
        else:
            previous_at, previous = bucket.last_timestamp, bucket.last_quantity
            assert previous_at is not None and previous is not None  # noqa: S101 - set below
            bucket.level_integral = (bucket.level_integral or Decimal(0)) + previous * (
                duration_microseconds(at - previous_at)
            )
        bucket.events += 1
        bucket.total += quantity
        bucket.peak = quantity if bucket.peak is None else max(bucket.peak, quantity)
        bucket.last_timestamp, bucket.last_id, bucket.last_quantity = at, event_id, quantity
        bucket.received_max = max(bucket.received_max, received)
    return buckets


def _hour() -> TruncHour:
    return TruncHour("timestamp", tzinfo=UTC)


def _partials(meter: Meter, events: QuerySet[UsageEvent]) -> dict[tuple[int, datetime], _Partial]:
    """Aggregate `events` per (organisation, UTC hour) in the database."""
    partials: dict[tuple[int, datetime], _Partial] = {}
    rows = (
        events.order_by()
        .annotate(_h=_hour())
        .values("organisation_id", "_h")
        .annotate(
            n=Count("*"), total=ExactSum("quantity"), peak=Max("quantity"), got=Max("received_at")
        )
        .values_list("organisation_id", "_h", "n", "total", "peak", "got")
    )
    for organisation_id, hour, count, total, peak, received in rows:
        partials[(organisation_id, hour)] = _Partial(
            events=count,
            total=Decimal(str(total)),
            peak=None if peak is None else Decimal(str(peak)),
            received_max=received,
        )
    if meter.spec.aggregation == Aggregation.LATEST:
        last = (
            events.order_by()
            .annotate(
                _h=_hour(),
                _rank=Window(
                    RowNumber(),
                    partition_by=[F("organisation_id"), _hour()],
                    order_by=[F("timestamp").desc(), F("id").desc()],
                ),
            )
            .filter(_rank=1)
            .values_list("organisation_id", "_h", "timestamp", "id", "quantity")
        )
        for organisation_id, hour, at, event_id, quantity in last:
            partials[(organisation_id, hour)].last = (at, event_id, Decimal(str(quantity)))
    return partials


def _unique_rows(meter: Meter, events: QuerySet[UsageEvent]) -> QuerySet[UsageEvent, Any]:
    """(organisation, UTC hour `_h`, value `_v`) of each event that has a value."""
    assert meter.spec.property is not None  # noqa: S101 - unique_count meters have a property
    rows: QuerySet[UsageEvent, Any] = (
        events.order_by()
        .annotate(_h=_hour(), _v=UniqueText(meter.spec.property))
        .filter(_v__isnull=False)
        .values_list("organisation_id", "_h", "_v")
    )
    return rows


def _unique_values(meter: Meter, events: QuerySet[UsageEvent]) -> Iterable[tuple[int, Any, str]]:
    return _unique_rows(meter, events).distinct().iterator(chunk_size=WRITE_BATCH)


def _merge(bucket: HourlyUsage, partial: _Partial) -> None:
    """Add new events to a bucket: every kept figure merges, whatever order events came in."""
    bucket.events = (bucket.events or 0) + partial.events
    bucket.total = (bucket.total or Decimal(0)) + partial.total
    if partial.peak is not None:
        bucket.peak = partial.peak if bucket.peak is None else max(bucket.peak, partial.peak)
    if partial.last is not None and (
        bucket.last_timestamp is None
        or partial.last[:2] > (bucket.last_timestamp, bucket.last_id or 0)
    ):
        bucket.last_timestamp, bucket.last_id, bucket.last_quantity = partial.last
    if partial.received_max is not None:
        bucket.received_max = (
            partial.received_max
            if bucket.received_max is None
            else max(bucket.received_max, partial.received_max)
        )


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for offset in range(0, len(items), size):
        yield items[offset : offset + size]


# --- Triggers -----------------------------------------------------------------------------------

_last_fold_at = 0.0


def fold_after_commit(**_kwargs: object) -> None:
    """`events_stored` receiver: fold once the storing transaction has committed."""
    transaction.on_commit(_fold_soon, robust=True)


def _fold_soon() -> None:
    """Queue a fold unless this process queued one less than ROLLUP_FOLD_INTERVAL ago (a burst's
    commits share one fold; the minute schedule folds what the last one left). Queued, not run
    here: a fold inside the request that triggered it doubled single-event ingestion's latency
    (bench/ingest.py)."""
    global _last_fold_at  # noqa: PLW0603 - a per-process throttle
    now = time.monotonic()
    if now - _last_fold_at < settings.ROLLUP_FOLD_INTERVAL.total_seconds():
        return
    _last_fold_at = now
    from django_q.tasks import async_task

    async_task("usage.tasks.fold_rollups", rebuild=False)


# --- Verification -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """A bucket whose stored figures differ from its recomputation from raw events."""

    meter: str
    organisation_id: int
    hour: datetime
    stored: str
    expected: str

    def __str__(self) -> str:
        return (
            f"{self.meter} organisation {self.organisation_id} hour {self.hour.isoformat()}: "
            f"stored {self.stored}, raw events give {self.expected}"
        )


def rollups_verify(*, period: Period | None = None) -> tuple[int, list[Difference]]:
    """Recompute every bucket (in `period`, else all) from the raw events the cursor covers and
    compare; return (buckets checked, differences). Holds the fold lock meanwhile."""
    differences: list[Difference] = []
    checked = 0
    RollupState.objects.bulk_create([RollupState(pk=1)], ignore_conflicts=True)
    with transaction.atomic():
        state = RollupState.objects.select_for_update().get(pk=1)
        specs = dict(MeterRollup.objects.values_list("meter_id", "spec"))
        for meter in Meter.objects.order_by("code"):
            if meter.spec.aggregation not in ROLLED_UP:
                continue
            if specs.get(meter.pk) != meter.spec_document():
                continue  # read raw until rebuilt: nothing to compare
            events = _filtered(UsageEvent.objects.filter(meter=meter), meter).filter(
                _range(None, Watermark(state.cursor, tuple(state.pending)))
            )
            buckets = HourlyUsage.objects.filter(meter=meter)
            values = HourlyUniqueValue.objects.filter(meter=meter)
            if period is not None:
                events = events.filter(timestamp__gte=period.start, timestamp__lt=period.end)
                buckets = buckets.filter(hour__gte=period.start, hour__lt=period.end)
                values = values.filter(hour__gte=period.start, hour__lt=period.end)
            if meter.spec.aggregation == Aggregation.WEIGHTED_SUM:
                expected = {k: _shown_bucket(b) for k, b in _level_buckets(meter, events).items()}
                stored = {(b.organisation_id, b.hour): _shown_bucket(b) for b in buckets}
            else:
                expected = {k: _shown(p) for k, p in _partials(meter, events).items()}
                stored = {(b.organisation_id, b.hour): _shown(_as_partial(b)) for b in buckets}
            if meter.spec.aggregation == Aggregation.UNIQUE_COUNT:
                _add_values(expected, _unique_values(meter, events))
                _add_values(stored, values.values_list("organisation_id", "hour", "value"))
            for key in sorted(expected.keys() | stored.keys()):
                checked += 1
                if expected.get(key) != stored.get(key):
                    differences.append(
                        Difference(
                            meter.code,
                            key[0],
                            key[1],
                            stored.get(key, "nothing"),
                            expected.get(key, "nothing"),
                        )
                    )
    return checked, differences


def _as_partial(bucket: HourlyUsage) -> _Partial:
    last = None
    if bucket.last_timestamp is not None and bucket.last_quantity is not None:
        last = (bucket.last_timestamp, bucket.last_id or 0, bucket.last_quantity)
    return _Partial(bucket.events, bucket.total, bucket.peak, last, bucket.received_max)


def _shown_bucket(bucket: HourlyUsage) -> str:
    text = _shown(_as_partial(bucket))
    if bucket.first_timestamp is not None and bucket.first_quantity is not None:
        text += (
            f" first={bucket.first_quantity.normalize():f}@{bucket.first_timestamp.isoformat()}"
            f" integral={(bucket.level_integral or Decimal(0)).normalize():f}"
        )
    return text


def _shown(partial: _Partial) -> str:
    text = f"count={partial.events} sum={partial.total.normalize():f}"
    if partial.peak is not None:
        text += f" max={partial.peak.normalize():f}"
    if partial.last is not None:
        text += f" latest={partial.last[2].normalize():f}@{partial.last[0].isoformat()}"
    if partial.received_max is not None:
        text += f" received_max={partial.received_max.isoformat()}"
    return text


def _add_values(
    shown: dict[tuple[int, datetime], str], rows: Iterable[tuple[int, Any, str]]
) -> None:
    values: dict[tuple[int, datetime], set[str]] = {}
    for organisation_id, hour, value in rows:
        values.setdefault((organisation_id, hour), set()).add(value)
    for key, found in values.items():
        shown[key] = f"{shown.get(key, '')} values={sorted(found)}"
