"""A real browser logs in to the admin served by live_server, with its static files."""

import pytest
from playwright.sync_api import Response

from billing_site.tests.browser import chromium_page, save_screenshot


@pytest.mark.browser
def test_admin_login_shows_the_styled_site_administration(live_server, admin_user):
    failed: list[str] = []
    with chromium_page() as page:
        # Given a browser that records every request the server refused
        def record(response: Response) -> None:
            if response.status >= 400:
                failed.append(f"{response.status} {response.url}")

        page.on("response", record)

        # When the admin logs in
        login = page.goto(live_server.url + "/admin/login/")
        assert login is not None and login.ok, failed
        page.fill("#id_username", "admin")
        page.fill("#id_password", "password")
        page.click("input[type=submit]")

        # Then the admin index shows, styled: the admin stylesheet paints the header
        page.wait_for_url(live_server.url + "/admin/")
        assert "Site administration" in page.inner_text("#content h1")
        header_background = page.eval_on_selector(
            "#header", "el => getComputedStyle(el).backgroundColor"
        )
        save_screenshot(page, "admin-index")

    assert header_background not in {"rgba(0, 0, 0, 0)", "transparent"}
    assert failed == []
