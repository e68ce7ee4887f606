"""Export old months of usage events to compressed JSON lines and remove them (or load back)."""

from __future__ import annotations

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.cli import iso_instant
from invoices.selectors import archive_blockers
from usage.archive import ArchiveError, events_archive, events_restore, months_to_archive


class Command(BaseCommand):
    help = (
        "Archive the usage events of every UTC month before --before into DIRECTORY "
        "(usage-events-YYYY-MM.jsonl.gz + a manifest), then remove them from the database; "
        "only when every period before it is invoiced. --load FILE... loads archives back."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--before", type=iso_instant, help="first instant of a UTC month")
        parser.add_argument("--directory", type=Path, default=Path("archive"))
        parser.add_argument(
            "--dry-run", action="store_true", help="list the months and blockers, change nothing"
        )
        parser.add_argument("--load", type=Path, nargs="+", metavar="FILE")

    def handle(self, *args: object, **options: object) -> None:
        try:
            if options["load"]:
                for path in options["load"]:  # type: ignore[attr-defined]
                    inserted = events_restore(path=path)
                    self.stdout.write(f"{path.name}: {inserted} events loaded back")
                return
            before = options["before"]
            if before is None:
                raise CommandError("Give --before (or --load).")
            blockers = archive_blockers(before=before)  # type: ignore[arg-type]
            for blocker in blockers:
                self.stderr.write(f"not yet: {blocker}")
            if options["dry_run"]:
                months = months_to_archive(before)  # type: ignore[arg-type]
                listed = ", ".join(f"{month:%Y-%m}" for month in months) or "none"
                self.stdout.write(f"months to archive: {listed}")
                return
            if blockers:
                raise CommandError(f"{len(blockers)} reason(s) to wait; nothing archived.")
            for done in events_archive(before=before, directory=options["directory"]):  # type: ignore[arg-type]
                self.stdout.write(
                    f"{done.month:%Y-%m}: {done.events} events ({done.kept} last readings kept) "
                    f"to {done.path}, quantities summing to {done.total}"
                )
        except ArchiveError as error:
            raise CommandError(str(error)) from error
