"""The portal in a real headless Chromium (Debian's, driven by Playwright)."""

import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

from accounts.models import APIKey, Membership
from accounts.services import api_key_create, membership_add
from accounts.tests.factories import make_organisation
from core.periods import Period
from invoices.services import period_close
from plans.tests.factories import make_plan, make_subscription
from usage.services import events_ingest
from usage.tests.factories import make_meter

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def customer():
    now = timezone.now()
    calls = make_meter("count", code="calls")
    plan = make_plan({calls: {"model": "standard", "unit_price": "0.25"}}, base_fee=Decimal("10"))
    org = make_organisation(slug="acme", name="Acme Robotics")
    subscription = make_subscription(org, plan, now - timedelta(days=40))
    period = Period(subscription.start, subscription.start + timedelta(days=31))
    invoice, _ = period_close(
        subscription=subscription, period=period, as_of=period.end + timedelta(hours=2)
    )
    events_ingest(
        organisation=org,
        payloads=[
            {
                "event_name": "calls",
                "idempotency_key": f"call-{n}",
                "timestamp": (now - timedelta(minutes=n)).isoformat(),
            }
            for n in range(40)
        ],
    )
    user = get_user_model().objects.create_user("ada", password="portal-pass-1")
    membership_add(organisation=org, user=user, role=Membership.Role.OWNER)
    secret = api_key_create(organisation=org, name="api").secret
    return {
        "org": org,
        "invoice": invoice,
        "secret": secret,
        "start": subscription_period_start(subscription, now),
    }


def subscription_period_start(subscription, now):
    from plans.selectors import subscription_period

    return subscription_period(subscription=subscription, at=now).start


def api_usage(customer):
    response = Client().get(
        "/api/v1/usage",
        {
            "meter": "calls",
            "start": customer["start"].isoformat(),
            "end": timezone.now().isoformat(),
        },
        headers={"Authorization": f"Bearer {customer['secret']}"},
    )
    return json.loads(response.content)["value"]


def test_the_portal_in_a_browser(live_server, customer, tmp_path, browser_page, screenshot):
    page = browser_page
    page.goto(live_server.url + "/portal/")
    page.fill("input[name=username]", "ada")
    page.fill("input[name=password]", "portal-pass-1")
    page.click("button[type=submit]")
    page.wait_for_selector("#dashboard-numbers")

    # The dashboard's usage is the API's.
    usage = page.inner_text("#meter-calls .usage")
    assert usage.split()[0] == api_usage(customer) == "40"
    assert page.inner_text("#total-so-far") == "$20.00"
    screenshot(page, "portal-dashboard")

    # The usage page draws its chart and pages through events with HTMX.
    page.click("#meter-calls a")
    page.wait_for_selector("canvas#usage-chart[data-drawn=true]")
    assert page.locator("#events-table tbody tr").count() == 25
    page.click("#events-more")
    page.wait_for_function("document.querySelectorAll('#events-table tbody tr').length === 15")
    assert "page 2" not in page.inner_text("#events-table")

    # API keys: created and shown once, then revoked.
    page.goto(live_server.url + "/portal/api-keys/")
    page.fill("input[name=name]", "from the browser")
    page.click("#api-key-create")
    page.wait_for_selector("#new-secret")
    assert page.inner_text("#new-secret").startswith("ml_")
    key = APIKey.objects.get(name="from the browser")
    page.on("dialog", lambda dialog: dialog.accept())
    page.click(f"#api-key-{key.pk} button.revoke")
    page.wait_for_selector(f"#api-key-{key.pk} >> text=revoked")
    key.refresh_from_db()
    assert key.revoked_at is not None

    # The invoice page, and its PDF downloaded.
    page.goto(live_server.url + f"/portal/invoices/{customer['invoice'].pk}/")
    assert customer["invoice"].number in page.inner_text("#invoice-body")
    screenshot(page, "portal-invoice")
    with page.expect_download() as download:
        page.click("#invoice-pdf")
    target = tmp_path / "invoice.pdf"
    download.value.save_as(target)
    assert target.read_bytes().startswith(b"%PDF")

    # Alerts: a rule made in the form fires, its banner shows on the dashboard until dismissed.
    page.goto(live_server.url + "/portal/alerts/")
    page.select_option("select[name=metric]", "usage")
    page.select_option("select[name=meter]", "calls")
    page.fill("input[name=thresholds]", "25, 1000")
    page.click("#alert-rule-create")
    page.wait_for_selector("#already-crossed")
    assert "40 is already past 25" in page.inner_text("#already-crossed")
    assert page.input_value("input[name=thresholds]") == ""  # the form was reset
    call_command("check_alerts")
    page.goto(live_server.url + "/portal/alerts/")
    assert "fired" in page.inner_text(".threshold-fired")
    screenshot(page, "portal-alerts")
    page.goto(live_server.url + "/portal/")
    banner = page.locator(".alert-banner")
    assert "Calls usage passed 25" in banner.inner_text()
    screenshot(page, "portal-dashboard-alert")
    page.click(".alert-banner button.acknowledge")
    page.wait_for_selector(".alert-banner", state="detached")
