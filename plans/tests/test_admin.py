from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.tests.factories import make_organisation
from plans.models import Price, PriceVersion
from plans.selectors import subscription_period
from plans.tests.factories import make_plan, make_subscription
from usage.models import UsageEvent
from usage.tests.factories import make_meter


@pytest.mark.django_db
def test_check_spec_names_the_wrong_field(admin_client):
    url = "/admin/plans/price/check-spec/"
    bad = admin_client.post(
        url,
        {
            "spec": '{"model": "graduated", "tiers": [{"up_to": "5", "unit_price": "1"}, {"up_to": "3", "unit_price": "1"}]}'
        },
    )
    assert bad.json() == {"ok": False, "error": bad.json()["error"]}
    assert bad.json()["error"].startswith("tiers[1].up_to")
    assert admin_client.post(url, {"spec": "{not json"}).json()["ok"] is False
    assert admin_client.post(
        url, {"spec": '{"model": "standard", "unit_price": "0.002"}'}
    ).json() == {"ok": True}


@pytest.mark.django_db
def test_staff_add_a_version_through_the_price_page(admin_client):
    meter = make_meter("count")
    plan = make_plan({meter: {"model": "standard", "unit_price": "1"}})
    price = Price.objects.get(plan=plan)
    effective = (timezone.now() + timedelta(days=3)).replace(microsecond=0)
    response = admin_client.post(
        f"/admin/plans/price/{price.pk}/change/",
        {
            "plan": plan.pk,
            "meter": meter.pk,
            "description": "API calls",
            "versions-TOTAL_FORMS": "2",
            "versions-INITIAL_FORMS": "1",
            "versions-MIN_NUM_FORMS": "0",
            "versions-MAX_NUM_FORMS": "1000",
            "versions-0-id": price.versions.get().pk,
            "versions-0-price": price.pk,
            "versions-1-price": price.pk,
            "versions-1-spec": '{"model": "standard", "unit_price": "2"}',
            "versions-1-effective_from_0": effective.strftime("%Y-%m-%d"),
            "versions-1-effective_from_1": effective.strftime("%H:%M:%S"),
            "versions-1-note": "price rise",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    newest = PriceVersion.objects.filter(price=price).order_by("-effective_from").first()
    assert newest.spec == {"model": "standard", "unit_price": "2"}
    assert newest.note == "price rise"
    assert PriceVersion.objects.filter(price=price).count() == 2


@pytest.mark.django_db
def test_subscription_preview_compares_the_current_and_a_candidate_price(admin_client):
    org = make_organisation()
    meter = make_meter("count")
    plan = make_plan({meter: {"model": "standard", "unit_price": "1"}}, base_fee=Decimal("10"))
    now = timezone.now()
    subscription = make_subscription(org, plan, now - timedelta(days=45))
    current = subscription_period(subscription=subscription, at=now)
    for n in range(3):
        UsageEvent.objects.create(
            organisation=org,
            meter=meter,
            quantity=1,
            properties={},
            timestamp=current.start + timedelta(seconds=n),
            received_at=now,
            idempotency_key=f"c{n}",
        )
    UsageEvent.objects.create(
        organisation=org,
        meter=meter,
        quantity=1,
        properties={},
        timestamp=current.start - timedelta(seconds=1),
        received_at=now,
        idempotency_key="previous",
    )
    response = admin_client.get(
        f"/admin/plans/subscription/{subscription.pk}/preview/",
        {"meter": meter.pk, "spec": '{"model": "standard", "unit_price": "5"}'},
    )
    assert response.status_code == 200
    last_closed, so_far = response.context["rows"]
    assert (last_closed["current"].total, last_closed["candidate"].total) == (
        Decimal(11),
        Decimal(15),
    )
    assert (so_far["current"].total, so_far["candidate"].total) == (Decimal(13), Decimal(25))
    assert so_far["lines"][0]["difference"] == Decimal(12)
    assert b"candidate-total" in response.content


@pytest.mark.django_db
def test_subscription_preview_shows_a_bad_candidate_as_a_form_error(admin_client):
    subscription = make_subscription(
        make_organisation(), make_plan(), timezone.now() - timedelta(days=1)
    )
    response = admin_client.get(
        f"/admin/plans/subscription/{subscription.pk}/preview/",
        {
            "meter": make_meter("count").pk,
            "spec": '{"model": "package", "package_size": "0", "package_price": "1"}',
        },
    )
    assert response.status_code == 200
    assert "package_size" in str(response.context["form"].errors)


@pytest.mark.django_db
def test_staff_subscribe_an_organisation_in_the_admin(admin_client):
    org = make_organisation(timezone_name="Asia/Tokyo", currency="JPY")
    yen, dollars = make_plan(currency="JPY"), make_plan(currency="USD")
    form = {
        "organisation": org.pk,
        "start_0": "2026-01-31",
        "start_1": "00:00:00",
        "status": "active",
        "overrides-TOTAL_FORMS": "0",
        "overrides-INITIAL_FORMS": "0",
        "overrides-MIN_NUM_FORMS": "0",
        "overrides-MAX_NUM_FORMS": "1000",
    }
    refused = admin_client.post("/admin/plans/subscription/add/", {**form, "plan": dollars.pk})
    assert refused.status_code == 200
    assert b"bills in USD" in refused.content
    response = admin_client.post("/admin/plans/subscription/add/", {**form, "plan": yen.pk})
    assert response.status_code == 302, response.content.decode()[-3000:]
    subscription = org.subscriptions.get()
    assert (subscription.timezone, subscription.anchor) == ("Asia/Tokyo", subscription.start)
