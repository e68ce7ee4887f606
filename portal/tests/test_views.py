import csv
import io
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from accounts.models import APIKey, Membership
from accounts.services import api_key_authenticate, api_key_create, membership_add
from accounts.tests.factories import make_organisation
from alerts.models import AlertFiring, AlertRule
from alerts.services import alert_rule_create, alerts_evaluate
from core.periods import Period
from invoices.services import period_close
from plans.services import credit_grant_create
from plans.tests.factories import make_plan, make_subscription
from portal.urls import urlpatterns
from usage.services import events_ingest
from usage.tests.factories import make_meter

HTMX = {"HX-Request": "true"}


@pytest.fixture
def world(db):
    """Two customers on the same plan, each with a portal user, usage, an invoice and a key."""
    now = timezone.now()
    calls = make_meter("count", code="calls")
    plan = make_plan(
        {
            calls: {
                "model": "graduated",
                "tiers": [{"up_to": "2", "unit_price": "0"}, {"up_to": None, "unit_price": "0.5"}],
            }
        },
        base_fee=Decimal("10"),
    )
    result = {}
    for name in ("acme", "globex"):
        org = make_organisation(slug=name, name=name.title())
        subscription = make_subscription(org, plan, now - timedelta(days=40))
        user = get_user_model().objects.create_user(f"{name}-user", password="pw-123456")
        membership_add(organisation=org, user=user, role=Membership.Role.OWNER)
        period = Period(subscription.start, subscription.start + timedelta(days=31))
        invoice, _ = period_close(
            subscription=subscription, period=period, as_of=period.end + timedelta(hours=2)
        )
        events_ingest(
            organisation=org,
            payloads=[
                {
                    "event_name": "calls",
                    "idempotency_key": f"{name}-{n}",
                    "properties": {"region": "eu" if n % 2 else "us"},
                }
                for n in range(30)
            ],
        )
        credit_grant_create(
            organisation=org,
            amount_minor=500,
            currency="USD",
            effective_from=now - timedelta(days=1),
            description="Goodwill",
        )
        key = api_key_create(organisation=org, name="prod").api_key
        rule = alert_rule_create(
            organisation=org,
            metric=AlertRule.Metric.USAGE,
            meter=calls,
            name=f"{name}-calls-rule",
            thresholds=[("absolute", Decimal(10))],
        )
        alerts_evaluate(as_of=timezone.now(), organisation_ids=[org.pk])
        result[name] = {
            "org": org,
            "user": user,
            "invoice": invoice,
            "key": key,
            "subscription": subscription,
            "rule": rule,
            "firing": AlertFiring.objects.get(rule=rule),
        }
    return result


def login(client, who):
    client.force_login(who["user"])
    return client


PAGES = [
    ("portal:dashboard", {}, "dashboard-numbers"),
    ("portal:usage_detail", {"code": "calls"}, "events-table"),
    ("portal:invoices", {}, "invoice-list"),
    ("portal:credits", {}, "credit-ledger"),
    ("portal:api_keys", {}, "api-key-list"),
    ("portal:invoice_upcoming", {}, "invoice-body"),
    ("portal:alerts", {}, "alert-rules"),
]


@pytest.mark.parametrize(("name", "kwargs", "partial"), PAGES)
def test_each_page_renders_whole_and_its_partial_for_htmx(client, world, name, kwargs, partial):
    login(client, world["acme"])
    url = reverse(name, kwargs=kwargs)
    full = client.get(url)
    assert full.status_code == 200
    assert b"<html" in full.content and f'id="{partial}"'.encode() in full.content
    part = client.get(url, headers=HTMX)
    assert part.status_code == 200
    assert b"<html" not in part.content and f'id="{partial}"'.encode() in part.content


def test_dashboard_shows_this_organisations_usage_and_cost(client, world):
    login(client, world["acme"])
    body = client.get(reverse("portal:dashboard")).content.decode()
    assert "30 unit" in body  # usage so far
    assert "$14.00" in body  # 28 calls beyond the 2 free x 0.50
    assert "$24.00" in body  # with the $10 base fee
    assert "$5.00" in body  # credit balance
    assert 'hx-trigger="every 5s"' in body


def test_dashboard_polling_stops_without_a_subscription(client, db):
    org = make_organisation()
    user = get_user_model().objects.create_user("lonely", password="pw-123456")
    membership_add(organisation=org, user=user)
    client.force_login(user)
    assert client.get(reverse("portal:dashboard"), headers=HTMX).status_code == 286


def test_invoice_pages_and_pdf(client, world):
    login(client, world["acme"])
    invoice = world["acme"]["invoice"]
    page = client.get(reverse("portal:invoice_detail", args=[invoice.pk])).content.decode()
    assert invoice.number in page and "$10.00" in page
    pdf = client.get(reverse("portal:invoice_pdf", args=[invoice.pk]))
    assert pdf["Content-Type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    listing = client.get(reverse("portal:invoices")).content.decode()
    assert invoice.number in listing and world["globex"]["invoice"].number not in listing


def test_events_paginate_and_filter(client, world):
    login(client, world["acme"])
    url = reverse("portal:usage_detail", args=["calls"])
    first = client.get(url).content.decode()
    assert "page 2 of 2" in first
    second = client.get(url + "?page=2", headers=HTMX).content.decode()
    assert second.count("acme-") == 5  # 30 events, 25 a page
    filtered = client.get(url + "?property=region&value=eu", headers=HTMX).content.decode()
    assert filtered.count("acme-") == 15


def test_the_usage_chart_is_daily_or_hourly(client, world):
    login(client, world["acme"])
    url = reverse("portal:usage_detail", args=["calls"])
    start = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    day = f"start={start:%Y-%m-%d}&end={start:%Y-%m-%d}"
    daily = client.get(f"{url}?{day}")
    hourly = client.get(f"{url}?{day}&by=hour")
    daily_chart = daily.context["chart"]
    hourly_chart = hourly.context["chart"]
    assert len(daily_chart["labels"]) == 1
    assert len(hourly_chart["labels"]) == 24
    assert hourly_chart["labels"][0] == f"{start:%d %b} 00:00"
    # The 30 events were sent today (UTC): the hours add up to the day.
    assert sum(hourly_chart["values"]) == sum(daily_chart["values"]) == 30
    assert 'id="usage-by-day"' in daily.content.decode()
    assert 'id="usage-by-day"' not in hourly.content.decode()
    assert "<strong>Hourly</strong>" in hourly.content.decode()


def test_csv_export_has_every_event_of_the_period(client, world):
    login(client, world["acme"])
    response = client.get(reverse("portal:usage_export", args=["calls"]))
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == ["timestamp", "quantity", "idempotency_key", "properties"]
    assert len(rows) == 31 and all(row[2].startswith("acme-") for row in rows[1:])


def test_api_keys_are_created_once_shown_and_revoked(client, world):
    login(client, world["acme"])
    created = client.post(
        reverse("portal:api_key_new"), {"name": "ci"}, headers=HTMX
    ).content.decode()
    secret = created.split('id="new-secret">')[1].split("<")[0]
    assert api_key_authenticate(secret=secret).organisation == world["acme"]["org"]
    again = client.get(reverse("portal:api_keys")).content.decode()
    assert secret not in again
    key = APIKey.objects.get(name="ci")
    client.post(reverse("portal:api_key_revoke", args=[key.pk]), headers=HTMX)
    assert api_key_authenticate(secret=secret) is None
    assert client.get(reverse("portal:api_key_new")).status_code == 405  # mutations are POST


def test_a_user_switches_between_their_organisations(client, world):
    user = world["acme"]["user"]
    membership_add(organisation=world["globex"]["org"], user=user)
    client.force_login(user)
    assert (
        world["acme"]["invoice"].number in client.get(reverse("portal:invoices")).content.decode()
    )
    client.post(reverse("portal:switch_organisation"), {"organisation": world["globex"]["org"].pk})
    listing = client.get(reverse("portal:invoices")).content.decode()
    assert (
        world["globex"]["invoice"].number in listing
        and world["acme"]["invoice"].number not in listing
    )


def test_every_object_url_of_another_organisation_is_a_404(client, world):
    """Walk every portal URL that names an object, as a user of the other organisation."""
    acme = world["acme"]
    login(client, world["globex"])
    objects = {
        "invoice_detail": acme["invoice"],
        "invoice_pdf": acme["invoice"],
        "api_key_revoke": acme["key"],
        "alert_rule_delete": acme["rule"],
        "alert_rule_pause": acme["rule"],
        "alert_acknowledge": acme["firing"],
    }
    # Every URL that names an object is walked: a new one must be added above.
    naming_an_object = {p.name for p in urlpatterns if "<int:pk>" in str(p.pattern)}
    assert naming_an_object == set(objects)
    urls = [
        (
            "get" if name in ("invoice_detail", "invoice_pdf") else "post",
            reverse(f"portal:{name}", args=[obj.pk]),
        )
        for name, obj in objects.items()
    ]
    urls.append(("post", reverse("portal:switch_organisation")))
    for method, url in urls:
        data = {"organisation": acme["org"].pk} if "organisation" in url else {}
        for headers in ({}, HTMX):
            response = getattr(client, method)(url, data, headers=headers)
            assert response.status_code == 404, url
            assert acme["invoice"].number.encode() not in response.content
            assert b"acme-calls-rule" not in response.content
    assert APIKey.objects.get(pk=acme["key"].pk).revoked_at is None
    rule = AlertRule.objects.get(pk=acme["rule"].pk)
    assert rule.is_active
    assert AlertFiring.objects.get(pk=acme["firing"].pk).acknowledged_at is None
    # Pages that list things show only globex's.
    for name, kwargs, _ in PAGES:
        body = client.get(reverse(name, kwargs=kwargs)).content.decode()
        assert (
            "acme-" not in body
            and acme["invoice"].number not in body
            and acme["key"].prefix not in body
            and "acme-calls-rule" not in body
        )


def test_anonymous_visitors_are_sent_to_log_in(client, world):
    for name, kwargs, _ in PAGES:
        response = client.get(reverse(name, kwargs=kwargs))
        assert response.status_code == 302 and response["Location"].startswith("/portal/login/")


def test_login_is_throttled_after_repeated_failures(client, world, settings):
    settings.LOGIN_FAILURE_LIMIT = 3
    url = reverse("portal:login")
    for _ in range(3):
        assert client.post(url, {"username": "acme-user", "password": "wrong"}).status_code == 200
    refused = client.post(url, {"username": "acme-user", "password": "pw-123456"})
    assert b"Too many failed attempts" in refused.content
    assert "_auth_user_id" not in client.session


def test_login_with_the_right_password(client, world):
    response = client.post(
        reverse("portal:login"), {"username": "globex-user", "password": "pw-123456"}
    )
    assert response.status_code == 302 and response["Location"] == reverse("portal:dashboard")


def test_dates_are_shown_in_the_organisations_time_zone(client, world):
    org = world["acme"]["org"]
    org.timezone = "Pacific/Kiritimati"  # UTC+14: the local date differs from UTC's
    org.save()
    login(client, world["acme"])
    response = client.get(reverse("portal:dashboard"))
    period_end = response.context["period"].end
    local = period_end.astimezone(org.tzinfo)
    assert local.hour != period_end.hour
    assert f"(ends at {local:%H:%M}" in response.content.decode()


def test_alert_rules_are_created_with_their_thresholds_and_say_when_already_crossed(client, world):
    login(client, world["acme"])
    response = client.post(
        reverse("portal:alert_rule_new"),
        {
            "metric": "usage",
            "meter": "calls",
            "name": "Free tier watch",
            "thresholds": "50%, 80 %, 1_000",
            "email_to": "ops@acme.test, cto@acme.test",
            "webhook_url": "https://hooks.acme.test/meterline",
            "show_banner": "on",
        },
        headers=HTMX,
    )
    assert response.status_code == 200
    body = response.content.decode()
    assert "<html" not in body and 'id="alert-rules"' in body
    rule = AlertRule.objects.get(organisation=world["acme"]["org"], name="Free tier watch")
    assert sorted((t.kind, t.value) for t in rule.thresholds.all()) == [
        ("absolute", Decimal(1000)),
        ("percent", Decimal(50)),
        ("percent", Decimal(80)),
    ]
    assert rule.email_to == ["ops@acme.test", "cto@acme.test"]
    assert rule.webhook_url == "https://hooks.acme.test/meterline"
    # 30 calls of 2 included: 50% (1) and 80% (1.6) are already past, 1,000 is not.
    assert 'id="already-crossed"' in body
    assert "is already past 50%, 80%: they fire at the next evaluation" in body
    assert rule.webhook_secret in body


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"thresholds": "lots"}, "&#x27;lots&#x27; is not a number."),
        ({"thresholds": "-5"}, "thresholds are positive numbers"),
        ({"thresholds": "5", "meter": ""}, "A usage rule watches one meter."),
        ({"thresholds": "5", "email_to": "not-an-address"}, "Enter a valid email address."),
        ({"thresholds": "5", "show_banner": ""}, "Choose at least one channel"),
    ],
)
def test_a_bad_rule_is_refused_in_the_form_and_nothing_is_stored(client, world, fields, error):
    login(client, world["acme"])
    data = {"metric": "usage", "meter": "calls", "show_banner": "on", **fields}
    response = client.post(reverse("portal:alert_rule_new"), data, headers=HTMX)
    assert response.status_code == 200
    assert response["HX-Retarget"] == "#alert-rule-form"
    assert error in response.content.decode()
    assert AlertRule.objects.filter(organisation=world["acme"]["org"]).count() == 1


def test_the_dashboard_shows_an_alert_banner_until_it_is_dismissed(client, world):
    acme = world["acme"]
    login(client, acme)
    firing = acme["firing"]
    body = client.get(reverse("portal:dashboard"), headers=HTMX).content.decode()
    assert f'id="alert-banner-{firing.pk}"' in body
    assert "<strong>Calls usage passed 10</strong>" in body
    assert ": 30 unit, threshold 10 unit." in body
    response = client.post(reverse("portal:alert_acknowledge", args=[firing.pk]), headers=HTMX)
    assert response.status_code == 200
    assert f'id="alert-banner-{firing.pk}"' not in response.content.decode()
    body = client.get(reverse("portal:dashboard")).content.decode()
    assert f'id="alert-banner-{firing.pk}"' not in body


def test_rules_are_paused_resumed_and_deleted(client, world):
    acme = world["acme"]
    login(client, acme)
    rule = acme["rule"]
    client.post(reverse("portal:alert_rule_pause", args=[rule.pk]), headers=HTMX)
    rule.refresh_from_db()
    assert not rule.is_active
    client.post(reverse("portal:alert_rule_pause", args=[rule.pk]), headers=HTMX)
    rule.refresh_from_db()
    assert rule.is_active
    response = client.post(reverse("portal:alert_rule_delete", args=[rule.pk]), headers=HTMX)
    assert 'id="no-rules"' in response.content.decode()
    assert not AlertRule.objects.filter(pk=rule.pk).exists()
