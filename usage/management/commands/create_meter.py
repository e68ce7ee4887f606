import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from usage.services import meter_create


class Command(BaseCommand):
    help = (
        "Create a meter from its spec, e.g. "
        'create_meter ai_tokens \'{"aggregation": "sum", "property": "tokens"}\' --unit token'
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("code", help="The event name clients send, e.g. api_calls.")
        parser.add_argument("spec", help="The meter spec, a JSON object.")
        parser.add_argument("--name", default="")
        parser.add_argument("--unit", default="unit")
        parser.add_argument("--description", default="")

    def handle(self, *args: object, **options: str) -> None:
        try:
            spec = json.loads(options["spec"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"The spec is not valid JSON: {exc}") from exc
        try:
            meter = meter_create(
                code=options["code"],
                spec=spec,
                name=options["name"],
                unit=options["unit"],
                description=options["description"],
            )
        except ValidationError as exc:
            raise CommandError(f"Invalid meter: {'; '.join(exc.messages)}") from exc
        self.stdout.write(f"Created meter {meter.code}: {json.dumps(meter.spec.to_json())}")
