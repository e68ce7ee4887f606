from django.apps import AppConfig


class UsageConfig(AppConfig):
    name = "usage"
    verbose_name = "Meters and usage"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from usage.sqlite_functions import register_sqlite_functions

        connection_created.connect(register_sqlite_functions, dispatch_uid="usage_sqlite_functions")
