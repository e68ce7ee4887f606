from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from stripe_sync.services import outbox_flush


class Command(BaseCommand):
    help = "Send the meter-event outbox to Stripe now (the schedule does this every minute)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=None, help="At most 100.")
        parser.add_argument("--max-batches", type=int, default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        report = outbox_flush(batch_size=options["batch_size"], max_batches=options["max_batches"])
        self.stdout.write(str(report))
        for error in report.errors:
            self.stderr.write(error)
        if report.expired:
            self.stdout.write("Too old for Stripe (older than 35 days), not sent:")
            for identifier in report.expired:
                self.stdout.write(f"  {identifier}")
