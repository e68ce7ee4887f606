"""Money and quantities for people: formatted per currency with babel, in templates only."""

from __future__ import annotations

from decimal import Decimal

from babel.numbers import format_currency, format_decimal
from django import template

from core.money import currency_exponent

register = template.Library()


@register.filter
def money_minor(amount_minor: int | None, currency: str) -> str:
    """Integer minor units as money: 30857, "USD" -> "$308.57"; 18519, "JPY" -> "¥18,519"."""
    if amount_minor is None:
        return ""
    amount = Decimal(amount_minor).scaleb(-currency_exponent(currency))
    return format_currency(amount, currency, locale="en")


@register.filter
def money(amount: Decimal | None, currency: str) -> str:
    """An exact amount as money, rounded to the currency's minor unit for display."""
    if amount is None:
        return ""
    return format_currency(amount, currency, locale="en")


@register.filter
def quantity(value: Decimal | int | None) -> str:
    """A quantity with grouping and no trailing zeros: 1234567.5 -> "1,234,567.5"."""
    if value is None:
        return ""
    return format_decimal(Decimal(value).normalize(), format="#,##0.######", locale="en")


@register.filter
def percent_of(part: Decimal, whole: Decimal) -> int:
    """Whole percent of `part` in `whole`, 0 to 100, for progress bars."""
    if not whole:
        return 0
    return max(0, min(100, int(Decimal(part) * 100 / Decimal(whole))))


@register.simple_tag
def measure(value: Decimal | None, unit: str, is_money: bool) -> str:
    """A watched value in its unit: money per currency, or a quantity and the meter's unit."""
    if value is None:
        return ""
    return money(value, unit) if is_money else f"{quantity(value)} {unit}"
