import json
import sys
from datetime import UTC, datetime
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from core.periods import Period
from usage.aggregation import (
    EventValueError,
    MeterSpec,
    Reading,
    SpecError,
    aggregate,
    format_quantity,
)


def _instant(text: str, name: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as exc:
        raise CommandError(f"--{name} is not an ISO 8601 datetime: {text!r}") from exc
    if parsed.tzinfo is None:
        raise CommandError(f"--{name} needs a UTC offset, e.g. {text}Z")
    return parsed.astimezone(UTC)


class _Skipped(Exception):  # noqa: N818 - control flow inside this command
    """An event that is valid but does not count: a repeated key, or filtered out."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


class Command(BaseCommand):
    help = (
        "Print the value a meter spec gives for JSON-lines events on stdin over [start, end), "
        "without storing anything. The value is the first line of output."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--meter", required=True, help="The meter spec, a JSON object.")
        parser.add_argument("--start", required=True, help="Inclusive, ISO 8601 with offset.")
        parser.add_argument("--end", required=True, help="Exclusive, ISO 8601 with offset.")

    def handle(self, *args: object, **options: Any) -> None:
        try:
            spec = MeterSpec.from_json(json.loads(options["meter"]))
        except (json.JSONDecodeError, SpecError) as exc:
            raise CommandError(f"Invalid meter spec: {exc}") from exc
        start, end = _instant(options["start"], "start"), _instant(options["end"], "end")
        if end <= start:
            raise CommandError("--end must be after --start.")
        period = Period(start, end)
        now = timezone.now()

        readings: list[Reading] = []
        seen: set[str] = set()
        counts = {"read": 0, "unmatched": 0, "duplicate": 0, "rejected": 0}
        for number, line in enumerate(sys.stdin, start=1):
            if not line.strip():
                continue
            counts["read"] += 1
            try:
                reading = self._reading(spec, line, number, now, seen)
            except EventValueError as error:
                counts["rejected"] += 1
                self.stderr.write(f"line {number}: {error.code}: {error.message}")
            except _Skipped as skipped:
                counts[skipped.reason] += 1
            else:
                readings.append(reading)

        self.stdout.write(format_quantity(aggregate(spec, readings, period)))
        self.stdout.write(
            f"{counts['read']} events read: {len(readings)} counted, "
            f"{counts['unmatched']} not matching the filters, {counts['duplicate']} duplicates, "
            f"{counts['rejected']} rejected; period {period}"
        )

    def _reading(
        self, spec: MeterSpec, line: str, number: int, now: datetime, seen: set[str]
    ) -> Reading:
        """Return the event's reading; raise EventValueError or _Skipped."""
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise EventValueError("invalid_json", "not valid JSON") from None
        if not isinstance(event, dict):
            raise EventValueError("invalid_event", "an event is a JSON object")
        properties = event.get("properties") or {}
        if not isinstance(properties, dict):
            raise EventValueError("invalid_properties", "properties is a JSON object")
        if "quantity" in event:
            properties = {**properties, "quantity": event["quantity"]}
        key = event.get("idempotency_key")
        if key is not None:
            if key in seen:
                raise _Skipped("duplicate")
            seen.add(str(key))
        raw_ts = event.get("timestamp")
        try:
            timestamp = datetime.fromisoformat(raw_ts) if raw_ts is not None else now
        except (TypeError, ValueError):
            raise EventValueError("invalid_timestamp", "timestamp is not ISO 8601") from None
        if timestamp.tzinfo is None:
            raise EventValueError("invalid_timestamp", "timestamp has no UTC offset")
        if not spec.matches(properties):
            raise _Skipped("unmatched")
        quantity = spec.event_quantity(properties)
        unique = spec.unique_value(properties) if spec.aggregation == "unique_count" else None
        return Reading(timestamp.astimezone(UTC), quantity, seq=number, unique=unique)
