from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.utils import timezone
from tqdm import tqdm

from accounts.selectors import organisation_or_error
from core.cli import iso_instant
from invoices.services import invoice_draft, periods_close, periods_due


class Command(BaseCommand):
    help = (
        "Close every billing period that ended at least BILLING_GRACE before --as-of (default "
        "now) into a finalized invoice, exactly once. Safe to re-run at any time."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--as-of", type=iso_instant, help="ISO 8601 instant with offset (default: now)."
        )
        parser.add_argument("--organisation", help="Only this organisation (slug).")
        parser.add_argument(
            "--dry-run", action="store_true", help="Show what would be invoiced; store nothing."
        )
        parser.add_argument(
            "--batch-size",
            type=int,
            default=500,
            help="Subscriptions closed per transaction (default 500).",
        )

    def handle(self, *args: object, **options: Any) -> None:
        as_of = options["as_of"] or timezone.now()
        organisation = None
        if options["organisation"]:
            organisation = organisation_or_error(options["organisation"])

        if options["dry_run"]:
            due = periods_due(as_of=as_of, organisation=organisation)
            for subscription, period in due:
                with transaction.atomic():
                    draft = invoice_draft(subscription=subscription, period=period, cutoff=as_of)
                self.stdout.write(
                    f"would invoice {subscription.organisation.slug} {period}: "
                    f"{draft.subtotal_minor} {draft.currency} minor units before credits"
                )
            self.stdout.write(f"{len(due)} period(s) due as of {as_of.isoformat()}; dry run.")
            return

        due = periods_due(as_of=as_of, organisation=organisation)
        with tqdm(total=len(due), desc="close", disable=not self.stderr.isatty()) as bar:
            summary = periods_close(
                as_of=as_of,
                organisation=organisation,
                progress=bar.update,
                batch_size=options["batch_size"],
                due=due,
            )
        totals = ", ".join(f"{amount} {cur}" for cur, amount in sorted(summary.total_minor.items()))
        self.stdout.write(
            f"closed {summary.closed} period(s), {summary.already} already closed, "
            f"as of {as_of.isoformat()}" + (f"; totals in minor units: {totals}" if totals else "")
        )
