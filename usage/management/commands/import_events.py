import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from tqdm import tqdm

from accounts.models import Organisation
from usage.models import UsageEvent
from usage.services import events_ingest


class Command(BaseCommand):
    help = (
        "Import usage events from a JSON-lines file: one event per line, as the API takes it, "
        'plus "organisation" (a slug) unless --organisation is given. Rejected lines are written '
        "with their reasons to FILE.rejected.jsonl (or --rejected). Re-running is safe: "
        "idempotency keys make repeats duplicates."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", type=Path)
        parser.add_argument("--organisation", help="Slug for lines that name no organisation.")
        parser.add_argument(
            "--allow-backdated",
            action="store_true",
            help="Accept events older than the acceptance window (migrating history).",
        )
        parser.add_argument("--rejected", type=Path, help="Where to write rejected lines.")
        parser.add_argument("--batch-size", type=int, default=1000)

    def handle(self, *args: object, **options: Any) -> None:
        path: Path = options["file"]
        if not path.is_file():
            raise CommandError(f"No such file: {path}")
        rejected_path: Path = options["rejected"] or path.with_name(path.name + ".rejected.jsonl")
        self.organisations = {org.slug: org for org in Organisation.objects.all()}
        default_slug = options["organisation"]
        if default_slug and default_slug not in self.organisations:
            raise CommandError(f"No organisation with slug {default_slug!r}.")
        self.allow_backdated = options["allow_backdated"]
        self.totals = {"accepted": 0, "duplicate": 0, "rejected": 0}

        with (
            path.open("rb") as source,
            rejected_path.open("w") as self.rejected_file,
            tqdm(
                total=path.stat().st_size,
                unit="B",
                unit_scale=True,
                desc="import",
                file=sys.stderr,
                disable=not sys.stderr.isatty(),
            ) as progress,
        ):
            batch: list[tuple[int, bytes, str | None, dict[str, Any]]] = []
            for number, raw in enumerate(source, start=1):
                progress.update(len(raw))
                if not raw.strip():
                    continue
                try:
                    event = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    self._reject(number, raw, "invalid_json", "The line is not valid JSON.")
                    continue
                if not isinstance(event, dict):
                    self._reject(number, raw, "invalid_event", "An event is a JSON object.")
                    continue
                slug = event.pop("organisation", None) or default_slug
                batch.append((number, raw, slug, event))
                if len(batch) >= options["batch_size"]:
                    self._flush(batch)
                    batch = []
            self._flush(batch)

        if self.totals["rejected"]:
            self.stdout.write(f"Rejected lines and reasons: {rejected_path}")
        else:
            rejected_path.unlink()
        self.stdout.write(
            f"accepted {self.totals['accepted']}, duplicate {self.totals['duplicate']}, "
            f"rejected {self.totals['rejected']}"
        )

    def _flush(self, batch: list[tuple[int, bytes, str | None, dict[str, Any]]]) -> None:
        by_organisation: dict[str, list[tuple[int, bytes, dict[str, Any]]]] = defaultdict(list)
        for number, raw, slug, event in batch:
            if slug is None:
                self._reject(number, raw, "unknown_organisation", "The line names no organisation.")
            elif slug not in self.organisations:
                self._reject(number, raw, "unknown_organisation", f"No organisation {slug!r}.")
            else:
                by_organisation[slug].append((number, raw, event))
        for slug, lines in by_organisation.items():
            results = events_ingest(
                organisation=self.organisations[slug],
                payloads=[event for _, _, event in lines],
                source=UsageEvent.Source.IMPORT,
                allow_backdated=self.allow_backdated,
            )
            for (number, raw, _), result in zip(lines, results, strict=True):
                if result.status == "rejected":
                    self._reject(number, raw, result.code or "", result.message or "")
                else:
                    self.totals[result.status] += 1

    def _reject(self, number: int, raw: bytes, code: str, message: str) -> None:
        self.totals["rejected"] += 1
        line = {"line": number, "code": code, "message": message}
        self.rejected_file.write(
            json.dumps({**line, "event": raw.decode(errors="replace").rstrip("\n")}) + "\n"
        )
