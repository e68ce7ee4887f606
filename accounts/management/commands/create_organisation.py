from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.services import organisation_create


class Command(BaseCommand):
    help = "Create an organisation (a billed customer)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--slug", default=None)
        parser.add_argument("--currency", default="USD")
        parser.add_argument("--timezone", default="UTC")
        parser.add_argument("--billing-email", default="")

    def handle(self, *args: object, **options: str) -> None:
        try:
            organisation = organisation_create(
                name=options["name"],
                slug=options["slug"],
                currency=options["currency"],
                timezone_name=options["timezone"],
                billing_email=options["billing_email"],
            )
        except ValidationError as exc:
            raise CommandError(f"Invalid organisation: {exc.message_dict}") from exc
        self.stdout.write(
            f"Created organisation {organisation.slug} "
            f"({organisation.currency}, {organisation.timezone})."
        )
