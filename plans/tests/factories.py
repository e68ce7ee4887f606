"""Test data for plans: a plan with prices, a subscription, through the services."""

from __future__ import annotations

import itertools
from datetime import datetime
from decimal import Decimal
from typing import Any

from accounts.models import Organisation
from plans.models import Plan, Subscription
from plans.services import plan_create, price_set, subscription_create
from usage.models import Meter

_sequence = itertools.count(1)


def make_plan(prices: dict[Meter, dict[str, Any]] | None = None, **fields: Any) -> Plan:
    n = next(_sequence)
    plan = plan_create(
        **{"code": f"plan-{n}", "name": f"Plan {n}", "base_fee": Decimal(0), **fields}
    )
    for meter, spec in (prices or {}).items():
        price_set(plan=plan, meter=meter, spec=spec)
    return plan


def make_subscription(organisation: Organisation, plan: Plan, start: datetime) -> Subscription:
    return subscription_create(organisation=organisation, plan=plan, start=start)
