"""Suite-wide fixtures, and the deselection of tests whose service is not configured.

Tests marked `postgres` or `redis` run only when DATABASE_URL points at PostgreSQL or REDIS_URL
is set (CI's second pass). They are deselected otherwise, not skipped; with
METERLINE_REQUIRE_SERVICES=postgres,redis a missing service fails the run instead.
"""

from __future__ import annotations

import os

import pytest
from django.conf import settings

from accounts.services import api_key_cache_clear
from alerts.selectors import ingest_rules_cache_clear
from stripe_sync.selectors import streamed_meter_cache_clear
from usage.selectors import meter_cache_clear

# Per-process caches of the ingestion path: every test starts without them.
_PROCESS_CACHES = [
    meter_cache_clear,
    api_key_cache_clear,
    ingest_rules_cache_clear,
    streamed_meter_cache_clear,
]


def _available() -> set[str]:
    available = set()
    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        available.add("postgres")
    if settings.REDIS_URL:
        available.add("redis")
    return available


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    available = _available()
    required = {s for s in os.environ.get("METERLINE_REQUIRE_SERVICES", "").split(",") if s}
    if required - available:
        raise pytest.UsageError(f"Required services not configured: {required - available}")
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        needs = {name for name in ("postgres", "redis") if item.get_closest_marker(name)}
        (keep if needs <= available else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True)
def _fresh_meter_cache():
    """The ingestion path's caches are per process; every test starts without them."""
    for clear in _PROCESS_CACHES:
        clear()
    yield
    for clear in _PROCESS_CACHES:
        clear()


@pytest.fixture
def browser_page():
    """A page of Debian's headless Chromium (see billing_site/tests/browser.py)."""
    from django.db import connections

    from billing_site.tests.browser import chromium_page

    with chromium_page() as page:
        yield page
        # Queries made while Playwright runs use connections of their own (its sync API changes
        # the context Django keys connections by): close them, or the test database cannot be
        # dropped at the end.
        connections.close_all()


@pytest.fixture
def screenshot():
    """save(page, name): a full-page PNG in artifacts/screenshots/."""
    from billing_site.tests.browser import save_screenshot

    return save_screenshot


@pytest.fixture
def smtp_inbox(settings):
    """A real SMTP server on loopback; Django's email goes to it. `.messages` are what arrived."""
    from core.tests.smtp import smtp_server, use_smtp

    with smtp_server() as inbox:
        use_smtp(settings, inbox.port)
        yield inbox


@pytest.fixture
def at_once():
    """at_once(work, threads=2, timeout=120) -> errors: run `work` in threads released together
    by a barrier, each closing its own database connection; the exceptions they raised."""
    import threading

    from django.db import connection

    def run(work, threads=2, timeout=120):
        barrier = threading.Barrier(threads)
        errors = []

        def worker():
            try:
                barrier.wait(timeout=timeout)
                work()
            except BaseException as exc:
                errors.append(exc)
            finally:
                connection.close()

        started = [threading.Thread(target=worker) for _ in range(threads)]
        for thread in started:
            thread.start()
        for thread in started:
            thread.join(timeout=timeout)
        return errors

    return run
