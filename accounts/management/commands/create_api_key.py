from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.models import Organisation
from accounts.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for an organisation; the key is printed alone on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="The organisation's slug.")
        parser.add_argument("--name", default="created by create_api_key")

    def handle(self, *args: object, **options: str) -> None:
        try:
            organisation = Organisation.objects.get(slug=options["slug"])
        except Organisation.DoesNotExist as exc:
            raise CommandError(f"No organisation with slug {options['slug']!r}.") from exc
        issued = api_key_create(organisation=organisation, name=options["name"])
        self.stderr.write(f"API key {issued.api_key.prefix} for {organisation.slug}; shown once:")
        self.stdout.write(issued.secret)
