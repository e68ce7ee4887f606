"""Meter specs, event values and the reference aggregation, in pure Python.

This module owns the meaning of a meter: which events it counts (filters), which number each event
carries (its value), and how those numbers become one figure over a half-open period `[start, end)`.
The database computes the same figures in `usage.selectors`; this module is the reference the tests
hold it to, and what `meter_preview` runs on sample events. No ORM, no settings.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum

from core.periods import Period, duration_microseconds

# Quantities keep 6 decimal places (the database column is DECIMAL(24, 6)).
QUANTITY_PLACES = 6
QUANTUM = Decimal(1).scaleb(-QUANTITY_PLACES)
# A single event above this is a bug in the sender, not usage.
MAX_ABS_QUANTITY = Decimal(10) ** 15
# A double holds 15 significant digits exactly: more than that in a JSON number may already have
# been changed by the sender's or our JSON parser, and SQLite (the embedded default) keeps no more.
MAX_SIGNIFICANT_DIGITS = 15

_NAME_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
_DECIMAL_RE = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
MAX_FILTER_VALUES = 100


class Aggregation(StrEnum):
    COUNT = "count"
    SUM = "sum"
    MAX = "max"
    UNIQUE_COUNT = "unique_count"
    LATEST = "latest"
    WEIGHTED_SUM = "weighted_sum"


# Aggregations whose events carry a number read from the meter's property.
NUMERIC_AGGREGATIONS = frozenset(
    {Aggregation.SUM, Aggregation.MAX, Aggregation.LATEST, Aggregation.WEIGHTED_SUM}
)
# A negative value makes no sense for a peak, a level or a last reading; a sum may take negative
# corrections.
NON_NEGATIVE_AGGREGATIONS = frozenset(
    {Aggregation.MAX, Aggregation.LATEST, Aggregation.WEIGHTED_SUM}
)


class SpecError(ValueError):
    """A meter spec that cannot be used, with a message meant for the person who wrote it."""


class EventValueError(ValueError):
    """An event whose value does not fit its meter; `code` is the API's rejection code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class MeterSpec:
    """What a meter aggregates: `{"aggregation": "sum", "property": "tokens", "filters": {...}}`."""

    aggregation: Aggregation
    property: str | None = None
    filters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, document: object) -> MeterSpec:
        if not isinstance(document, Mapping):
            raise SpecError("A meter spec is a JSON object.")
        unknown = set(document) - {"aggregation", "property", "filters"}
        if unknown:
            raise SpecError(f"Unknown keys in meter spec: {', '.join(sorted(unknown))}.")
        try:
            aggregation = Aggregation(str(document.get("aggregation")))
        except ValueError:
            choices = ", ".join(a.value for a in Aggregation)
            raise SpecError(f"aggregation must be one of: {choices}.") from None
        prop = document.get("property")
        if aggregation == Aggregation.COUNT:
            if prop not in (None, ""):
                raise SpecError("A count meter counts events; it takes no property.")
            prop = None
        elif not isinstance(prop, str) or not _NAME_RE.match(prop):
            raise SpecError(
                f"A {aggregation} meter needs a property: 1 to 64 letters, digits, _ or -."
            )
        raw_filters = document.get("filters") or {}
        if not isinstance(raw_filters, Mapping):
            raise SpecError('filters is an object: {"region": ["eu", "us"]}.')
        filters: dict[str, tuple[str, ...]] = {}
        for name, values in raw_filters.items():
            if not isinstance(name, str) or not _NAME_RE.match(name):
                raise SpecError(f"Filter property {name!r}: 1 to 64 letters, digits, _ or -.")
            if (
                not isinstance(values, list)
                or not values
                or len(values) > MAX_FILTER_VALUES
                or not all(isinstance(v, str) for v in values)
            ):
                raise SpecError(
                    f"Filter {name!r} takes a list of 1 to {MAX_FILTER_VALUES} strings."
                )
            filters[name] = tuple(dict.fromkeys(values))
        return cls(aggregation=aggregation, property=prop, filters=filters)

    def to_json(self) -> dict[str, object]:
        document: dict[str, object] = {"aggregation": self.aggregation.value}
        if self.property is not None:
            document["property"] = self.property
        if self.filters:
            document["filters"] = {name: list(values) for name, values in self.filters.items()}
        return document

    def matches(self, properties: Mapping[str, object]) -> bool:
        """Return whether an event counts for this meter: every filter property is present and
        its value is one of the listed strings."""
        return all(properties.get(name) in values for name, values in self.filters.items())

    def event_quantity(self, properties: Mapping[str, object]) -> Decimal:
        """Return the number an event contributes, or raise EventValueError.

        Count and unique-count events contribute 1 (unique_count reads `unique_value` too).
        """
        if self.aggregation == Aggregation.COUNT:
            return Decimal(1)
        assert self.property is not None  # noqa: S101 - guaranteed by from_json
        if self.property not in properties or properties[self.property] is None:
            raise EventValueError(
                "invalid_quantity", f"The {self.property!r} property is required by this meter."
            )
        raw = properties[self.property]
        if self.aggregation == Aggregation.UNIQUE_COUNT:
            self.unique_value(properties)
            return Decimal(1)
        quantity = parse_quantity(raw, name=self.property)
        if quantity < 0 and self.aggregation in NON_NEGATIVE_AGGREGATIONS:
            raise EventValueError(
                "invalid_quantity",
                f"{self.property!r} must not be negative for a {self.aggregation} meter.",
            )
        return quantity

    def unique_value(self, properties: Mapping[str, object]) -> str | int:
        """Return the value a unique_count meter counts distinct occurrences of."""
        assert self.property is not None  # noqa: S101 - guaranteed by from_json
        value = properties.get(self.property)
        # Strings and integers only: "1" and 1 stay distinct in PostgreSQL, SQLite and here.
        if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
            raise EventValueError(
                "invalid_quantity",
                f"{self.property!r} must be a non-empty string or an integer to be counted.",
            )
        return value


def parse_quantity(raw: object, *, name: str = "quantity") -> Decimal:
    """Parse a number or a decimal string into an exact Decimal, or raise EventValueError."""
    if isinstance(raw, bool):
        raise EventValueError("invalid_quantity", f"{name!r} must be a number, not a boolean.")
    if isinstance(raw, int):
        value = Decimal(raw)
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            raise EventValueError("invalid_quantity", f"{name!r} must be finite.")
        # repr() is the shortest string that round-trips: the literal the sender wrote, as long
        # as it had at most 15 significant digits (checked below).
        value = Decimal(repr(raw))
    elif isinstance(raw, Decimal):
        value = raw
    elif isinstance(raw, str):
        # Plain ASCII decimals only: Decimal() would also take "1_000", "NaN" and other scripts'
        # digits, which no sender means as a quantity.
        if not _DECIMAL_RE.match(raw.strip()):
            raise EventValueError(
                "invalid_quantity", f"{name!r} must be a number or a decimal string."
            )
        value = Decimal(raw.strip())
    else:
        raise EventValueError("invalid_quantity", f"{name!r} must be a number or a decimal string.")
    # copy_abs and the comparison are exact: no context, so "1e1000000" cannot overflow here.
    if value.copy_abs() >= MAX_ABS_QUANTITY:
        raise EventValueError(
            "invalid_quantity", f"{name!r} is absurdly large (limit {MAX_ABS_QUANTITY:,})."
        )
    if value != value.quantize(QUANTUM):
        raise EventValueError(
            "invalid_quantity", f"{name!r} has more than {QUANTITY_PLACES} decimal places."
        )
    value = value.quantize(QUANTUM)
    if len(value.normalize().as_tuple().digits) > MAX_SIGNIFICANT_DIGITS and value != 0:
        raise EventValueError(
            "invalid_quantity",
            f"{name!r} has more than {MAX_SIGNIFICANT_DIGITS} significant digits.",
        )
    return value


@dataclass(frozen=True, slots=True)
class Reading:
    """One event as an aggregation sees it. `seq` breaks timestamp ties (arrival order)."""

    timestamp: datetime
    quantity: Decimal
    seq: int = 0
    unique: str | int | None = None


def format_quantity(value: Decimal) -> str:
    """Format a Decimal as plain text without exponent or trailing zeros ("1.5", "100")."""
    return format(value.normalize(), "f") if value else "0"


def level_average(integral: Decimal, period: Period) -> Decimal:
    """Turn a level integral (level x microseconds) into the period's average level, 6 places.

    The integral is exact; the division is the one place a weighted sum rounds (half-up).
    """
    return (integral / Decimal(period.microseconds)).quantize(QUANTUM, rounding=ROUND_HALF_UP)


def aggregate(spec: MeterSpec, readings: Iterable[Reading], period: Period) -> Decimal:
    """Return the meter's value over `period` from readings of events that match the meter.

    Readings before the period matter only to `weighted_sum`, whose level carries in.
    """
    ordered = sorted(readings, key=lambda r: (r.timestamp, r.seq))
    inside = [r for r in ordered if period.start <= r.timestamp < period.end]
    match spec.aggregation:
        case Aggregation.COUNT:
            return Decimal(len(inside))
        case Aggregation.SUM:
            return sum((r.quantity for r in inside), Decimal(0))
        case Aggregation.MAX:
            return max((r.quantity for r in inside), default=Decimal(0))
        case Aggregation.UNIQUE_COUNT:
            # Keyed by type too, so that "1" and 1 stay apart as they do in the databases.
            return Decimal(len({(type(r.unique), r.unique) for r in inside}))
        case Aggregation.LATEST:
            return inside[-1].quantity if inside else Decimal(0)
        case Aggregation.WEIGHTED_SUM:
            return level_average(level_integral(ordered, period), period)
    raise AssertionError(spec.aggregation)  # pragma: no cover


def level_integral(ordered: Sequence[Reading], period: Period) -> Decimal:
    """Integrate a level over `period` in level x microseconds.

    Each reading sets the level from its timestamp until the next reading; the last reading
    before the period carries its level into it. Before the first reading the level is 0.
    """
    total = Decimal(0)
    for position, reading in enumerate(ordered):
        following = ordered[position + 1].timestamp if position + 1 < len(ordered) else period.end
        seg_start = max(reading.timestamp, period.start)
        seg_end = min(following, period.end)
        if seg_end > seg_start:
            total += reading.quantity * duration_microseconds(seg_end - seg_start)
    return total
