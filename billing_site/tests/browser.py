"""Drive Debian's Chromium from tests with sync Playwright.

`playwright install` cannot download a browser here, so the Playwright wheel (which bundles its
driver) launches the `chromium` Debian package (debian-packages.txt). Tests using it are marked
`browser` and pair `chromium_page()` with pytest-django's `live_server`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"

# Root in a container needs --no-sandbox; the rest stop Chromium from phoning home (there is no
# network but the package registries, so those calls would only hang) and from using /dev/shm,
# which is small in containers.
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@contextmanager
def chromium_page(*, timeout_ms: float = 10_000) -> Iterator[Page]:
    """Launch headless Chromium, yield a fresh page, and close the browser afterwards.

    Playwright's actions wait up to `timeout_ms` (its default is 30 s; a page served from
    loopback that is not there in 10 s is not coming).
    """
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (debian-packages.txt)")
    # Sync Playwright keeps an asyncio loop running in this thread, so Django refuses ORM calls
    # made here (fixtures, assertions) while the browser is open unless told it is safe.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS
            )
            try:
                context = browser.new_context(viewport={"width": 1280, "height": 800})
                context.set_default_timeout(timeout_ms)
                yield context.new_page()
                context.close()
            finally:
                browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def save_screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG as artifacts/screenshots/<name>.png and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
