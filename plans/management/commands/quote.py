import json
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from plans.pricing import PriceSpecError, QuoteError, parse_price_spec, quote


def _decimal(text: object, what: str) -> Decimal:
    try:
        value = Decimal(str(text))
    except InvalidOperation:
        raise CommandError(f"{what} is not a decimal number: {text!r}") from None
    if not value.is_finite():
        raise CommandError(f"{what} must be finite: {text!r}")
    return value


class Command(BaseCommand):
    help = (
        "Price a quantity with a price spec. The exact amount (not rounded) is the first line; "
        "--explain adds the breakdown."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--price", required=True, help="The price spec, a JSON object.")
        parser.add_argument("--quantity", help="The period's quantity (default: sum of --events).")
        parser.add_argument(
            "--events", help='Event values for percentage prices: \'["12.5", "3"]\''
        )
        parser.add_argument("--explain", action="store_true", help="Print the breakdown.")

    def handle(self, *args: object, **options: Any) -> None:
        try:
            spec = parse_price_spec(json.loads(options["price"]))
        except json.JSONDecodeError as exc:
            raise CommandError(f"--price is not valid JSON: {exc}") from exc
        except PriceSpecError as exc:
            raise CommandError(f"Invalid price: {exc}") from exc
        events = None
        if options["events"] is not None:
            try:
                raw_events = json.loads(options["events"])
            except json.JSONDecodeError as exc:
                raise CommandError(f"--events is not valid JSON: {exc}") from exc
            if not isinstance(raw_events, list):
                raise CommandError("--events is a JSON list of decimal strings.")
            events = [_decimal(value, f"event {n}") for n, value in enumerate(raw_events, 1)]
        if options["quantity"] is not None:
            quantity = _decimal(options["quantity"], "--quantity")
        elif events is not None:
            quantity = sum(events, Decimal(0))
        else:
            raise CommandError("Give --quantity (or --events for a percentage price).")
        try:
            result = quote(spec, quantity, events)
        except QuoteError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(format(result.amount.normalize(), "f") if result.amount else "0")
        if options["explain"]:
            for line in result.explain():
                self.stdout.write(line)
