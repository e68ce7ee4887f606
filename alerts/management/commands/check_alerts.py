"""Evaluate every alert rule now (or as of a given instant), as the every-minute schedule does."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from accounts.selectors import organisation_or_error
from alerts.services import alerts_evaluate, deliveries_send
from core.cli import iso_instant


class Command(BaseCommand):
    help = "Evaluate alert rules, fire newly crossed thresholds and send due notifications."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--as-of", type=iso_instant, help="ISO 8601 instant with offset (default: now)."
        )
        parser.add_argument("--organisation", help="Only this organisation (slug).")
        parser.add_argument(
            "--no-send", action="store_true", help="Record firings; leave sending to the schedule."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        as_of = options["as_of"] or timezone.now()
        organisation_ids = None
        if options["organisation"]:
            organisation_ids = [organisation_or_error(options["organisation"]).pk]
        summary = alerts_evaluate(as_of=as_of, organisation_ids=organisation_ids, send=False)
        self.stdout.write(str(summary))
        if not options["no_send"]:
            sent = deliveries_send(now=timezone.now())
            self.stdout.write(f"{sent} notification(s) sent")
