"""Settings for the test suite: the real settings, with tasks run inline and fast hashing."""

import os
import socket

from billing_site.settings import *  # noqa: F403
from billing_site.settings import Q_CLUSTER


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# django-q2 reads its configuration at import, so `sync` must be set before Django starts.
Q_CLUSTER["sync"] = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
WHITENOISE_AUTOREFRESH = True  # no collected static files in tests

# The fake Stripe server of stripe_sync's tests listens here (started by a fixture); the SDK and
# dj-stripe reach it through their base-address settings. A subprocess inherits the same port.
STRIPE_FAKE_PORT = int(os.environ.get("STRIPE_FAKE_PORT") or _free_port())
os.environ["STRIPE_FAKE_PORT"] = str(STRIPE_FAKE_PORT)
STRIPE_API_BASE = STRIPE_API_HOST = STRIPE_METER_EVENTS_API_BASE = (
    f"http://127.0.0.1:{STRIPE_FAKE_PORT}"
)
# Tests that talk to the fake set a key (a flusher subprocess gets it from its environment).
STRIPE_SECRET_KEY = os.environ.get("STRIPE_FAKE_SECRET_KEY", "")
STRIPE_TIMEOUT_SECONDS = 5
# dj-stripe's migrations take over a minute; its tables are created from its models in tests
# (stripe_sync/tests/test_migrations.py runs the real ones once).
MIGRATION_MODULES = {"djstripe": "stripe_sync.tests.djstripe_schema"}
