from django.apps import AppConfig


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Meters and usage"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from usage.models import UsageEvent
        from usage.rollups import fold_after_commit
        from usage.signals import events_stored
        from usage.sqlite_functions import register_sqlite_functions

        connection_created.connect(register_sqlite_functions, dispatch_uid="usage_sqlite_functions")
        events_stored.connect(fold_after_commit, sender=UsageEvent, dispatch_uid="usage_rollups")
