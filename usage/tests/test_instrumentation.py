from decimal import Decimal

import pytest
from django.http import HttpResponse
from django.test import RequestFactory

import usage
from accounts.tests.factories import make_organisation
from usage.instrumentation import UsageMeteringMiddleware, metered
from usage.models import UsageEvent
from usage.services import EventRejected
from usage.tests.factories import make_meter


@pytest.mark.django_db
def test_record_by_slug_is_idempotent():
    org = make_organisation()
    meter = make_meter("sum", property="quantity")
    first = usage.record(org.slug, meter.code, idempotency_key="job-1", quantity=Decimal("2.5"))
    again = usage.record(org, meter.code, idempotency_key="job-1", quantity=Decimal("2.5"))
    assert (first.status, again.status) == ("accepted", "duplicate")
    assert UsageEvent.objects.get().quantity == Decimal("2.5")


@pytest.mark.django_db
def test_record_validates_like_the_api():
    org = make_organisation()
    meter = make_meter("max", property="quantity")
    with pytest.raises(EventRejected) as rejected:
        usage.record(org, meter.code, idempotency_key="x", quantity=-1)
    assert rejected.value.code == "invalid_quantity"
    assert not UsageEvent.objects.exists()


class Reply:
    def __init__(self, tokens):
        self.tokens = tokens


@pytest.mark.django_db
def test_metered_decorator_takes_the_quantity_from_the_result():
    org = make_organisation()
    meter = make_meter("sum", property="quantity")

    @metered(meter.code, organisation=lambda org, prompt: org, quantity=lambda reply: reply.tokens)
    def complete(org, prompt):
        return Reply(len(prompt) * 10)

    assert complete(org, "hello").tokens == 50
    assert complete(org, "hi").tokens == 20
    assert sorted(e.quantity for e in UsageEvent.objects.all()) == [20, 50]


@pytest.mark.django_db
def test_metered_decorator_records_nothing_when_the_call_fails():
    org = make_organisation()
    meter = make_meter("count")

    @metered(meter.code, organisation=lambda: org)
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        broken()
    assert not UsageEvent.objects.exists()


@pytest.mark.django_db
def test_metered_decorator_uses_the_given_idempotency_key():
    org = make_organisation()
    meter = make_meter("count")

    @metered(
        meter.code, organisation=lambda job_id: org, idempotency_key=lambda job_id: f"job:{job_id}"
    )
    def run(job_id):
        return job_id

    run(1), run(1), run(2)
    assert sorted(UsageEvent.objects.values_list("idempotency_key", flat=True)) == [
        "job:1",
        "job:2",
    ]


@pytest.mark.django_db
def test_metered_decorator_logs_a_rejection_and_returns_the_result(caplog):
    org = make_organisation()
    meter = make_meter("sum", property="quantity")

    @metered(meter.code, organisation=lambda: org, quantity=lambda result: "not a number")
    def work():
        return "done"

    assert work() == "done"
    assert "invalid_quantity" in caplog.text
    assert not UsageEvent.objects.exists()


@pytest.mark.django_db
def test_middleware_meters_matched_routes_once_per_request_id(settings):
    org = make_organisation()
    meter = make_meter("count")
    settings.METERLINE_METERED_ROUTES = [
        {"path": r"^/product/api/", "event_name": meter.code, "methods": ["GET"]}
    ]
    factory = RequestFactory()

    def call(path, method="get", status=200, request_id=None, organisation=org):
        request = getattr(factory, method)(
            path, headers={"X-Request-ID": request_id} if request_id else {}
        )
        request.organisation = organisation
        return UsageMeteringMiddleware(lambda r: HttpResponse(status=status))(request)

    call("/product/api/items", request_id="req-1")
    call("/product/api/items", request_id="req-1")  # a retry: same request id
    call("/product/api/items")
    call("/product/api/items", method="post")  # method not metered
    call("/product/other")  # route not metered
    call("/product/api/items", status=503)  # server error: not billed
    call("/product/api/items", organisation=None)  # nobody to bill
    events = UsageEvent.objects.order_by("id")
    assert events.count() == 2
    assert events[0].idempotency_key == "request:req-1"
    assert events[0].properties == {"method": "GET", "path": "/product/api/items", "status": 200}


def resolve_first_organisation(request):
    from accounts.models import Organisation

    return Organisation.objects.order_by("id").first()


@pytest.mark.django_db
def test_middleware_uses_the_configured_organisation_resolver(settings):
    org = make_organisation()
    meter = make_meter("count")
    settings.METERLINE_METERED_ROUTES = [{"path": r"^/api/", "event_name": meter.code}]
    settings.METERLINE_ORGANISATION_RESOLVER = f"{__name__}.resolve_first_organisation"
    UsageMeteringMiddleware(lambda r: HttpResponse())(RequestFactory().post("/api/x"))
    assert UsageEvent.objects.get().organisation == org
