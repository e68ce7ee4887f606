from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from stripe_sync import gateway
from stripe_sync.models import StripeMeter
from stripe_sync.services import meter_configure, meter_provision
from usage.models import Meter


class Command(BaseCommand):
    help = (
        "Send a meter's usage to Stripe (stream or period_summary); provision it if a key is set."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("code", help="The meter's code.")
        parser.add_argument("--mode", choices=StripeMeter.Mode.values, default="stream")

    def handle(self, *args: Any, **options: Any) -> None:
        meter = Meter.objects.filter(code=options["code"]).first()
        if meter is None:
            raise CommandError(f"No meter has the code {options['code']!r}.")
        try:
            link = meter_configure(meter=meter, mode=options["mode"])
        except ValidationError as exc:
            raise CommandError("; ".join(exc.messages)) from exc
        if gateway.enabled():
            link = meter_provision(stripe_meter=link)
        self.stdout.write(str(link))
