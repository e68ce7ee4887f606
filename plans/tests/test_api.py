import json
from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.tests.factories import make_api_key, make_organisation
from plans.tests.factories import make_plan, make_subscription
from usage.services import events_ingest
from usage.tests.factories import make_meter


def post(client, secret, url, body):
    return client.post(
        url,
        data=json.dumps(body),
        content_type="application/json",
        headers={"Authorization": f"Bearer {secret}"},
    )


@pytest.mark.django_db
def test_quote_endpoint_returns_the_amount_and_breakdown(client):
    secret = make_api_key().secret
    spec = {
        "model": "graduated",
        "tiers": [
            {"up_to": "10", "unit_price": "1", "flat_fee": "5"},
            {"up_to": None, "unit_price": "0.5"},
        ],
    }
    response = post(client, secret, "/api/v1/quote", {"price": spec, "quantity": "12"})
    assert response.status_code == 200
    body = response.json()
    assert body["amount"] == "16"
    assert [s["amount"] for s in body["slices"]] == ["15", "1"]


@pytest.mark.django_db
def test_quote_endpoint_names_the_bad_field(client):
    secret = make_api_key().secret
    response = post(
        client,
        secret,
        "/api/v1/quote",
        {"price": {"model": "standard", "unit_price": 0.1}, "quantity": "1"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_price"
    assert response.json()["error"]["message"].startswith("unit_price")


@pytest.mark.django_db
def test_subscription_endpoint_shows_costs_for_the_keys_organisation(client):
    org = make_organisation()
    secret = make_api_key(org).secret
    meter = make_meter("count")
    plan = make_plan({meter: {"model": "standard", "unit_price": "0.5"}}, base_fee=Decimal("10"))
    make_subscription(org, plan, timezone.now() - timedelta(days=2))
    events_ingest(
        organisation=org,
        payloads=[{"event_name": meter.code, "idempotency_key": f"k{n}"} for n in range(4)],
    )
    other = make_organisation()
    make_subscription(other, plan, timezone.now() - timedelta(days=2))
    events_ingest(organisation=other, payloads=[{"event_name": meter.code, "idempotency_key": "x"}])

    response = client.get("/api/v1/subscription", headers={"Authorization": f"Bearer {secret}"})
    assert response.status_code == 200
    body = response.json()
    assert body["cost_so_far"] == "12"
    assert body["prices"][0]["usage"] == "4"
    assert body["prices"][0]["projection"] == "run rate"


@pytest.mark.django_db
def test_subscription_endpoint_without_subscription(client):
    response = client.get(
        "/api/v1/subscription", headers={"Authorization": f"Bearer {make_api_key().secret}"}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_subscription"
