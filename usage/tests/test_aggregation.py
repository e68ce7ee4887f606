from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from core.periods import Period
from usage.aggregation import (
    EventValueError,
    MeterSpec,
    Reading,
    SpecError,
    aggregate,
    format_quantity,
    parse_quantity,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 1, 11, tzinfo=UTC)  # ten days
PERIOD = Period(START, END)


def spec(aggregation, **extra):
    return MeterSpec.from_json({"aggregation": aggregation, **extra})


def reading(at, quantity="1", seq=0, unique=None):
    return Reading(timestamp=at, quantity=Decimal(quantity), seq=seq, unique=unique)


# --- Specs ---------------------------------------------------------------------------------------


def test_spec_round_trips_through_json():
    document = {"aggregation": "sum", "property": "tokens", "filters": {"region": ["eu", "us"]}}
    assert MeterSpec.from_json(document).to_json() == document


@pytest.mark.parametrize(
    "document",
    [
        "sum",
        {"aggregation": "median", "property": "x"},
        {"aggregation": "sum"},
        {"aggregation": "sum", "property": ""},
        {"aggregation": "sum", "property": "a.b"},
        {"aggregation": "count", "property": "x"},
        {"aggregation": "count", "filters": {"region": "eu"}},
        {"aggregation": "count", "filters": {"region": []}},
        {"aggregation": "count", "filters": {"region": [1]}},
        {"aggregation": "count", "extra": 1},
    ],
)
def test_invalid_specs_are_refused_with_a_message(document):
    with pytest.raises(SpecError) as error:
        MeterSpec.from_json(document)
    assert str(error.value)


def test_filters_need_every_named_property_with_a_listed_value():
    meter = spec("count", filters={"region": ["eu", "us"], "tier": ["pro"]})
    assert meter.matches({"region": "eu", "tier": "pro", "other": 1})
    assert not meter.matches({"region": "eu"})
    assert not meter.matches({"region": "asia", "tier": "pro"})
    # JSON values compare by type: the number 1 is not the string "1".
    assert not spec("count", filters={"v": ["1"]}).matches({"v": 1})


# --- Event values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (3, "3"),
        ("0.000001", "0.000001"),
        (0.1, "0.1"),
        ("-2.5", "-2.5"),
        ("1.500000000", "1.5"),
        ("999999999999999", "999999999999999"),
        (" 7 ", "7"),
    ],
)
def test_parse_quantity_is_exact(raw, expected):
    assert parse_quantity(raw) == Decimal(expected)


@pytest.mark.parametrize(
    "raw",
    [
        True,
        None,
        "ten",
        "NaN",
        "Infinity",
        float("inf"),
        float("nan"),
        "0.0000001",
        "1e15",
        -(10**15),
        "1234567890.123456",  # 16 significant digits
        123456789012.12346,  # a float that has already lost digits
        [1],
    ],
)
def test_parse_quantity_rejects(raw):
    with pytest.raises(EventValueError) as error:
        parse_quantity(raw)
    assert error.value.code == "invalid_quantity"


@pytest.mark.parametrize("aggregation", ["max", "latest", "weighted_sum"])
def test_negative_values_are_refused_where_they_make_no_sense(aggregation):
    with pytest.raises(EventValueError):
        spec(aggregation, property="v").event_quantity({"v": "-1"})


def test_sum_takes_negative_corrections():
    assert spec("sum", property="v").event_quantity({"v": "-1.5"}) == Decimal("-1.5")


def test_event_quantity_needs_the_property():
    with pytest.raises(EventValueError):
        spec("sum", property="tokens").event_quantity({"other": 1})
    assert spec("count").event_quantity({}) == 1


@pytest.mark.parametrize("value", [True, 1.5, "", None, {"a": 1}])
def test_unique_count_needs_a_string_or_integer(value):
    with pytest.raises(EventValueError):
        spec("unique_count", property="user").event_quantity({"user": value})


# --- Aggregations --------------------------------------------------------------------------------


def test_count_sum_max_over_a_half_open_period():
    readings = [
        reading(START - timedelta(microseconds=1), "100"),  # before: not counted
        reading(START, "1.25"),
        reading(START + timedelta(days=3), "2.5"),
        reading(END - timedelta(microseconds=1), "0.000001"),
        reading(END, "1000"),  # at exactly `end`: the next period's
    ]
    assert aggregate(spec("count"), readings, PERIOD) == 3
    assert aggregate(spec("sum", property="v"), readings, PERIOD) == Decimal("3.750001")
    assert aggregate(spec("max", property="v"), readings, PERIOD) == Decimal("2.5")


def test_empty_period_is_zero_for_every_aggregation():
    for aggregation, extra in [
        ("count", {}),
        ("sum", {"property": "v"}),
        ("max", {"property": "v"}),
        ("unique_count", {"property": "v"}),
        ("latest", {"property": "v"}),
        ("weighted_sum", {"property": "v"}),
    ]:
        assert aggregate(spec(aggregation, **extra), [], PERIOD) == 0


def test_unique_count_keeps_strings_and_integers_apart():
    readings = [
        reading(START, unique="u1"),
        reading(START + timedelta(hours=1), unique="u1"),
        reading(START + timedelta(hours=2), unique="1"),
        reading(START + timedelta(hours=3), unique=1),
        reading(END, unique="u9"),
    ]
    assert aggregate(spec("unique_count", property="user"), readings, PERIOD) == 3


def test_latest_takes_the_greatest_timestamp_then_arrival():
    readings = [
        reading(START + timedelta(days=2), "5", seq=1),
        reading(START + timedelta(days=1), "9", seq=2),  # arrived later, earlier timestamp
        reading(START + timedelta(days=2), "7", seq=3),  # same timestamp, arrived last: wins
        reading(END, "100", seq=4),
    ]
    assert aggregate(spec("latest", property="v"), readings, PERIOD) == Decimal("7")


def test_weighted_sum_integrates_the_level_over_the_period():
    # 10 GB for the first 5 days, 20 GB for the last 5: an average of 15 GB over the period.
    readings = [reading(START, "10"), reading(START + timedelta(days=5), "20")]
    assert aggregate(spec("weighted_sum", property="gb"), readings, PERIOD) == Decimal("15")


def test_weighted_sum_carries_the_level_into_the_period():
    # Set to 30 long before the period, 0 after 2 of its 10 days: 30 * 2/10 = 6.
    readings = [
        reading(START - timedelta(days=40), "99"),
        reading(START - timedelta(days=3), "30"),
        reading(START + timedelta(days=2), "0"),
        reading(END + timedelta(days=1), "500"),  # after the period: ignored
    ]
    assert aggregate(spec("weighted_sum", property="gb"), readings, PERIOD) == Decimal("6")


def test_weighted_sum_with_no_reading_before_is_zero_until_the_first():
    readings = [reading(START + timedelta(days=9), "10")]
    assert aggregate(spec("weighted_sum", property="gb"), readings, PERIOD) == Decimal("1")


def test_weighted_sum_rounds_once_to_six_places():
    # 1 unit for a third of the period: 0.333333 (half-up on the seventh place).
    period = Period(START, START + timedelta(seconds=3))
    readings = [reading(START, "1"), reading(START + timedelta(seconds=1), "0")]
    assert aggregate(spec("weighted_sum", property="v"), readings, period) == Decimal("0.333333")
    readings = [reading(START, "2"), reading(START + timedelta(seconds=1), "0")]
    assert aggregate(spec("weighted_sum", property="v"), readings, period) == Decimal("0.666667")


@pytest.mark.parametrize(
    ("value", "text"), [("1.500000", "1.5"), ("100", "100"), ("0.000", "0"), ("-2", "-2")]
)
def test_format_quantity(value, text):
    assert format_quantity(Decimal(value)) == text
