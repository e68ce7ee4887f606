"""HTTP endpoints for plans: price a spec, and read the key's subscription with its costs."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from ninja import Field, Router, Schema

from accounts.models import APIKey
from core.errors import ApiError
from plans.pricing import PriceSpecError, QuoteError, parse_price_spec, quote
from plans.selectors import period_cost, subscription_active, subscription_period
from usage.aggregation import format_quantity

router = Router(tags=["plans"])


class QuoteIn(Schema):
    price: dict[str, Any] = Field(description='A price spec, e.g. {"model": "standard", ...}.')
    quantity: str | None = Field(None, description="Decimal string; default: sum of events.")
    events: list[str] | None = Field(None, description="Event values, for percentage prices.")


def _number(text: str, what: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise ApiError(422, "invalid_quantity", f"{what} is not a decimal: {text[:50]!r}") from None
    if not value.is_finite():
        raise ApiError(422, "invalid_quantity", f"{what} must be finite.")
    return value


@router.post("/quote", summary="Price a quantity with a price spec (nothing is stored)")
def quote_create(request: HttpRequest, body: QuoteIn) -> dict[str, Any]:
    try:
        spec = parse_price_spec(body.price)
    except PriceSpecError as exc:
        raise ApiError(422, "invalid_price", str(exc)) from exc
    events = None if body.events is None else [_number(v, "event") for v in body.events]
    if body.quantity is not None:
        quantity = _number(body.quantity, "quantity")
    elif events is not None:
        quantity = sum(events, Decimal(0))
    else:
        raise ApiError(422, "invalid_quantity", "Give quantity (or events for percentage).")
    try:
        return quote(spec, quantity, events).to_json()
    except QuoteError as exc:
        raise ApiError(422, "invalid_quantity", str(exc)) from exc


@router.get("/subscription", summary="The key's subscription, its period, prices and costs")
def subscription_read(request: HttpRequest) -> dict[str, Any]:
    api_key: APIKey = request.auth  # type: ignore[attr-defined]
    now = timezone.now()
    subscription = subscription_active(organisation=api_key.organisation, at=now)
    if subscription is None:
        raise ApiError(404, "no_subscription", "This organisation has no active subscription.")
    period = subscription_period(subscription=subscription, at=now)
    cost = period_cost(subscription=subscription, period=period, as_of=now)
    return {
        "plan": subscription.plan.code,
        "currency": subscription.plan.currency,
        "period": {"start": period.start, "end": period.end},
        "as_of": now,
        "base_fee": format_quantity(cost.base_fee),
        "cost_so_far": format_quantity(cost.total),
        "projected_cost": format_quantity(cost.projected_total),
        "prices": [
            {
                "meter": line.meter.code,
                "description": line.price.label,
                "override": line.price.is_override,
                "price": line.version.spec,
                "usage": format_quantity(line.usage),
                "cost": line.cost.to_json(),
                "projected_usage": format_quantity(line.projected_usage),
                "projected_cost": format_quantity(line.projected_cost.amount),
                "projection": line.projection,
            }
            for line in cost.lines
        ],
    }
