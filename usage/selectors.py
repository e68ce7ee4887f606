"""Reads of meters and usage: every aggregation computed by the database over `[start, end)`.

The figures equal `usage.aggregation.aggregate` on the same events (the tests hold them to it);
here they are computed in SQL so that a period's usage never loads its events into Python.

count, sum, max, latest and unique_count read the hourly rollups (`usage.rollups` keeps them)
for the whole UTC hours of a period up to the fold's watermark, and the raw events for the
rest: the partial hours at the edges (a period or a local day that does not start on the hour),
the events not folded yet, and the hours whose bucket holds events received after a close's
cutoff. So the figures stay exact while a month's sum reads a few hundred bucket rows.
"""

from __future__ import annotations

import bisect
import time as time_module
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar

import orjson
from django.core.exceptions import EmptyResultSet
from django.db import connection
from django.db.models import (
    Aggregate,
    BooleanField,
    Count,
    DecimalField,
    Expression,
    F,
    Func,
    Max,
    Q,
    QuerySet,
    Sum,
    TextField,
    Value,
    Window,
)
from django.db.models.expressions import RawSQL
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Lead, RowNumber, TruncDay, TruncHour

from accounts.models import Organisation
from core.periods import Period, day_buckets, duration_microseconds, hour_buckets
from usage.aggregation import Aggregation, MeterSpec, Reading, level_average, level_integral
from usage.models import HourlyUniqueValue, HourlyUsage, Meter, UsageEvent

Granularity = Literal["day", "hour"]


class ExactSum(Aggregate):
    """SUM of a decimal column, exact on every backend, returned as decimal text."""

    function = "SUM"
    name = "ExactSum"
    template = "CAST(%(function)s(%(expressions)s) AS TEXT)"
    output_field = TextField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        # SQLite's SUM adds doubles; ml_dsum (usage.sqlite_functions) adds exact Decimals.
        return self.as_sql(
            compiler, connection, function="ml_dsum", template="%(function)s(%(expressions)s)"
        )


def _decimal(value: object) -> Decimal:
    return Decimal(0) if value is None else Decimal(str(value))


# --- Meters ------------------------------------------------------------------------------------

_METER_CACHE: dict[str, Meter] = {}
_METER_CACHE_LOADED_AT = 0.0
METER_CACHE_SECONDS = 30.0


def meter_list() -> QuerySet[Meter]:
    return Meter.objects.order_by("code")


def meters_by_code(codes: Iterable[str]) -> dict[str, Meter]:
    """Return the meters among `codes`, from a per-process cache refreshed every 30 seconds.

    Meters are defined by staff and rarely change; a code missing from the cache is looked up
    again at once, so a meter created a moment ago is never refused.
    """
    global _METER_CACHE_LOADED_AT  # noqa: PLW0603 - a process-wide cache
    wanted = set(codes)
    now = time_module.monotonic()
    if now - _METER_CACHE_LOADED_AT > METER_CACHE_SECONDS or not wanted <= _METER_CACHE.keys():
        _METER_CACHE.clear()
        _METER_CACHE.update({meter.code: meter for meter in Meter.objects.all()})
        _METER_CACHE_LOADED_AT = now
    return {code: _METER_CACHE[code] for code in wanted if code in _METER_CACHE}


def meter_cache_clear() -> None:
    global _METER_CACHE_LOADED_AT  # noqa: PLW0603 - a process-wide cache
    _METER_CACHE.clear()
    _METER_CACHE_LOADED_AT = 0.0


# --- Events --------------------------------------------------------------------------------------


def meter_events(
    *, organisation: Organisation, meter: Meter, received_until: datetime | None = None
) -> QuerySet[UsageEvent]:
    """Return the organisation's events that count for `meter` (its filters applied).

    `received_until` keeps only events received by then: a period close counts what had arrived
    by its as-of instant, so a re-run gives the same figures and later arrivals become
    adjustments.
    """
    events = UsageEvent.objects.filter(organisation=organisation, meter=meter)
    if received_until is not None:
        events = events.filter(received_at__lte=received_until)
    return _filtered(events, meter)


def _filtered(events: QuerySet[UsageEvent], meter: Meter) -> QuerySet[UsageEvent]:
    for position, (name, values) in enumerate(meter.spec.filters.items()):
        # An alias, not `properties__<name>__in`: a property called "contains" would otherwise
        # be read as a lookup. KeyTransform compares JSON values, so "1" never matches 1.
        alias = f"_filter_{position}"
        events = events.alias(**{alias: KeyTransform(name, "properties")}).filter(
            **{f"{alias}__in": list(values)}
        )
    return events


# --- Rollups: the fold's watermark and reading buckets with the raw rest ------------------------

HOUR = timedelta(hours=1)
# A read that sees a fold commit between its queries starts again; after this many it reads raw.
ROLLUP_READ_ATTEMPTS = 3
# Aggregations read from hourly buckets (all of them; a switch for benchmarks).
ROLLED_UP = frozenset(Aggregation)


@dataclass(frozen=True, slots=True)
class Watermark:
    """Which events are in the buckets (see usage.models.RollupState and usage.rollups)."""

    cursor: int = 0
    pending: tuple[int, ...] = ()


def folded(mark: Watermark) -> Q:
    """Events a fold with watermark `mark` has put into the buckets."""
    if connection.vendor == "postgresql":
        return _xact_condition("(xact_id < %s AND NOT xact_id = ANY(%s::bigint[]))", mark)
    return Q(id__lte=mark.cursor)


def unfolded(mark: Watermark) -> Q:
    """Events not in the buckets yet: the raw tail after the watermark."""
    if connection.vendor == "postgresql":
        return _xact_condition("(xact_id >= %s OR xact_id = ANY(%s::bigint[]))", mark)
    return Q(id__gt=mark.cursor)


def _xact_condition(template: str, mark: Watermark) -> Q:
    # xact_id is a PostgreSQL-only column (migration 0003), not a model field.
    sql = template.replace("xact_id", '"usage_usageevent"."xact_id"')
    params = (mark.cursor, list(mark.pending))  # bound, never pasted into the SQL
    return Q(RawSQL(sql, params, output_field=BooleanField()))  # noqa: S611 - fixed template


class UniqueText(Func):
    """The JSON text of a property: what unique_count counts distinct ("1" and 1 stay apart).

    The fold stores it in HourlyUniqueValue and reads compute it on raw events with this same
    expression, so both sides compare equal text. NULL when the property is absent.
    """

    output_field = TextField()

    def __init__(self, name: str) -> None:
        super().__init__(F("properties"))
        self.name = name

    def as_sql(self, compiler: Any, connection: Any, **extra: Any) -> Any:  # type: ignore[override]
        sql, params = compiler.compile(self.source_expressions[0])
        return f"(({sql}) -> %s)::text", (*params, self.name)

    def as_sqlite(self, compiler: Any, connection: Any, **extra: Any) -> Any:
        sql, params = compiler.compile(self.source_expressions[0])
        # json_quote(json_extract()) gives canonical JSON text; a JSON null is no value.
        return (
            f"NULLIF(json_quote(json_extract({sql}, %s)), 'null')",
            (*params, f'$."{self.name}"'),
        )


def rollup_state(meter: Meter) -> tuple[Watermark, int] | None:
    """Return (watermark, version) if `meter`'s buckets are current for its spec, else None.

    None when the meter's spec changed since its buckets were folded (the next scheduled fold
    rebuilds them) or when no fold state exists: the caller then reads raw events only.
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT s.cursor, s.pending, s.version, r.spec FROM usage_rollupstate s "
            "LEFT JOIN usage_meterrollup r ON r.meter_id = %s WHERE s.id = 1",
            [meter.pk],
        )
        row = cursor.fetchone()
    if row is None or row[3] is None:
        return None
    pending, spec = (
        orjson.loads(value) if isinstance(value, str | bytes) else value
        for value in (row[1], row[3])
    )
    if spec != meter.spec_document():
        return None
    return Watermark(int(row[0]), tuple(pending)), int(row[2])


def hour_floor(instant: datetime) -> datetime:
    return instant.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _hour_ceil(instant: datetime) -> datetime:
    floor = hour_floor(instant)
    return floor if floor == instant else floor + HOUR


def rollup_split(
    period: Period, cuts: Iterable[datetime] = ()
) -> tuple[list[Period], list[Period]]:
    """Split `period` into ranges of whole UTC hours (read from buckets) and the rest (raw).

    `cuts` are where a series starts a new bucket: an hour a cut falls inside (a local midnight
    at :30) is read raw, since its events belong to two series buckets.
    """
    low, high = _hour_ceil(period.start), hour_floor(period.end)
    if low >= high:
        return [], [period]
    broken = sorted(
        {
            hour_floor(cut)
            for cut in cuts
            if low < cut < high and cut.minute + cut.second + cut.microsecond
        }
    )
    whole: list[Period] = []
    raw = [Period(period.start, low)] if period.start < low else []
    start = low
    for hour in broken:
        if start < hour:
            whole.append(Period(start, hour))
        raw.append(Period(hour, hour + HOUR))
        start = hour + HOUR
    if start < high:
        whole.append(Period(start, high))
    if high < period.end:
        raw.append(Period(high, period.end))
    return whole, raw


def _within(field: str, ranges: Iterable[Period]) -> Q:
    condition = Q()
    for part in ranges:
        condition |= Q(**{f"{field}__gte": part.start, f"{field}__lt": part.end})
    return condition


Key = Callable[[str], Expression] | None
Grouped = dict[tuple[int, Any], Decimal]


def _rolled_up(
    *,
    organisation_ids: list[int],
    meter: Meter,
    period: Period,
    received_until: datetime | None = None,
    cuts: Iterable[datetime] = (),
    key: Key = None,
) -> Grouped | None:
    """The meter's value per (organisation, key) from buckets plus raw events; None when the
    meter's buckets cannot be used (the caller then reads raw events).

    `key` groups the values (a series' truncation of a time field; None: one value per
    organisation, keyed (id, 0)).
    """
    if meter.spec.aggregation == Aggregation.WEIGHTED_SUM:
        return None
    cut_list = list(cuts)
    return _consistent(
        meter,
        lambda mark: _rollup_compute(
            organisation_ids=organisation_ids,
            meter=meter,
            period=period,
            received_until=received_until,
            cuts=cut_list,
            key=key,
            mark=mark,
        ),
    )


_T = TypeVar("_T")


def _consistent(meter: Meter, compute: Callable[[Watermark], _T]) -> _T | None:
    """Run `compute` with the current watermark; None when the meter is not rolled up.

    Its queries run as separate statements, so the fold's version is read before and after: a
    fold committed in between makes the read start again (raw after a few tries).
    """
    if meter.spec.aggregation not in ROLLED_UP:
        return None
    for _attempt in range(ROLLUP_READ_ATTEMPTS):
        state = rollup_state(meter)
        if state is None:
            return None
        values = compute(state[0])
        if rollup_state(meter) == state:
            return values
    return None


@dataclass(frozen=True, slots=True)
class _Stretch:
    """Readings in time order, as a level integral sees them: a bucket or one raw event."""

    first: tuple[datetime, int]
    last_timestamp: datetime
    last_quantity: Decimal
    inside: Decimal  # integral between the first and the last reading


def _level_integrals_rolled(
    *,
    organisation_ids: list[int],
    meter: Meter,
    intervals: list[Period],
    received_until: datetime | None = None,
) -> dict[int, list[Decimal]] | None:
    """Each organisation's level integral over each of `intervals` (consecutive), or None
    when the meter's buckets cannot be used. Same figures as `_level_integrals`."""
    return _consistent(
        meter,
        lambda mark: _levels_compute(
            organisation_ids=organisation_ids,
            meter=meter,
            intervals=intervals,
            received_until=received_until,
            mark=mark,
        ),
    )


def _levels_compute(
    *,
    organisation_ids: list[int],
    meter: Meter,
    intervals: list[Period],
    received_until: datetime | None,
    mark: Watermark,
) -> dict[int, list[Decimal]]:
    period = Period(intervals[0].start, intervals[-1].end)
    whole, raw = rollup_split(period, [interval.start for interval in intervals])
    events = _filtered(
        UsageEvent.objects.filter(organisation_id__in=organisation_ids, meter=meter), meter
    )
    if received_until is not None:
        events = events.filter(received_at__lte=received_until)
    buckets = HourlyUsage.objects.filter(organisation_id__in=organisation_ids, meter=meter)
    buckets = buckets.filter(_within("hour", whole)) if whole else buckets.none()
    # Hours read raw: those with events not folded yet (they may fall between a bucket's
    # readings) and those holding events received after the cutoff.
    raw_hours: set[tuple[int, datetime]] = set()
    if whole:
        raw_hours |= set(
            events.filter(_within("timestamp", whole) & unfolded(mark))
            .order_by()
            .annotate(_h=TruncHour("timestamp", tzinfo=UTC))
            .values_list("organisation_id", "_h")
            .distinct()
        )
        if received_until is not None:
            late = buckets.filter(received_max__gt=received_until)
            raw_hours |= set(late.values_list("organisation_id", "hour"))
    arms = _within("timestamp", raw)
    for organisation_id, hour in raw_hours:
        arms |= Q(organisation_id=organisation_id, timestamp__gte=hour, timestamp__lt=hour + HOUR)
        buckets = buckets.exclude(organisation_id=organisation_id, hour=hour)
    points = events.filter(arms) if arms else events.none()  # Q() alone would match all
    if len(intervals) == 1:
        return _levels_in_sql(organisation_ids, buckets, points, events, period)

    stretches: dict[int, list[_Stretch]] = {pk: [] for pk in organisation_ids}
    for organisation_id, first_at, first_id, last_at, last_q, inside in buckets.values_list(
        "organisation_id",
        "first_timestamp",
        "first_id",
        "last_timestamp",
        "last_quantity",
        "level_integral",
    ):
        # A weighted_sum bucket always has its first and last readings.
        assert first_at is not None and first_id is not None and last_at is not None  # noqa: S101
        stretches[organisation_id].append(
            _Stretch((first_at, first_id), last_at, _decimal(last_q), _decimal(inside))
        )
    for organisation_id, at, pk, quantity in points.values_list(
        "organisation_id", "timestamp", "id", "quantity"
    ):
        stretches[organisation_id].append(_Stretch((at, pk), at, _decimal(quantity), Decimal(0)))
    carried = _carried_levels(events, period.start)
    result = {}
    for organisation_id, found in stretches.items():
        found.sort(key=lambda stretch: stretch.first)
        result[organisation_id] = _integrate(found, carried.get(organisation_id), intervals)
    return result


def _levels_in_sql(
    organisation_ids: list[int],
    buckets: QuerySet[HourlyUsage],
    points: QuerySet[UsageEvent],
    events: QuerySet[UsageEvent],
    period: Period,
) -> dict[int, list[Decimal]]:
    """One period's level integrals computed in the database, over buckets and raw readings.

    Each stretch (a bucket, or one reading) contributes its inside integral plus its last level
    held until the next stretch's first reading (LEAD) or the period's end; the last readings
    before the period are stretches too, clipped to its start.
    """
    carried_at = (
        events.filter(timestamp__lt=period.start)
        .order_by()
        .values("organisation_id")
        .annotate(at=Max("timestamp"))
        .values_list("organisation_id", "at")
    )
    condition = Q()
    for organisation_id, at in carried_at:
        condition |= Q(organisation_id=organisation_id, timestamp=at)
    if condition:
        points = points | events.filter(condition)
    zero = Value(Decimal(0), output_field=DecimalField(max_digits=40, decimal_places=6))
    union, params = _union_sql(
        (
            _stretches(
                buckets, "first_timestamp", "first_id", "last_timestamp", "last_quantity"
            ).annotate(_in=F("level_integral")),
            _stretches(points, "timestamp", "id", "timestamp", "quantity").annotate(_in=zero),
        ),
        ("_o", "_f", "_fi", "_l", "_q", "_in"),
    )
    integrals = {pk: [Decimal(0)] for pk in organisation_ids}
    if not union:
        return integrals
    start = connection.ops.adapt_datetimefield_value(period.start)
    end = connection.ops.adapt_datetimefield_value(period.end)
    if connection.vendor == "postgresql":
        held = (
            "CAST(SUM(u._q * EXTRACT(EPOCH FROM (GREATEST(COALESCE(u._next, %s), %s) "
            "- GREATEST(u._l, %s))) * 1000000) AS TEXT)"
        )
        inside = "CAST(SUM(CAST(u._in AS NUMERIC)) AS TEXT)"
    else:
        held = (
            "ml_dsum_product(u._q, ml_epoch_us(MAX(COALESCE(u._next, %s), %s)) "
            "- ml_epoch_us(MAX(u._l, %s)))"
        )
        inside = "ml_dsum(u._in)"
    query = (
        f"SELECT u._o, {held}, {inside} FROM (SELECT i.*, LEAD(i._f) OVER "  # noqa: S608
        f"(PARTITION BY i._o ORDER BY i._f, i._fi) AS _next FROM ({union}) i) u GROUP BY u._o"
    )
    with connection.cursor() as cursor:
        cursor.execute(query, [end, start, start, *params])
        for organisation_id, held_part, inside_part in cursor.fetchall():
            integrals[organisation_id] = [_decimal(held_part) + _decimal(inside_part)]
    return integrals


def _stretches(source: QuerySet[Any], *fields: str) -> QuerySet[Any]:
    """`source` as stretches: organisation, first reading (time, id), last reading and level."""
    first, first_id, last, level = fields
    stretches: QuerySet[Any] = source.order_by().annotate(
        _o=F("organisation_id"), _f=F(first), _fi=F(first_id), _l=F(last), _q=F(level)
    )
    return stretches


def _carried_levels(events: QuerySet[UsageEvent], start: datetime) -> dict[int, Decimal]:
    """Each organisation's level at `start`: its last reading before it, by (timestamp, id)."""
    return {
        organisation_id: quantity
        for organisation_id, (_, quantity) in last_readings_before(events, start).items()
    }


def last_readings_before(
    events: QuerySet[UsageEvent], start: datetime
) -> dict[int, tuple[int, Decimal]]:
    """Each organisation's last event before `start` by (timestamp, id): {organisation: (id,
    quantity)}. The reading a level meter carries into whatever starts at `start`."""
    last_at = dict(
        events.filter(timestamp__lt=start)
        .order_by()
        .values("organisation_id")
        .annotate(at=Max("timestamp"))
        .values_list("organisation_id", "at")
    )
    if not last_at:
        return {}
    condition = Q()
    for organisation_id, at in last_at.items():
        condition |= Q(organisation_id=organisation_id, timestamp=at)
    readings: dict[int, tuple[int, Decimal]] = {}
    for organisation_id, pk, quantity in events.filter(condition).values_list(
        "organisation_id", "id", "quantity"
    ):
        if organisation_id not in readings or pk > readings[organisation_id][0]:
            readings[organisation_id] = (pk, _decimal(quantity))
    return readings


def _integrate(
    stretches: list[_Stretch], carried: Decimal | None, intervals: list[Period]
) -> list[Decimal]:
    """Integrate the level over each interval: each stretch lies inside one interval, and the
    level between stretches is the previous one's last reading (the carried level first)."""
    integrals = []
    level = carried or Decimal(0)
    position = 0
    for interval in intervals:
        total = Decimal(0)
        at = interval.start
        while position < len(stretches) and stretches[position].first[0] < interval.end:
            stretch = stretches[position]
            total += level * duration_microseconds(stretch.first[0] - at) + stretch.inside
            level, at = stretch.last_quantity, stretch.last_timestamp
            position += 1
        integrals.append(total + level * duration_microseconds(interval.end - at))
    return integrals


def _rollup_compute(
    *,
    organisation_ids: list[int],
    meter: Meter,
    period: Period,
    received_until: datetime | None,
    cuts: list[datetime],
    key: Key,
    mark: Watermark,
) -> Grouped:
    whole, raw = rollup_split(period, cuts)
    buckets = HourlyUsage.objects.filter(organisation_id__in=organisation_ids, meter=meter)
    buckets = buckets.filter(_within("hour", whole)) if whole else buckets.none()
    skipped: list[tuple[int, datetime]] = []
    if received_until is not None and whole:
        # Buckets holding events received after the cutoff: their hours are read raw.
        late = buckets.filter(received_max__gt=received_until)
        skipped = list(late.values_list("organisation_id", "hour"))
        buckets = buckets.filter(received_max__lte=received_until)
    arms = _within("timestamp", raw)
    if whole:
        arms |= _within("timestamp", whole) & unfolded(mark)
    for organisation_id, hour in skipped:
        arms |= Q(
            organisation_id=organisation_id, timestamp__gte=hour, timestamp__lt=hour + HOUR
        ) & folded(mark)
    events = _filtered(
        UsageEvent.objects.filter(organisation_id__in=organisation_ids, meter=meter), meter
    ).filter(arms)
    if received_until is not None:
        events = events.filter(received_at__lte=received_until)

    spec = meter.spec
    if spec.aggregation == Aggregation.UNIQUE_COUNT:
        values = HourlyUniqueValue.objects.filter(organisation_id__in=organisation_ids, meter=meter)
        values = values.filter(_within("hour", whole)) if whole else values.none()
        for organisation_id, hour in skipped:
            values = values.exclude(organisation_id=organisation_id, hour=hour)
        counts = _distinct_union(
            _keyed(values, "hour", key).annotate(_v=F("value")),
            _keyed(events, "timestamp", key).annotate(_v=_unique_text(spec)),
        )
        if key is None:
            return counts
        # Raw SQL skips Django's converters: a truncated time comes back as local wall time.
        zone = getattr(key("hour"), "tzinfo", None) or UTC
        return {(o, _local_instant(k, zone)): n for (o, k), n in counts.items()}
    if spec.aggregation == Aggregation.LATEST:
        return _latest_of(
            _ranked(buckets, "hour", key, ("last_timestamp", "last_id", "last_quantity")),
            _ranked(events, "timestamp", key, ("timestamp", "id", "quantity")),
        )
    bucket_value: Any
    event_value: Any
    match spec.aggregation:
        case Aggregation.COUNT:
            bucket_value, event_value = Sum("events"), Count("*")
        case Aggregation.SUM:
            bucket_value, event_value = ExactSum("total"), ExactSum("quantity")
        case _:
            bucket_value, event_value = Max("peak"), Max("quantity")
    combine = max if spec.aggregation == Aggregation.MAX else _add
    result: Grouped = {}
    for part, value in (("hour", bucket_value), ("timestamp", event_value)):
        source = buckets if part == "hour" else events
        rows = (
            _keyed(source, part, key)
            .values("_o", "_k")
            .annotate(_value=value)
            .values_list("_o", "_k", "_value")
        )
        for organisation_id, group, total in rows:
            if total is None:
                continue
            index = (organisation_id, group)
            number = _decimal(total)
            result[index] = combine(result[index], number) if index in result else number
    return result


def _add(left: Decimal, right: Decimal) -> Decimal:
    return left + right


def _keyed(source: QuerySet[Any], field: str, key: Key) -> QuerySet[Any]:
    """`source` with `_o` (the organisation) and `_k` (its group) annotated, unordered."""
    group: Any = key(field) if key is not None else Value(0)
    keyed: QuerySet[Any] = source.order_by().annotate(_o=F("organisation_id"), _k=group)
    return keyed


def _ranked(
    source: QuerySet[Any], field: str, key: Key, columns: tuple[str, str, str]
) -> QuerySet[Any]:
    """Each group's last row by (at, tie), as (_o, _k, at, tie, value) for `columns`."""
    at, tie, value = columns
    keyed = _keyed(source, field, key)
    ranked: QuerySet[Any] = (
        keyed.annotate(
            _rank=Window(
                RowNumber(),
                partition_by=[F("_o"), F("_k")],
                order_by=[F(at).desc(), F(tie).desc()],
            )
        )
        .filter(_rank=1)
        .values_list("_o", "_k", at, tie, value)
    )
    return ranked


def _latest_of(*sources: QuerySet[Any]) -> Grouped:
    best: dict[tuple[int, Any], tuple[datetime, int, object]] = {}
    for source in sources:
        for organisation_id, group, at, tie, value in source:
            index = (organisation_id, group)
            if at is not None and (index not in best or (at, tie) > best[index][:2]):
                best[index] = (at, tie, value)
    return {index: _decimal(value) for index, (_, _, value) in best.items()}


def _distinct_union(*sources: QuerySet[Any]) -> Grouped:
    """COUNT(DISTINCT _v) per (_o, _k) over the union of the sources' rows."""
    union, params = _union_sql(sources, ("_o", "_k", "_v"))
    if not union:
        return {}
    query = f"SELECT u._o, u._k, COUNT(DISTINCT u._v) FROM ({union}) u GROUP BY u._o, u._k"  # noqa: S608 - our own compiled SQL, parameters apart
    with connection.cursor() as cursor:
        cursor.execute(query, params)
        return {(o, k): Decimal(n) for o, k, n in cursor.fetchall()}


def _union_sql(sources: Iterable[QuerySet[Any]], columns: tuple[str, ...]) -> tuple[str, list[Any]]:
    """The sources' `columns` as one UNION ALL (Django's compiled SQL, parameters apart);
    empty when every source is `.none()`."""
    parts: list[str] = []
    params: list[Any] = []
    for source in sources:
        try:
            sql, source_params = source.values_list(*columns).query.sql_with_params()
        except EmptyResultSet:
            continue  # a `.none()` source: no rows
        parts.append(f"SELECT * FROM ({sql}) p")  # noqa: S608 - Django's compiled SQL
        params += source_params
    return " UNION ALL ".join(parts), params


def _local_instant(value: datetime | str, zone: Any) -> datetime:
    instant = datetime.fromisoformat(value) if isinstance(value, str) else value
    return instant if instant.tzinfo is not None else instant.replace(tzinfo=zone)


def _unique_text(spec: MeterSpec) -> UniqueText:
    assert spec.property is not None  # noqa: S101 - unique_count meters have a property
    return UniqueText(spec.property)


def usage_total(
    *,
    organisation: Organisation,
    meter: Meter,
    period: Period,
    received_until: datetime | None = None,
) -> Decimal:
    """Return the meter's value for the organisation over `period`, computed in the database."""
    rolled = _rolled_up(
        organisation_ids=[organisation.pk],
        meter=meter,
        period=period,
        received_until=received_until,
    )
    if rolled is not None:
        return rolled.get((organisation.pk, 0), Decimal(0))
    events = meter_events(organisation=organisation, meter=meter, received_until=received_until)
    inside = events.filter(timestamp__gte=period.start, timestamp__lt=period.end)
    spec = meter.spec
    match spec.aggregation:
        case Aggregation.COUNT:
            return Decimal(inside.count())  # COUNT(*): from the index alone
        case Aggregation.SUM:
            return _decimal(inside.aggregate(value=ExactSum("quantity"))["value"])
        case Aggregation.MAX:
            return _decimal(inside.aggregate(value=Max("quantity"))["value"])
        case Aggregation.UNIQUE_COUNT:
            unique = _unique_expression(spec)
            return Decimal(inside.aggregate(value=Count(unique, distinct=True))["value"])
        case Aggregation.LATEST:
            last = inside.order_by("-timestamp", "-id").values_list("quantity", flat=True).first()
            return _decimal(last)
        case Aggregation.WEIGHTED_SUM:
            integral = _level_integral_of(organisation, meter, period, received_until)
            return level_average(integral, period)
    raise AssertionError(spec.aggregation)  # pragma: no cover


def _level_integral_of(
    organisation: Organisation, meter: Meter, period: Period, received_until: datetime | None
) -> Decimal:
    """The level integral over `period`, from the rollups when they can be used, else raw."""
    rolled = _level_integrals_rolled(
        organisation_ids=[organisation.pk],
        meter=meter,
        intervals=[period],
        received_until=received_until,
    )
    if rolled is not None:
        return rolled[organisation.pk][0]
    events = meter_events(organisation=organisation, meter=meter, received_until=received_until)
    return _level_integral(events, period)


def usage_so_far(
    *,
    organisation: Organisation,
    meter: Meter,
    period: Period,
    as_of: datetime,
    received_until: datetime | None = None,
) -> Decimal:
    """Return the meter's billable value for `period` counting only events before `as_of`.

    For `weighted_sum` this is the level accrued so far over the whole period's length (GB-months
    used until now), not the average level of the elapsed part.
    """
    if as_of >= period.end:
        return usage_total(
            organisation=organisation, meter=meter, period=period, received_until=received_until
        )
    if as_of <= period.start:
        return Decimal(0)
    elapsed = Period(period.start, as_of)
    if meter.spec.aggregation == Aggregation.WEIGHTED_SUM:
        integral = _level_integral_of(organisation, meter, elapsed, received_until)
        return level_average(integral, period)
    return usage_total(
        organisation=organisation, meter=meter, period=elapsed, received_until=received_until
    )


# Aggregations a batch computes for many organisations in one query: all of them.
BATCHABLE = frozenset(Aggregation)


def usage_totals(
    *,
    organisation_ids: list[int],
    meter: Meter,
    period: Period,
    received_until: datetime | None = None,
) -> dict[int, Decimal]:
    """The meter's value over `period` for many organisations in one query (two for
    weighted_sum): what a period close reads for a batch instead of queries per customer.
    Equal to `usage_total` for each organisation (a test holds them to it)."""
    spec = meter.spec
    if spec.aggregation == Aggregation.WEIGHTED_SUM:
        levels = _level_integrals_rolled(
            organisation_ids=organisation_ids,
            meter=meter,
            intervals=[period],
            received_until=received_until,
        )
        if levels is not None:
            return {pk: level_average(integrals[0], period) for pk, integrals in levels.items()}
    rolled = _rolled_up(
        organisation_ids=organisation_ids,
        meter=meter,
        period=period,
        received_until=received_until,
    )
    if rolled is not None:
        totals = dict.fromkeys(organisation_ids, Decimal(0))
        totals.update({organisation_id: value for (organisation_id, _), value in rolled.items()})
        return totals
    events = UsageEvent.objects.filter(organisation_id__in=organisation_ids, meter=meter)
    if received_until is not None:
        events = events.filter(received_at__lte=received_until)
    events = _filtered(events, meter)
    totals = dict.fromkeys(organisation_ids, Decimal(0))
    if spec.aggregation == Aggregation.WEIGHTED_SUM:
        for organisation_id, integral in _level_integrals(events, period).items():
            totals[organisation_id] = level_average(integral, period)
        return totals
    inside = events.filter(timestamp__gte=period.start, timestamp__lt=period.end).order_by()
    rows: Iterable[tuple[int, object]]
    if spec.aggregation == Aggregation.LATEST:
        rows = _last_quantity_per_organisation(inside)
    else:
        value: Any
        match spec.aggregation:
            case Aggregation.COUNT:
                # COUNT(*), not COUNT(id): answered from the index alone.
                value = Count("*")
            case Aggregation.SUM:
                value = ExactSum("quantity")
            case Aggregation.MAX:
                value = Max("quantity")
            case _:
                value = Count(_unique_expression(spec), distinct=True)
        rows = (
            inside.values("organisation_id")
            .annotate(value=value)
            .values_list("organisation_id", "value")
        )
    totals.update({organisation_id: _decimal(v) for organisation_id, v in rows})
    return totals


def _unique_expression(spec: MeterSpec) -> KeyTransform:
    assert spec.property is not None  # noqa: S101 - unique_count meters have a property
    return KeyTransform(spec.property, "properties")


def _level_window(events: QuerySet[UsageEvent], period: Period) -> QuerySet[UsageEvent]:
    """Events that set the level during `period`: those inside it and the last ones before it."""
    carried_from = events.filter(timestamp__lt=period.start).aggregate(at=Max("timestamp"))["at"]
    return events.filter(timestamp__gte=carried_from or period.start, timestamp__lt=period.end)


def _level_integral(events: QuerySet[UsageEvent], period: Period) -> Decimal:
    """The level integral of one organisation's events (see `_level_integrals`)."""
    return next(iter(_level_integrals(events, period).values()), Decimal(0))


def _level_integrals(events: QuerySet[UsageEvent], period: Period) -> dict[int, Decimal]:
    """Return each organisation's integral of the level over `period` (level x microseconds).

    Each event's level holds until the organisation's next event (LEAD over timestamp, id) or
    the period's end; the last event before the period carries its level in from the period's
    start. Segments are clipped to the period, so reading from the earliest carried-in event of
    any organisation is exact for all: older readings last no time inside the period.
    """
    carried = (
        events.filter(timestamp__lt=period.start)
        .order_by()
        .values("organisation_id")
        .annotate(at=Max("timestamp"))
        .values_list("at", flat=True)
    )
    lower = min(carried, default=None) or period.start
    segments = (
        events.filter(timestamp__gte=lower, timestamp__lt=period.end)
        .annotate(
            next_ts=Window(
                Lead("timestamp"),
                partition_by=[F("organisation_id")],
                order_by=[F("timestamp").asc(), F("id").asc()],
            )
        )
        .values("organisation_id", "quantity", "timestamp", "next_ts")
    )
    inner_sql, inner_params = segments.query.sql_with_params()
    start = connection.ops.adapt_datetimefield_value(period.start)
    end = connection.ops.adapt_datetimefield_value(period.end)
    if connection.vendor == "postgresql":
        # EXTRACT(EPOCH FROM interval) is exact NUMERIC on PostgreSQL 14 and later.
        outer = (
            "SELECT seg.organisation_id, CAST(SUM(seg.quantity * EXTRACT(EPOCH FROM "
            "(GREATEST(COALESCE(seg.next_ts, %s), %s) - GREATEST(seg.timestamp, %s))) * 1000000)"
            " AS TEXT) "
            "FROM ({}) seg GROUP BY seg.organisation_id"
        )
    else:
        outer = (
            "SELECT seg.organisation_id, ml_dsum_product(seg.quantity, "
            "ml_epoch_us(MAX(COALESCE(seg.next_ts, %s), %s)) "
            "- ml_epoch_us(MAX(seg.timestamp, %s))) "
            "FROM ({}) seg GROUP BY seg.organisation_id"
        )
    # The inner SQL is Django's own compilation of the queryset, with its parameters apart.
    with connection.cursor() as cursor:
        cursor.execute(outer.format(inner_sql), [end, start, start, *inner_params])
        return {organisation_id: _decimal(value) for organisation_id, value in cursor.fetchall()}


def usage_series(
    *,
    organisation: Organisation,
    meter: Meter,
    period: Period,
    granularity: Granularity,
) -> list[tuple[Period, Decimal]]:
    """Return the meter's value per day (local to the organisation) or per UTC hour.

    Each bucket's value is the meter's aggregation over that bucket as if it were a period, so a
    day's `max` is that day's peak and a day's `weighted_sum` its average level.
    """
    tz = organisation.tzinfo
    buckets = day_buckets(period, tz) if granularity == "day" else hour_buckets(period)
    events = meter_events(organisation=organisation, meter=meter)
    spec = meter.spec
    if spec.aggregation == Aggregation.WEIGHTED_SUM:
        levels = _level_integrals_rolled(
            organisation_ids=[organisation.pk], meter=meter, intervals=buckets
        )
        if levels is None:
            return _level_series(events, period, buckets)
        integrals = levels[organisation.pk]
        return [
            (bucket, level_average(integral, bucket))
            for bucket, integral in zip(buckets, integrals, strict=True)
        ]

    starts = [bucket.start for bucket in buckets]
    values = [Decimal(0)] * len(buckets)

    def truncate(field: str) -> Expression:
        if granularity == "day":
            return TruncDay(field, tzinfo=tz)
        return TruncHour(field, tzinfo=None)

    rolled = _rolled_up(
        organisation_ids=[organisation.pk], meter=meter, period=period, cuts=starts, key=truncate
    )
    if rolled is not None:
        for (_, bucket_start), value in rolled.items():
            values[max(bisect.bisect_right(starts, bucket_start) - 1, 0)] = value
        return list(zip(buckets, values, strict=True))
    trunc = truncate("timestamp")
    inside = events.filter(timestamp__gte=period.start, timestamp__lt=period.end)
    grouped = inside.annotate(bucket=trunc).values("bucket")
    rows: Iterable[tuple[datetime, object]]
    match spec.aggregation:
        case Aggregation.COUNT:
            rows = grouped.annotate(value=Count("id")).values_list("bucket", "value")
        case Aggregation.SUM:
            rows = grouped.annotate(value=ExactSum("quantity")).values_list("bucket", "value")
        case Aggregation.MAX:
            rows = grouped.annotate(value=Max("quantity")).values_list("bucket", "value")
        case Aggregation.UNIQUE_COUNT:
            unique = Count(_unique_expression(spec), distinct=True)
            rows = grouped.annotate(value=unique).values_list("bucket", "value")
        case Aggregation.LATEST:
            rows = (
                inside.annotate(
                    bucket=trunc,
                    rank=Window(
                        RowNumber(),
                        partition_by=[trunc],
                        order_by=[F("timestamp").desc(), F("id").desc()],
                    ),
                )
                .filter(rank=1)
                .values_list("bucket", "quantity")
            )
    for bucket_start, value in rows:
        # A bucket's truncated start may precede the clipped first bucket: take the last bucket
        # that starts at or before it.
        index = max(bisect.bisect_right(starts, bucket_start) - 1, 0)
        values[index] = _decimal(value)
    return list(zip(buckets, values, strict=True))


def _level_series(
    events: QuerySet[UsageEvent], period: Period, buckets: list[Period]
) -> list[tuple[Period, Decimal]]:
    """Average level per bucket, from the period's level changes (one row per change)."""
    readings = [
        Reading(timestamp=ts, quantity=_decimal(quantity), seq=pk)
        for ts, quantity, pk in _level_window(events, period)
        .order_by("timestamp", "id")
        .values_list("timestamp", "quantity", "id")
    ]
    stamps = [reading.timestamp for reading in readings]
    series = []
    for bucket in buckets:
        first = max(bisect.bisect_right(stamps, bucket.start) - 1, 0)
        last = bisect.bisect_left(stamps, bucket.end)
        integral = level_integral(readings[first:last], bucket)
        series.append((bucket, level_average(integral, bucket)))
    return series


def event_list(
    *, organisation: Organisation, meter: Meter | None = None, period: Period | None = None
) -> QuerySet[UsageEvent]:
    """Return the organisation's events, newest first, optionally for one meter and period."""
    events = UsageEvent.objects.filter(organisation=organisation).select_related("meter")
    if meter is not None:
        events = events.filter(meter=meter)
    if period is not None:
        events = events.filter(timestamp__gte=period.start, timestamp__lt=period.end)
    return events.order_by("-timestamp", "-id")


def meter_level_at(*, organisation: Organisation, meter: Meter, instant: datetime) -> Decimal:
    """Return the level a `latest` or `weighted_sum` meter holds at `instant` (0 before any)."""
    last = (
        meter_events(organisation=organisation, meter=meter)
        .filter(timestamp__lte=instant)
        .order_by("-timestamp", "-id")
        .values_list("quantity", flat=True)
        .first()
    )
    return _decimal(last)


def event_values(
    *,
    organisation: Organisation,
    meter: Meter,
    period: Period,
    received_until: datetime | None = None,
) -> Iterator[Decimal]:
    """Yield each event's value over `period` in time order, for prices that charge per event."""
    values = (
        meter_events(organisation=organisation, meter=meter, received_until=received_until)
        .filter(timestamp__gte=period.start, timestamp__lt=period.end)
        .order_by("timestamp", "id")
        .values_list("quantity", flat=True)
    )
    for value in values.iterator(chunk_size=5000):
        yield _decimal(value)


def usage_so_far_totals(
    *, organisation_ids: list[int], meter: Meter, period: Period, as_of: datetime
) -> dict[int, Decimal]:
    """`usage_so_far` for many organisations sharing `period`, in one query (two for
    weighted_sum): what alert evaluation reads for a batch. A test holds it to `usage_so_far`."""
    if as_of >= period.end:
        return usage_totals(organisation_ids=organisation_ids, meter=meter, period=period)
    if as_of <= period.start:
        return dict.fromkeys(organisation_ids, Decimal(0))
    elapsed = Period(period.start, as_of)
    if meter.spec.aggregation != Aggregation.WEIGHTED_SUM:
        return usage_totals(organisation_ids=organisation_ids, meter=meter, period=elapsed)
    # The level accrued so far, over the whole period's length (as `usage_so_far`).
    events = _filtered(
        UsageEvent.objects.filter(organisation_id__in=organisation_ids, meter=meter), meter
    )
    totals = dict.fromkeys(organisation_ids, Decimal(0))
    for organisation_id, integral in _level_integrals(events, elapsed).items():
        totals[organisation_id] = level_average(integral, period)
    return totals


def meter_levels_at(
    *, organisation_ids: list[int], meter: Meter, instant: datetime
) -> dict[int, Decimal]:
    """`meter_level_at` for many organisations in one query."""
    events = _filtered(
        UsageEvent.objects.filter(
            organisation_id__in=organisation_ids, meter=meter, timestamp__lte=instant
        ),
        meter,
    )
    last = _last_quantity_per_organisation(events.order_by())
    levels = dict.fromkeys(organisation_ids, Decimal(0))
    levels.update((organisation_id, _decimal(value)) for organisation_id, value in last)
    return levels


def _last_quantity_per_organisation(events: QuerySet[UsageEvent]) -> QuerySet[Any]:
    """(organisation id, quantity) of each organisation's last event by (timestamp, id)."""
    ranked: QuerySet[Any] = (
        events.annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("organisation_id")],
                order_by=[F("timestamp").desc(), F("id").desc()],
            )
        )
        .filter(rank=1)
        .values_list("organisation_id", "quantity")
    )
    return ranked
