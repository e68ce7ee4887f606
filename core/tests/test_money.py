from decimal import Decimal

import pytest

from core.money import currency_exponent, is_known_currency, quantize, to_minor_units


@pytest.mark.parametrize(("code", "exponent"), [("USD", 2), ("EUR", 2), ("JPY", 0), ("KWD", 3)])
def test_currency_exponent(code, exponent):
    assert currency_exponent(code) == exponent


def test_unknown_currency():
    assert not is_known_currency("XYZ1")
    with pytest.raises(ValueError):
        currency_exponent("ABC1")


@pytest.mark.parametrize(
    ("amount", "code", "rounded", "minor"),
    [
        ("0.005", "USD", "0.01", 1),
        ("0.004999", "USD", "0.00", 0),
        ("-0.005", "USD", "-0.01", -1),
        ("12.5", "JPY", "13", 13),
        ("1.2345", "KWD", "1.235", 1235),
    ],
)
def test_quantize_rounds_half_up_to_the_minor_unit(amount, code, rounded, minor):
    assert quantize(Decimal(amount), code) == Decimal(rounded)
    assert to_minor_units(Decimal(amount), code) == minor
