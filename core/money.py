"""Currencies and money rounding.

Money is `Decimal`, never float. Stored charged amounts are integer minor units plus an ISO 4217
code; the exponent of each currency (JPY 0, USD 2, KWD 3) comes from babel's CLDR data.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from babel.numbers import get_currency_precision, list_currencies

_KNOWN_CURRENCIES = frozenset(list_currencies())


def is_known_currency(code: str) -> bool:
    """Return whether `code` is an ISO 4217 currency code known to CLDR."""
    return code in _KNOWN_CURRENCIES


def currency_exponent(code: str) -> int:
    """Return the number of minor-unit digits of a currency (USD 2, JPY 0, KWD 3)."""
    if not is_known_currency(code):
        raise ValueError(f"Unknown currency: {code!r}")
    return int(get_currency_precision(code))


def quantize(amount: Decimal, currency: str) -> Decimal:
    """Round an amount once, half-up, to the currency's minor unit."""
    return amount.quantize(Decimal(1).scaleb(-currency_exponent(currency)), rounding=ROUND_HALF_UP)


def to_minor_units(amount: Decimal, currency: str) -> int:
    """Return an amount as an integer of minor units, rounding half-up first."""
    return int(quantize(amount, currency).scaleb(currency_exponent(currency)))
