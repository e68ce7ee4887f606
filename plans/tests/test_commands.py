import io

import pytest
from django.core.management import CommandError, call_command


def quote(*args):
    out = io.StringIO()
    call_command("quote", *args, stdout=out)
    return out.getvalue().splitlines()


def test_quote_prints_the_exact_amount_first():
    # Lago's volume example (getlago.com/docs/guide/plans/charges/charge-models/volume):
    # 65,000 API calls = 65,000 x $0.0006 + $10 = $49.
    tiers = (
        '[{"up_to": "10000", "unit_price": "0.001", "flat_fee": "10"},'
        ' {"up_to": "50000", "unit_price": "0.0008", "flat_fee": "10"},'
        ' {"up_to": "100000", "unit_price": "0.0006", "flat_fee": "10"},'
        ' {"up_to": null, "unit_price": "0.0004", "flat_fee": "10"}]'
    )
    assert quote("--price", f'{{"model": "volume", "tiers": {tiers}}}', "--quantity", "65000") == [
        "49"
    ]


def test_quote_explains_and_never_prints_an_exponent():
    lines = quote(
        "--price", '{"model": "standard", "unit_price": "0.000002"}', "--quantity", "3", "--explain"
    )
    assert lines[0] == "0.000006"
    assert any("3 x 0.000002" in line for line in lines[1:])


def test_quote_takes_event_values_for_percentage():
    lines = quote(
        "--price",
        '{"model": "percentage", "rate_percent": "2.9", "fixed_fee_per_event": "0.30"}',
        "--events",
        '["100", "10.50"]',
    )
    assert lines == ["3.8045"]


@pytest.mark.parametrize(
    "args",
    [
        ("--price", '{"model": "standard"}', "--quantity", "1"),
        ("--price", '{"model": "standard", "unit_price": "1"}', "--quantity", "lots"),
        ("--price", '{"model": "standard", "unit_price": "1"}', "--quantity", "-1"),
        ("--price", '{"model": "percentage", "rate_percent": "1"}', "--quantity", "5"),
        ("--price", "not json", "--quantity", "1"),
    ],
)
def test_quote_exits_non_zero_with_the_reason(args):
    with pytest.raises(CommandError):
        quote(*args)
