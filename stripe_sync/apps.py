from django.apps import AppConfig


class StripeSyncConfig(AppConfig):
    name = "stripe_sync"
    verbose_name = "Stripe sync"

    def ready(self) -> None:
        from stripe_sync import receivers  # noqa: F401 - connects the signal receivers
