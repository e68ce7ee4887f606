"""`manage.py verify_rollups [--period START/END | --period YYYY-MM] [--fold]`."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.periods import Period, add_months
from usage.rollups import rollups_fold, rollups_verify


def _period(text: str) -> Period:
    """`2026-11` (that UTC month) or `START/END` (ISO 8601 instants with offsets)."""
    try:
        if "/" in text:
            start, end = (datetime.fromisoformat(part) for part in text.split("/", 1))
            if start.tzinfo is None or end.tzinfo is None:
                raise CommandError("--period bounds need a UTC offset, e.g. 2026-11-01T00:00Z")
            return Period(start, end)
        month = datetime.strptime(text, "%Y-%m").replace(tzinfo=UTC)
        return Period(month, add_months(month, 1))
    except ValueError as exc:
        raise CommandError(f"--period: {exc}") from exc


class Command(BaseCommand):
    help = (
        "Recompute the hourly usage rollups from the raw events they cover and report every "
        "bucket that differs. Exits with status 1 when one does."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--period", help="Only these hours: YYYY-MM (UTC month) or START/END (ISO 8601)."
        )
        parser.add_argument("--fold", action="store_true", help="Fold new events first.")

    def handle(self, *args: object, **options: Any) -> None:
        period = _period(options["period"]) if options["period"] else None
        if options["fold"]:
            folded = rollups_fold()
            self.stdout.write(f"folded {folded.events} events into {folded.buckets} buckets")
        checked, differences = rollups_verify(period=period)
        for difference in differences:
            self.stdout.write(str(difference))
        scope = f" in {period}" if period else ""
        self.stdout.write(f"{checked} buckets checked{scope}, {len(differences)} differ")
        if differences:
            raise SystemExit(1)
