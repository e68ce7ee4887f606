"""Settings for Meterline, read from the environment.

With no environment at all the app runs the embedded default: SQLite, the django-q2 ORM broker,
console email, DEBUG on. `DATABASE_URL`, `REDIS_URL` and `EMAIL_URL` switch to PostgreSQL, the Redis
broker and SMTP. With `DJANGO_DEBUG=false` it refuses to start without `DJANGO_SECRET_KEY`.
"""

from datetime import timedelta
from pathlib import Path
from typing import Any

import django_stubs_ext
import environ
from django.core.exceptions import ImproperlyConfigured

django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DJANGO_DEBUG", default=True)

SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is false.")
    SECRET_KEY = "insecure-development-key-do-not-use-in-production-0123456789abcdef"  # noqa: S105

ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("DJANGO_CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "template_partials",
    "django_q",
    "ninja",
    "billing_site",
    "accounts",
    "usage",
    "plans",
    "invoices",
    "alerts",
    "djstripe",
    "stripe_sync",
    "portal",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "billing_site.urls"
LOGIN_URL = "portal:login"
LOGIN_REDIRECT_URL = "portal:dashboard"
LOGOUT_REDIRECT_URL = "portal:login"
# Portal logins: after this many failures for one username (or one address) in the window,
# further attempts are refused until it passes.
LOGIN_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
LOGIN_FAILURE_WINDOW = timedelta(minutes=env.int("LOGIN_FAILURE_WINDOW_MINUTES", default=15))
WSGI_APPLICATION = "billing_site.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------
DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server and the django-q2 cluster read while one of them writes; IMMEDIATE
    # transactions take the write lock up front instead of failing half-way with "locked".
    DATABASES["default"]["OPTIONS"] = {
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
else:
    DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("DATABASE_CONN_MAX_AGE", default=60))
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Task queue (django-q2) -------------------------------------------------------------------
REDIS_URL = env.str("REDIS_URL", default="")
Q_CLUSTER: dict[str, object] = {
    "name": "meterline",
    "workers": env.int("Q_WORKERS", default=2),
    "timeout": 600,
    "retry": 900,
    "max_attempts": 3,
    "catch_up": False,
    "label": "Tasks",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# --- Cache (login throttling, shared by every process when Redis is there) ------------------
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    if REDIS_URL
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}

# --- Email ----------------------------------------------------------------------------------
vars().update(env.email_url("EMAIL_URL", default="consolemail://"))
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="Meterline <billing@localhost>")

# --- Auth, i18n, static -----------------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# --- Production hardening (passes `manage.py check --deploy` when DEBUG is off) ---------------
if not DEBUG:
    SECURE_SSL_REDIRECT = env.bool("DJANGO_SECURE_SSL_REDIRECT", default=True)
    SECURE_HSTS_SECONDS = env.int("DJANGO_SECURE_HSTS_SECONDS", default=31_536_000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    if env.bool("DJANGO_BEHIND_TLS_PROXY", default=False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # WeasyPrint narrates every render at INFO.
        "weasyprint": {"level": "WARNING"},
        "fontTools": {"level": "WARNING"},
    },
}

# --- Meterline --------------------------------------------------------------------------------
# Events are attributed by their own timestamp; outside this window they are refused by the API
# and enter only through `manage.py import_events --allow-backdated`.
INGEST_MAX_PAST = timedelta(days=env.int("INGEST_MAX_PAST_DAYS", default=35))
INGEST_MAX_FUTURE = timedelta(seconds=env.int("INGEST_MAX_FUTURE_SECONDS", default=300))
INGEST_MAX_BATCH = env.int("INGEST_MAX_BATCH", default=1000)
# PostgreSQL: monthly partitions of the events table created this many months ahead of the
# current one by the `ensure-event-partitions` schedule (usage.partitions).
EVENT_PARTITIONS_AHEAD = env.int("EVENT_PARTITIONS_AHEAD", default=3)
INGEST_MAX_BODY_BYTES = env.int("INGEST_MAX_BODY_BYTES", default=5 * 1024 * 1024)
# The ingestion buffer (README: "The ingestion buffer").
# "redis": the HTTP API queues events in a Redis stream and `manage.py ingest_worker` (or the
# drain-ingest-buffer schedule) stores them; "": the API writes straight to the database.
INGEST_BUFFER = env.str("INGEST_BUFFER", default="")
if INGEST_BUFFER not in {"", "redis"}:
    raise ImproperlyConfigured('INGEST_BUFFER is "" (off) or "redis".')
if INGEST_BUFFER and not REDIS_URL:
    raise ImproperlyConfigured("INGEST_BUFFER=redis needs REDIS_URL.")
INGEST_BUFFER_STREAM = env.str("INGEST_BUFFER_STREAM", default="meterline:events")
INGEST_BUFFER_GROUP = env.str("INGEST_BUFFER_GROUP", default="meterline-ingest")
# Stream entries per read; an entry is one API request (up to INGEST_MAX_BATCH events).
INGEST_BUFFER_BATCH = env.int("INGEST_BUFFER_BATCH", default=50)
# A consumer waits this long for new entries before checking for a stop signal.
INGEST_BUFFER_BLOCK_MS = env.int("INGEST_BUFFER_BLOCK_MS", default=1000)
# An entry read but not acknowledged for this long belongs to a dead consumer: another claims it.
# Longer than a batch ever takes to store, or two consumers store it (harmless, but wasted).
INGEST_BUFFER_CLAIM_IDLE = timedelta(
    seconds=env.int("INGEST_BUFFER_CLAIM_IDLE_SECONDS", default=60)
)
# The buffer answers `duplicate` for a key it queued within this time (PostgreSQL's unique
# constraint decides after it, and alone if the key is forgotten). At least the acceptance
# window: a retry passes validation only while its timestamp is inside it (a day more by
# default, for events dated up to INGEST_MAX_FUTURE ahead).
INGEST_BUFFER_SEEN_TTL = timedelta(
    days=env.int("INGEST_BUFFER_SEEN_DAYS", default=INGEST_MAX_PAST.days + 1)
)
if INGEST_BUFFER_SEEN_TTL < INGEST_MAX_PAST:
    raise ImproperlyConfigured("INGEST_BUFFER_SEEN_DAYS must be at least INGEST_MAX_PAST_DAYS.")
# Usage rollups (usage.rollups): after an ingestion commit a process queues a fold of new events
# into the hourly buckets at most this often; the `fold-rollups` schedule folds every minute too.
ROLLUP_FOLD_INTERVAL = timedelta(milliseconds=env.int("ROLLUP_FOLD_INTERVAL_MS", default=1000))
# An API key's last_used_at is written at most this often, not on every request.
API_KEY_LAST_USED_INTERVAL = timedelta(seconds=env.int("API_KEY_LAST_USED_SECONDS", default=60))
# Each process remembers a verified key this long: a revocation reaches other processes within it.
API_KEY_CACHE_SECONDS = env.int("API_KEY_CACHE_SECONDS", default=5)
# Request metering middleware (usage.instrumentation.UsageMeteringMiddleware); see README.
METERLINE_METERED_ROUTES: list[dict[str, Any]] = []
METERLINE_ORGANISATION_RESOLVER = env.str("METERLINE_ORGANISATION_RESOLVER", default="")
METERLINE_REQUEST_ID_HEADER = env.str("METERLINE_REQUEST_ID_HEADER", default="X-Request-ID")
DATA_UPLOAD_MAX_MEMORY_SIZE = INGEST_MAX_BODY_BYTES
# The events index carries `quantity` as an INCLUDE column on PostgreSQL; SQLite has no such
# columns and uses the plain index, which is what the embedded default needs.
SILENCED_SYSTEM_CHECKS = ["models.W040"]
# A period closes this long after its end, so that late events with a timestamp inside it
# still count in it.
BILLING_GRACE = timedelta(minutes=env.int("BILLING_GRACE_MINUTES", default=60))
# A close counts the events received up to this long before its as-of instant, so that every
# request that began before the cutoff has committed when the close reads (requests time out
# well within it).
BILLING_CUTOFF_SETTLE = timedelta(seconds=env.int("BILLING_CUTOFF_SETTLE_SECONDS", default=120))
# An event received this long after its timestamp may miss its period's close: it is flagged
# `delayed` and the next close checks it. Any event a close misses is at least this late.
INGEST_DELAYED_AFTER = BILLING_GRACE - BILLING_CUTOFF_SETTLE
if timedelta(0) >= INGEST_DELAYED_AFTER:
    raise ImproperlyConfigured("BILLING_GRACE must be longer than BILLING_CUTOFF_SETTLE.")
INVOICE_DUE_DAYS = env.int("INVOICE_DUE_DAYS", default=30)
# The seller, as printed on invoices.
SELLER_NAME = env.str("SELLER_NAME", default="Meterline Demo Ltd")
SELLER_ADDRESS = env.str("SELLER_ADDRESS", default="1 Example Street, Springfield")
SELLER_EMAIL = env.str("SELLER_EMAIL", default="billing@example.com")
# Where customers reach the portal, for links in emails.
PORTAL_URL = env.str("PORTAL_URL", default="http://127.0.0.1:8000")

# --- Alerts -----------------------------------------------------------------------------------
# A failed email or webhook is retried after about base x 2^(attempt-1) seconds (+-20%), capped,
# and given up after the last attempt (every attempt is recorded).
ALERTS_RETRY_BASE_SECONDS = env.int("ALERTS_RETRY_BASE_SECONDS", default=30)
ALERTS_RETRY_MAX_SECONDS = env.int("ALERTS_RETRY_MAX_SECONDS", default=3600)
ALERTS_DELIVERY_MAX_ATTEMPTS = env.int("ALERTS_DELIVERY_MAX_ATTEMPTS", default=10)
ALERTS_WEBHOOK_TIMEOUT_SECONDS = env.int("ALERTS_WEBHOOK_TIMEOUT_SECONDS", default=10)
# How long a process trusts its list of the rules ingestion checks (a rule change in another
# process is seen by ingestion after at most this; the every-minute check sees it at once).
ALERTS_RULE_CACHE_SECONDS = env.int("ALERTS_RULE_CACHE_SECONDS", default=10)

# --- Stripe (stripe_sync; see the README) -----------------------------------------------------
# Off until a secret key is set: events still enter the outbox, which keeps what it would send.
STRIPE_SECRET_KEY = env.str("STRIPE_SECRET_KEY", default="")
STRIPE_LIVE_MODE = env.bool("STRIPE_LIVE_MODE", default=False)
# Where the SDK sends requests; changed only to point at a fake Stripe in tests.
STRIPE_API_BASE = env.str("STRIPE_API_BASE", default="https://api.stripe.com")
STRIPE_METER_EVENTS_API_BASE = env.str(
    "STRIPE_METER_EVENTS_API_BASE", default="https://meter-events.stripe.com"
)
if "STRIPE_API_BASE" in env:
    # dj-stripe's own requests (webhook re-fetches); it warns when this is set in production.
    STRIPE_API_HOST = STRIPE_API_BASE
DJSTRIPE_FOREIGN_KEY_TO_FIELD = "id"
# Push every finalized invoice to Stripe for collection (Meterline invoices, Stripe collects).
STRIPE_PUSH_INVOICES = env.bool("STRIPE_PUSH_INVOICES", default=False)
# Meter events per stream request (Stripe's v2 stream takes at most 100).
STRIPE_FLUSH_BATCH = env.int("STRIPE_FLUSH_BATCH", default=100)
# A flusher holds the rows it is sending this long; a flusher that dies leaves them to the next.
STRIPE_FLUSH_LEASE = timedelta(seconds=env.int("STRIPE_FLUSH_LEASE_SECONDS", default=120))
# Back-off after 429, 5xx or no answer: base * 2**attempt, capped, with jitter.
STRIPE_RETRY_BASE = timedelta(seconds=env.int("STRIPE_RETRY_BASE_SECONDS", default=5))
STRIPE_RETRY_CAP = timedelta(seconds=env.int("STRIPE_RETRY_CAP_SECONDS", default=300))
# Stripe refuses meter events older than this; such events are reported, not sent.
STRIPE_METER_EVENT_MAX_AGE = timedelta(days=35)
STRIPE_TIMEOUT_SECONDS = env.int("STRIPE_TIMEOUT_SECONDS", default=20)
# Ingestion asks which meters stream on every request; each process keeps the answer this long.
STRIPE_MODE_CACHE_SECONDS = env.int("STRIPE_MODE_CACHE_SECONDS", default=5)
