"""Customers and meters reach Stripe once, with ids stored, through the real SDK and the fake."""

import pytest
from django.core.exceptions import ValidationError

from accounts.tests.factories import make_organisation
from stripe_sync.models import StripeCustomer, StripeMeter
from stripe_sync.services import (
    customer_ensure,
    customer_link,
    meter_configure,
    meter_provision,
)
from usage.tests.factories import make_meter


@pytest.mark.django_db
def test_a_customer_is_created_on_first_need_and_reused(stripe_on):
    org = make_organisation(name="Acme", billing_email="ap@acme.test")

    link = customer_ensure(organisation=org)
    again = customer_ensure(organisation=org)

    assert again.stripe_id == link.stripe_id
    created = stripe_on.calls("POST", "/v1/customers")
    assert len(created) == 1
    assert created[0].params == {
        "name": "Acme",
        "email": "ap@acme.test",
        "metadata": {"meterline_organisation_id": str(org.pk)},
    }
    assert created[0].headers["idempotency-key"] == f"meterline-customer:{org.pk}"
    assert stripe_on.customers[link.stripe_id]["email"] == "ap@acme.test"


@pytest.mark.django_db
def test_an_existing_stripe_customer_can_be_linked(stripe_on):
    org = make_organisation()
    stripe_on.customers["cus_existing"] = {"id": "cus_existing", "email": "x@y.test", "name": "X"}

    link = customer_link(organisation=org, stripe_id="cus_existing")

    assert (link.stripe_id, link.email) == ("cus_existing", "x@y.test")
    assert not stripe_on.calls("POST", "/v1/customers")


@pytest.mark.django_db
def test_linking_an_unknown_customer_fails_and_links_nothing(stripe_on):
    import stripe

    org = make_organisation()
    with pytest.raises(stripe.InvalidRequestError):
        customer_link(organisation=org, stripe_id="cus_nope")
    assert not StripeCustomer.objects.exists()


@pytest.mark.django_db
def test_a_meter_is_provisioned_once_with_sum_and_customer_mapping(stripe_on):
    meter = make_meter("count", code="api_calls")
    link = meter_configure(meter=meter, mode="stream")

    meter_provision(stripe_meter=link)
    meter_provision(stripe_meter=StripeMeter.objects.get(pk=link.pk))

    (request,) = stripe_on.calls("POST", "/v1/billing/meters")
    assert request.params == {
        "display_name": meter.name,
        "event_name": "meterline_api_calls",
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
        "value_settings": {"event_payload_key": "value"},
    }
    link.refresh_from_db()
    assert link.stripe_id in stripe_on.meters
    assert link.provisioned_at is not None


@pytest.mark.django_db
def test_only_count_and_sum_meters_can_stream():
    peak = make_meter("max", code="peak_seats", property="seats")
    with pytest.raises(ValidationError, match="only count and sum"):
        meter_configure(meter=peak, mode="stream")
    assert meter_configure(meter=peak, mode="period_summary").mode == "period_summary"
    eu_calls = make_meter("count", code="eu_calls", filters={"region": ["eu"]})
    with pytest.raises(ValidationError, match="without filters"):
        meter_configure(meter=eu_calls, mode="stream")


@pytest.mark.django_db
def test_stripe_meter_command_configures_and_provisions(stripe_on):
    from io import StringIO

    from django.core.management import CommandError, call_command

    make_meter("count", code="api_calls")
    out = StringIO()
    call_command("stripe_meter", "api_calls", "--mode", "stream", stdout=out)
    link = StripeMeter.objects.get(meter__code="api_calls")
    assert link.stripe_id in stripe_on.meters
    assert out.getvalue().strip() == str(link)

    make_meter("max", code="peak", property="seats")
    with pytest.raises(CommandError, match="only count and sum"):
        call_command("stripe_meter", "peak", "--mode", "stream")
