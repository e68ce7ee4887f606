from django.core.management.base import BaseCommand

from billing_site.schedules import SCHEDULES, schedules_install


class Command(BaseCommand):
    help = "Install (or update) every django-q2 schedule declared in billing_site/schedules.py."

    def handle(self, *args: object, **options: object) -> None:
        schedules_install()
        for planned in SCHEDULES:
            self.stdout.write(f"{planned.name}: {planned.func} every {planned.minutes} min")
