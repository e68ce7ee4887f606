from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from accounts.tests.factories import make_organisation
from core.periods import Period
from plans.models import Subscription
from plans.pricing import parse_price_spec
from plans.selectors import (
    period_cost,
    prices_in_force,
    subscription_active,
    subscription_period,
    subscription_previous_period,
)
from plans.services import price_set, subscription_create, subscription_end
from plans.tests.factories import make_plan, make_subscription
from usage.models import UsageEvent
from usage.tests.factories import make_meter

ANCHOR = datetime(2026, 1, 31, tzinfo=UTC)
_keys = iter(range(10**9))


def store(org, meter, at, quantity="1"):
    UsageEvent.objects.create(
        organisation=org,
        meter=meter,
        quantity=Decimal(quantity),
        properties={"v": quantity},
        timestamp=at,
        received_at=at,
        idempotency_key=f"k{next(_keys)}",
    )


@pytest.mark.django_db
def test_periods_step_from_the_anchor_in_the_organisations_zone():
    org = make_organisation(timezone_name="Europe/Berlin")
    local_anchor = datetime(2026, 1, 31, tzinfo=org.tzinfo)
    subscription = make_subscription(org, make_plan(), local_anchor)
    period = subscription_period(subscription=subscription, at=datetime(2026, 3, 10, tzinfo=UTC))
    assert period == Period(
        datetime(2026, 2, 28, tzinfo=org.tzinfo), datetime(2026, 3, 31, tzinfo=org.tzinfo)
    )
    previous = subscription_previous_period(
        subscription=subscription, at=datetime(2026, 3, 10, tzinfo=UTC)
    )
    assert previous.end == period.start
    assert previous.start == local_anchor


@pytest.mark.django_db
def test_one_active_subscription_per_organisation():
    org = make_organisation()
    plan = make_plan()
    first = make_subscription(org, plan, ANCHOR)
    with pytest.raises(ValidationError):
        subscription_create(organisation=org, plan=plan, start=ANCHOR)
    # The database constraint holds even for code that skips validation.
    with pytest.raises(IntegrityError), transaction.atomic():
        Subscription.objects.create(
            organisation=org, plan=plan, start=ANCHOR, anchor=ANCHOR, timezone="UTC"
        )
    subscription_end(subscription=first, at=ANCHOR + timedelta(days=40))
    second = subscription_create(organisation=org, plan=plan, start=ANCHOR + timedelta(days=40))
    assert subscription_active(organisation=org, at=ANCHOR + timedelta(days=10)) == first
    assert subscription_active(organisation=org, at=ANCHOR + timedelta(days=41)) == second
    assert subscription_active(organisation=org, at=ANCHOR - timedelta(days=1)) is None


@pytest.mark.django_db
def test_a_plan_in_another_currency_is_refused():
    with pytest.raises(ValidationError):
        subscription_create(
            organisation=make_organisation(currency="EUR"),
            plan=make_plan(currency="USD"),
            start=ANCHOR,
        )


@pytest.mark.django_db
def test_an_invalid_spec_is_refused_naming_the_field():
    plan = make_plan()
    with pytest.raises(ValidationError) as error:
        price_set(
            plan=plan, meter=make_meter("count"), spec={"model": "standard", "unit_price": "-1"}
        )
    assert "unit_price" in str(error.value)


@pytest.mark.django_db
def test_versions_apply_to_periods_starting_after_them_and_overrides_win():
    org = make_organisation()
    calls = make_meter("count")
    plan = make_plan({calls: {"model": "standard", "unit_price": "0.01"}})
    subscription = make_subscription(org, plan, ANCHOR)
    now = datetime(2026, 3, 10, tzinfo=UTC)  # inside [Feb 28, Mar 31)
    current = subscription_period(subscription=subscription, at=now)
    following = subscription_period(subscription=subscription, at=current.end)

    # A plan edit made now: this period keeps the old version, the next gets the new one.
    price_set(plan=plan, meter=calls, spec={"model": "standard", "unit_price": "0.02"}, now=now)
    # A customer's own price: from their next period by default.
    price_set(
        subscription=subscription,
        meter=calls,
        spec={"model": "standard", "unit_price": "0.005"},
        now=now,
    )
    [in_current] = prices_in_force(subscription=subscription, period=current)
    [in_next] = prices_in_force(subscription=subscription, period=following)
    assert in_current.version.spec["unit_price"] == "0.01"
    assert (in_next.version.spec["unit_price"], in_next.price.is_override) == ("0.005", True)

    # Another customer on the same plan is untouched by the override.
    other = make_subscription(make_organisation(), plan, ANCHOR)
    [theirs] = prices_in_force(subscription=other, period=following)
    assert (theirs.version.spec["unit_price"], theirs.price.is_override) == ("0.02", False)


@pytest.mark.django_db
def test_a_version_cannot_be_backdated_or_edited():
    calls = make_meter("count")
    plan = make_plan({calls: {"model": "standard", "unit_price": "0.01"}})
    now = datetime(2026, 3, 10, tzinfo=UTC)
    with pytest.raises(ValidationError):
        price_set(
            plan=plan,
            meter=calls,
            spec={"model": "standard", "unit_price": "0.02"},
            effective_from=now - timedelta(days=1),
            now=now,
        )
    version = plan.prices.get().versions.get()
    version.spec = {"model": "standard", "unit_price": "0"}
    with pytest.raises(ValueError, match="never edited"):
        version.save()


@pytest.mark.django_db
def test_cost_of_a_closed_period_prices_each_meter_and_adds_the_base_fee():
    org = make_organisation()
    calls = make_meter("count")
    tokens = make_meter("sum", property="v")
    plan = make_plan(
        {
            calls: {
                "model": "graduated",
                "tiers": [{"up_to": "2", "unit_price": "0"}, {"up_to": None, "unit_price": "0.5"}],
            },
            tokens: {"model": "standard", "unit_price": "0.000002"},
        },
        base_fee=Decimal("49"),
    )
    subscription = make_subscription(org, plan, ANCHOR)
    period = subscription_period(subscription=subscription, at=ANCHOR)
    for day in range(5):
        store(org, calls, ANCHOR + timedelta(days=day))
    store(org, calls, period.end)  # next period's
    store(org, tokens, ANCHOR, "1500000")
    cost = period_cost(subscription=subscription, period=period)
    by_meter = {line.meter.code: line for line in cost.lines}
    assert by_meter[calls.code].usage == 5
    assert by_meter[calls.code].cost.amount == Decimal("1.5")
    assert by_meter[tokens.code].cost.amount == Decimal("3")
    assert cost.total == Decimal("53.5")
    assert cost.projected_total == cost.total  # a closed period projects to itself


@pytest.mark.django_db
def test_projection_per_aggregation():
    org = make_organisation()
    period_start = ANCHOR
    meters = {
        "count": make_meter("count"),
        "max": make_meter("max", property="v"),
        "latest": make_meter("latest", property="v"),
        "level": make_meter("weighted_sum", property="v"),
    }
    plan = make_plan({meter: {"model": "standard", "unit_price": "1"} for meter in meters.values()})
    subscription = make_subscription(org, plan, period_start)
    period = subscription_period(subscription=subscription, at=period_start)  # Jan 31 - Feb 28
    as_of = period.start + period.duration / 4
    for n in range(7):
        store(org, meters["count"], period.start + timedelta(hours=n))
    store(org, meters["max"], period.start, "9")
    store(org, meters["latest"], period.start, "3")
    store(org, meters["level"], period.start - timedelta(days=3), "100")  # carried in
    store(org, meters["level"], period.start + period.duration / 8, "20")

    lines = {
        line.meter.code: line
        for line in period_cost(subscription=subscription, period=period, as_of=as_of).lines
    }
    count, peak, latest, level = (
        lines[meters[k].code] for k in ("count", "max", "latest", "level")
    )
    assert (count.usage, count.projected_usage, count.projection) == (7, 28, "run rate")
    assert (peak.usage, peak.projected_usage) == (9, 9)
    assert (latest.usage, latest.projected_usage, latest.projection) == (3, 3, "current value")
    # 100 for 1/8 of the period, then 20: accrued 12.5 + 2.5 by as_of, then 20 for 3/4 more.
    assert level.usage == Decimal("15")
    assert level.projected_usage == Decimal("30")
    assert level.projected_cost.amount == Decimal("30")


@pytest.mark.django_db
def test_percentage_prices_read_each_event_and_project_by_run_rate():
    org = make_organisation()
    payments = make_meter("sum", property="v")
    plan = make_plan(
        {payments: {"model": "percentage", "rate_percent": "2", "fixed_fee_per_event": "0.25"}}
    )
    subscription = make_subscription(org, plan, ANCHOR)
    period = subscription_period(subscription=subscription, at=ANCHOR)
    store(org, payments, period.start, "100")
    store(org, payments, period.start + timedelta(hours=1), "50")
    half = period.start + period.duration / 2
    [line] = period_cost(subscription=subscription, period=period, as_of=half).lines
    assert line.cost.amount == Decimal("3.5")  # 2 + 0.25 + 1 + 0.25
    assert line.projected_cost.amount == Decimal("7")


@pytest.mark.django_db
def test_candidate_spec_prices_the_same_usage():
    org = make_organisation()
    calls = make_meter("count")
    plan = make_plan({calls: {"model": "standard", "unit_price": "1"}})
    subscription = make_subscription(org, plan, ANCHOR)
    period = subscription_period(subscription=subscription, at=ANCHOR)
    for _ in range(4):
        store(org, calls, ANCHOR)
    candidate = parse_price_spec(
        {
            "model": "volume",
            "tiers": [
                {"up_to": "3", "unit_price": "2"},
                {"up_to": None, "unit_price": "0.5", "flat_fee": "10"},
            ],
        }
    )
    current = period_cost(subscription=subscription, period=period)
    what_if = period_cost(
        subscription=subscription, period=period, candidates={calls.pk: candidate}
    )
    assert (current.total, what_if.total) == (Decimal(4), Decimal(12))
