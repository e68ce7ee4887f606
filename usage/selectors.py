"""Reads of meters and usage: every aggregation computed by the database over `[start, end)`.

The figures equal `usage.aggregation.aggregate` on the same events (the tests hold them to it);
here they are computed in SQL so that a period's usage never loads its events into Python.
"""

from __future__ import annotations

import bisect
import time as time_module
from collections.abc import Iterable, Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

from django.db import connection
from django.db.models import Aggregate, Count, F, Max, QuerySet, TextField, Window
from django.db.models.fields.json import KeyTransform
from django.db.models.functions import Lead, RowNumber, TruncDay, TruncHour

from accounts.models import Organisation
from core.periods import Period, day_buckets, hour_buckets
from usage.aggregation import Aggregation, MeterSpec, Reading, level_average, level_integral
from usage.models import Meter, UsageEvent

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


def usage_total(
    *,
    organisation: Organisation,
    meter: Meter,
    period: Period,
    received_until: datetime | None = None,
) -> Decimal:
    """Return the meter's value for the organisation over `period`, computed in the database."""
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
            return level_average(_level_integral(events, period), period)
    raise AssertionError(spec.aggregation)  # pragma: no cover


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
        events = meter_events(organisation=organisation, meter=meter, received_until=received_until)
        return level_average(_level_integral(events, elapsed), period)
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
        rows = (
            inside.annotate(
                rank=Window(
                    RowNumber(),
                    partition_by=[F("organisation_id")],
                    order_by=[F("timestamp").desc(), F("id").desc()],
                )
            )
            .filter(rank=1)
            .values_list("organisation_id", "quantity")
        )
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
        return _level_series(events, period, buckets)

    starts = [bucket.start for bucket in buckets]
    values = [Decimal(0)] * len(buckets)
    trunc = (
        TruncDay("timestamp", tzinfo=tz)
        if granularity == "day"
        else TruncHour("timestamp", tzinfo=None)
    )
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
    last = (
        events.order_by()
        .annotate(
            rank=Window(
                RowNumber(),
                partition_by=[F("organisation_id")],
                order_by=[F("timestamp").desc(), F("id").desc()],
            )
        )
        .filter(rank=1)
        .values_list("organisation_id", "quantity")
    )
    levels = dict.fromkeys(organisation_ids, Decimal(0))
    levels.update((organisation_id, _decimal(value)) for organisation_id, value in last)
    return levels
