from datetime import UTC, datetime
from decimal import Decimal

import pytest

from accounts.tests.factories import make_organisation
from usage.models import Meter, UsageEvent
from usage.tests.factories import make_meter


@pytest.mark.django_db
def test_staff_create_a_meter_from_its_spec(admin_client):
    response = admin_client.post(
        "/admin/usage/meter/add/",
        {
            "code": "eu_tokens",
            "name": "EU tokens",
            "unit": "token",
            "description": "",
            "spec": '{"aggregation": "sum", "property": "tokens", "filters": {"region": ["eu"]}}',
        },
    )
    assert response.status_code == 302, response.content
    meter = Meter.objects.get(code="eu_tokens")
    assert meter.spec.to_json() == {
        "aggregation": "sum",
        "property": "tokens",
        "filters": {"region": ["eu"]},
    }


@pytest.mark.django_db
def test_a_bad_spec_is_shown_as_a_form_error(admin_client):
    response = admin_client.post(
        "/admin/usage/meter/add/",
        {"code": "x", "name": "X", "unit": "u", "spec": '{"aggregation": "sum"}'},
    )
    assert response.status_code == 200
    assert b"needs a property" in response.content
    assert not Meter.objects.exists()


@pytest.mark.django_db
def test_a_meter_with_events_keeps_its_spec(admin_client):
    meter = make_meter("sum", code="tokens", property="tokens")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    UsageEvent.objects.create(
        organisation=make_organisation(),
        meter=meter,
        quantity=Decimal(1),
        timestamp=at,
        received_at=at,
        idempotency_key="a",
    )
    admin_client.post(
        f"/admin/usage/meter/{meter.pk}/change/",
        {
            "name": "Tokens",
            "unit": "token",
            "description": "",
            "spec": '{"aggregation": "max", "property": "x"}',
        },
    )
    meter.refresh_from_db()
    assert (meter.aggregation, meter.property_name, meter.name) == ("sum", "tokens", "Tokens")


@pytest.mark.django_db
def test_events_are_read_only_in_the_admin(admin_client):
    meter = make_meter("count")
    at = datetime(2026, 1, 1, tzinfo=UTC)
    event = UsageEvent.objects.create(
        organisation=make_organisation(),
        meter=meter,
        quantity=Decimal(1),
        timestamp=at,
        received_at=at,
        idempotency_key="find-me",
    )
    listing = admin_client.get("/admin/usage/usageevent/?q=find-me")
    assert listing.status_code == 200
    assert b"find-me" in listing.content
    assert admin_client.get("/admin/usage/usageevent/add/").status_code == 403
    assert (
        admin_client.post(
            f"/admin/usage/usageevent/{event.pk}/delete/", {"post": "yes"}
        ).status_code
        == 403
    )
    assert UsageEvent.objects.filter(pk=event.pk).exists()
