"""Settings for the test suite: the real settings, with tasks run inline and fast hashing."""

from billing_site.settings import *  # noqa: F403
from billing_site.settings import Q_CLUSTER

# django-q2 reads its configuration at import, so `sync` must be set before Django starts.
Q_CLUSTER["sync"] = True
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
WHITENOISE_AUTOREFRESH = True  # no collected static files in tests
