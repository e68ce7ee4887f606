from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import stripe
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.periods import Period
from stripe_sync import gateway
from stripe_sync.selectors import meter_totals_compare
from stripe_sync.services import NotRepairable, difference_repair


def parse_period(text: str) -> Period:
    """`2026-01` (that calendar month, UTC) or `START/END` (ISO instants, UTC if naive)."""

    def instant(value: str) -> datetime:
        parsed = datetime.fromisoformat(value)
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)

    try:
        if "/" in text:
            start, end = text.split("/", 1)
            return Period(instant(start), instant(end))
        year, month = (int(part) for part in text.split("-"))
        start_of = datetime(year, month, 1, tzinfo=UTC)
        end_of = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
        return Period(start_of, end_of)
    except ValueError as exc:
        raise CommandError(f"--period {text!r}: give YYYY-MM or START/END ({exc}).") from exc


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


class Command(BaseCommand):
    help = (
        "Compare our totals per customer and meter over a period with Stripe's meter event "
        "summaries; list every difference, and with --resend send what Stripe lacks."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--period", required=True, help="YYYY-MM, or START/END in ISO 8601.")
        parser.add_argument("--resend", action="store_true", help="Send what Stripe lacks.")

    def handle(self, *args: Any, **options: Any) -> None:
        if not gateway.enabled():
            raise CommandError("Stripe is off: set STRIPE_SECRET_KEY.")
        period = parse_period(options["period"])
        try:
            differences = meter_totals_compare(period=period)
        except stripe.StripeError as exc:
            raise CommandError(f"Stripe: {gateway.describe(exc)}") from exc
        self.stdout.write(
            f"{period.start.isoformat()} to {period.end.isoformat()}: "
            f"{len(differences)} difference(s)"
        )
        for difference in differences:
            self.stdout.write(
                f"{difference.organisation.slug}\t{difference.stripe_customer}\t"
                f"{difference.stripe_meter.meter.code}\tours {_plain(difference.ours)}\t"
                f"stripe {_plain(difference.stripe)}\tmissing {_plain(difference.missing)}"
            )
            if options["resend"]:
                try:
                    identifier = difference_repair(difference=difference, period=period)
                except NotRepairable as exc:
                    self.stdout.write(f"  not resent: {exc}")
                else:
                    self.stdout.write(f"  resent {_plain(difference.missing)} as {identifier}")
