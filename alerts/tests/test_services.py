import json
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.core import mail
from django.core.management import call_command
from django.db import connection

from accounts.tests.factories import make_organisation
from alerts.models import AlertDelivery, AlertFiring, AlertRule, AlertThreshold
from alerts.services import alert_rule_create, alerts_evaluate, deliveries_send
from alerts.webhooks import signature_verify
from plans.tests.factories import make_plan, make_subscription
from usage.services import events_ingest
from usage.tests.factories import make_meter

START = datetime(2026, 11, 1, tzinfo=UTC)  # the subscription's anchor: periods are months
MID = datetime(2026, 11, 16, tzinfo=UTC)  # half of November (30 days) has passed
FREE_TIER = {
    "model": "graduated",
    "tiers": [{"up_to": "1000", "unit_price": "0"}, {"up_to": None, "unit_price": "0.01"}],
}

_keys = iter(range(10**9))


def send(org, meter, count=1, *, at=MID, quantity=None, now=None):
    """Store `count` events through ingestion (the API's path), `now` being `at` + 1 minute."""
    payloads = []
    for _ in range(count):
        payload = {
            "event_name": meter.code,
            "idempotency_key": f"e{next(_keys)}",
            "timestamp": at.isoformat(),
        }
        if quantity is not None:
            payload["properties"] = {meter.property_name: quantity}
        payloads.append(payload)
    results = events_ingest(
        organisation=org, payloads=payloads, now=now or at + timedelta(minutes=1)
    )
    assert {r.status for r in results} == {"accepted"}, results


@pytest.fixture
def customer():
    org = make_organisation(billing_email="ops@customer.test")
    calls = make_meter("count")
    plan = make_plan({calls: FREE_TIER}, base_fee=Decimal("49"))
    make_subscription(org, plan, START)
    return org, calls


def usage_rule(org, meter, *thresholds, **channels):
    channels.setdefault("email_to", ["ops@customer.test"])
    return alert_rule_create(
        organisation=org,
        metric=AlertRule.Metric.USAGE,
        meter=meter,
        thresholds=[(kind, Decimal(value)) for kind, value in thresholds],
        **channels,
    )


def fired(rule):
    return [
        (f.threshold.kind, f.threshold.value, f.limit, f.observed)
        for f in AlertFiring.objects.filter(rule=rule).order_by("limit")
    ]


@pytest.mark.django_db
def test_a_threshold_fires_once_when_first_crossed_on_schedule(customer):
    org, calls = customer
    rule = usage_rule(org, calls, ("absolute", "10"))
    send(org, calls, 9)
    assert alerts_evaluate(as_of=MID + timedelta(minutes=2)).fired == []

    send(org, calls, 1)
    summary = alerts_evaluate(as_of=MID + timedelta(minutes=3))
    assert len(summary.fired) == 1
    send(org, calls, 5)
    assert alerts_evaluate(as_of=MID + timedelta(minutes=4)).fired == []

    [firing] = AlertFiring.objects.filter(rule=rule)
    assert (firing.observed, firing.limit, firing.unit) == (Decimal(10), Decimal(10), "unit")
    assert (firing.period_start, firing.period_end) == (START, datetime(2026, 12, 1, tzinfo=UTC))
    assert firing.fired_at == MID + timedelta(minutes=3)


@pytest.mark.django_db
def test_one_batch_crossing_several_percent_thresholds_fires_each_once_at_ingestion(
    customer, django_capture_on_commit_callbacks
):
    org, calls = customer
    rule = usage_rule(org, calls, ("percent", "50"), ("percent", "80"), ("percent", "100"))
    usage_rule(org, calls, ("percent", "150"))  # not crossed by 1,200 of 1,000 included
    send(org, calls, 400, at=MID - timedelta(hours=1), now=MID - timedelta(hours=1))
    with django_capture_on_commit_callbacks(execute=True):
        send(org, calls, 800, at=MID - timedelta(seconds=5), now=MID - timedelta(seconds=4))

    # 80% and 100% of the 1,000 free units, and 50%: each once, seen at ingestion (no schedule
    # ran), with the value when the batch landed.
    assert fired(rule) == [
        ("percent", Decimal(50), Decimal(500), Decimal(1200)),
        ("percent", Decimal(80), Decimal(800), Decimal(1200)),
        ("percent", Decimal(100), Decimal(1000), Decimal(1200)),
    ]
    assert AlertFiring.objects.count() == 3
    assert len(mail.outbox) == 3
    assert {m.to[0] for m in mail.outbox} == {"ops@customer.test"}

    alerts_evaluate(as_of=MID + timedelta(minutes=1))  # the schedule later: nothing new
    assert AlertFiring.objects.count() == 3


@pytest.mark.django_db
def test_rules_of_meters_ingestion_cannot_read_cheaply_wait_for_the_schedule(
    django_capture_on_commit_callbacks,
):
    org = make_organisation()
    peak = make_meter("max", property="gb")
    make_subscription(org, make_plan({peak: {"model": "standard", "unit_price": "1"}}), START)
    rule = usage_rule(org, peak, ("absolute", "100"))
    with django_capture_on_commit_callbacks(execute=True):
        send(org, peak, quantity=150)
    assert not AlertFiring.objects.exists()
    alerts_evaluate(as_of=MID + timedelta(minutes=2))
    assert fired(rule) == [("absolute", Decimal(100), Decimal(100), Decimal(150))]


@pytest.mark.django_db
def test_the_next_period_re_arms_every_threshold(customer):
    org, calls = customer
    rule = usage_rule(org, calls, ("absolute", "3"))
    send(org, calls, 3)
    alerts_evaluate(as_of=MID + timedelta(minutes=2))
    december = datetime(2026, 12, 5, tzinfo=UTC)
    send(org, calls, 2, at=december)
    alerts_evaluate(as_of=december + timedelta(minutes=2))
    assert AlertFiring.objects.filter(rule=rule).count() == 1  # December so far: 2 of 3
    send(org, calls, 1, at=december)
    alerts_evaluate(as_of=december + timedelta(minutes=3))
    assert list(
        AlertFiring.objects.filter(rule=rule)
        .order_by("period_start")
        .values_list("period_start", "observed")
    ) == [(START, Decimal(3)), (datetime(2026, 12, 1, tzinfo=UTC), Decimal(3))]


@pytest.mark.django_db
def test_usage_going_down_and_up_again_does_not_fire_twice_in_a_period():
    org = make_organisation()
    tokens = make_meter("sum", property="tokens")
    make_subscription(org, make_plan({tokens: {"model": "standard", "unit_price": "1"}}), START)
    rule = usage_rule(org, tokens, ("absolute", "100"))
    send(org, tokens, quantity=120)
    alerts_evaluate(as_of=MID + timedelta(minutes=2))
    send(org, tokens, quantity=-50)  # a correction: 70
    alerts_evaluate(as_of=MID + timedelta(minutes=3))
    send(org, tokens, quantity=60)  # 130 again
    alerts_evaluate(as_of=MID + timedelta(minutes=4))
    assert fired(rule) == [("absolute", Decimal(100), Decimal(100), Decimal(120))]


@pytest.mark.django_db
def test_a_rule_created_after_usage_passed_its_threshold_fires_at_the_next_evaluation(customer):
    org, calls = customer
    send(org, calls, 20)
    alerts_evaluate(as_of=MID + timedelta(minutes=2))
    rule = usage_rule(org, calls, ("absolute", "10"))
    alerts_evaluate(as_of=MID + timedelta(minutes=3))
    assert fired(rule) == [("absolute", Decimal(10), Decimal(10), Decimal(20))]


@pytest.mark.django_db
def test_cost_and_projected_cost_rules_price_usage_with_the_plan():
    org = make_organisation()
    calls = make_meter("count")
    plan = make_plan(
        {calls: {"model": "standard", "unit_price": "0.5", "minimum_amount": "30"}},
        base_fee=Decimal("10"),
    )
    make_subscription(org, plan, START)
    cost_rule = alert_rule_create(
        organisation=org,
        metric=AlertRule.Metric.COST,
        meter=calls,
        thresholds=[("absolute", Decimal("30")), ("percent", Decimal("50"))],
    )
    projected = alert_rule_create(
        organisation=org,
        metric=AlertRule.Metric.PROJECTED_COST,
        thresholds=[("absolute", Decimal("60")), ("absolute", Decimal("100"))],
    )
    invoice = alert_rule_create(
        organisation=org,
        metric=AlertRule.Metric.COST,
        thresholds=[("percent", Decimal("100"))],  # of the commitment: 10 base + 30 minimum
    )
    send(org, calls, 40, at=MID - timedelta(hours=1))
    alerts_evaluate(as_of=MID)
    # Halfway through the month: 40 calls have cost 20 (spend: the minimum's true-up is not
    # counted), 50% of the 30 minimum; the run rate of 80 calls costs 40, plus the base fee 10,
    # projects 50: below 60. The invoice so far, 10 + 20, is below its 40 commitment.
    assert fired(cost_rule) == [("percent", Decimal(50), Decimal(15), Decimal(20))]
    assert fired(projected) == []
    assert fired(invoice) == []

    send(org, calls, 20, at=MID - timedelta(minutes=30))  # 60 calls: 30 so far, 70 projected
    alerts_evaluate(as_of=MID)
    assert fired(projected) == [("absolute", Decimal(60), Decimal(60), Decimal(70))]
    assert [f[:3] for f in fired(cost_rule)] == [
        ("percent", Decimal(50), Decimal(15)),
        ("absolute", Decimal(30), Decimal(30)),
    ]
    assert fired(invoice) == [("percent", Decimal(100), Decimal(40), Decimal(40))]
    assert set(AlertFiring.objects.values_list("unit", flat=True)) == {"USD"}


@pytest.mark.django_db
def test_emails_arrive_through_a_real_smtp_server(customer, smtp_inbox, settings):
    settings.PORTAL_URL = "https://billing.example.com"
    org, calls = customer
    usage_rule(org, calls, ("percent", "80"), email_to=["ops@customer.test", "cto@customer.test"])
    send(org, calls, 850)
    alerts_evaluate(as_of=MID + timedelta(minutes=2), send=False)
    assert deliveries_send(now=MID + timedelta(minutes=2)) == 2

    assert sorted(e.rcpt_tos[0] for e in smtp_inbox.envelopes) == [
        "cto@customer.test",
        "ops@customer.test",
    ]
    message = smtp_inbox.messages[0]
    assert message["Subject"] == f"{org.name}: {calls.name} usage passed 80% (800 unit)"
    text = message.get_body(("plain",)).get_content()
    assert f"Hello {org.name}," in text
    assert "has reached 850 unit, passing the alert threshold of 80% (800 unit)" in text
    assert "Billing period: 1 Nov 2026 to 30 Nov 2026" in text
    assert "https://billing.example.com/portal/alerts/" in text
    html = message.get_body(("html",)).get_content()
    assert "850 unit" in html
    assert 'href="https://billing.example.com/portal/alerts/"' in html
    assert set(AlertDelivery.objects.values_list("status", "attempts")) == {("sent", 1)}


@pytest.mark.django_db
def test_a_crash_between_firing_and_sending_is_retried_without_firing_again(
    customer, settings, django_capture_on_commit_callbacks
):
    """The firing commits with its pending deliveries; the mail server is down when sending
    (as if the process died before it sent): the next run sends it, once, and fires nothing."""
    from core.tests.smtp import free_port, smtp_server, use_smtp

    org, calls = customer
    usage_rule(org, calls, ("absolute", "5"))
    send(org, calls, 6)
    port = free_port()
    use_smtp(settings, port)  # nothing listens there yet
    with django_capture_on_commit_callbacks(execute=True):
        alerts_evaluate(as_of=MID + timedelta(minutes=2))
    [delivery] = AlertDelivery.objects.all()
    assert (delivery.status, delivery.attempts) == ("pending", 1)
    assert "ConnectionRefusedError" in delivery.last_error
    assert delivery.next_attempt_at > MID + timedelta(minutes=2)

    with smtp_server(port) as inbox:
        assert deliveries_send(now=MID + timedelta(minutes=2, seconds=1)) == 0  # not due yet
        alerts_evaluate(as_of=MID + timedelta(minutes=3), send=False)
        assert deliveries_send(now=delivery.next_attempt_at) == 1
        assert deliveries_send(now=delivery.next_attempt_at + timedelta(hours=1)) == 0
    assert len(inbox.envelopes) == 1
    assert AlertFiring.objects.count() == 1
    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("sent", 2)
    assert [t.ok for t in delivery.tries.all()] == [False, True]


class _FlakyReceiver(BaseHTTPRequestHandler):
    """Answers 500 to the first two posts, 200 after; keeps what it received."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((dict(self.headers), body))
        self.send_response(500 if len(self.received) <= 2 else 200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.django_db
def test_a_webhook_that_fails_twice_then_succeeds_is_signed_and_every_attempt_recorded(
    customer, django_capture_on_commit_callbacks
):
    org, calls = customer
    _FlakyReceiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/hooks/meterline"
        rule = usage_rule(org, calls, ("absolute", "2"), email_to=[], webhook_url=url)
        send(org, calls, 2)
        with django_capture_on_commit_callbacks(execute=True):
            alerts_evaluate(as_of=MID + timedelta(minutes=2))  # sends the first attempt
        [delivery] = AlertDelivery.objects.all()
        for _ in range(2):
            delivery.refresh_from_db()
            assert delivery.status == "pending"
            now = delivery.next_attempt_at
            deliveries_send(now=now)
    finally:
        server.shutdown()

    delivery.refresh_from_db()
    assert (delivery.status, delivery.attempts) == ("sent", 3)
    assert [(t.ok, t.status_code) for t in delivery.tries.all()] == [
        (False, 500),
        (False, 500),
        (True, 200),
    ]
    assert len(_FlakyReceiver.received) == 3
    headers, body = _FlakyReceiver.received[-1]
    # As a receiver checks it: HMAC-SHA256 of "t.body" with the rule's secret.
    assert signature_verify(rule.webhook_secret, headers["Meterline-Signature"], body)
    assert not signature_verify("whsec_wrong", headers["Meterline-Signature"], body)
    assert not signature_verify(rule.webhook_secret, headers["Meterline-Signature"], body + b" ")
    payload = json.loads(body)
    assert payload["type"] == "alert.threshold_crossed"
    assert payload["rule"]["meter"] == calls.code
    assert (payload["observed"], payload["limit"], payload["unit"]) == ("2", "2", "unit")
    assert payload["organisation"]["slug"] == org.slug
    assert [h["Meterline-Attempt"] for h, _ in _FlakyReceiver.received] == ["1", "2", "3"]


def test_signature_verification_refuses_old_timestamps_and_garbage():
    from alerts.webhooks import signature_header

    header = signature_header("s3cret", b"{}", timestamp=1_800_000_000)
    assert signature_verify("s3cret", header, b"{}", now=1_800_000_100)
    assert not signature_verify("s3cret", header, b"{}", now=1_800_000_000 + 301)
    assert not signature_verify("s3cret", "v1=abc", b"{}", now=1_800_000_000)
    assert not signature_verify("s3cret", "t=x,v1=abc", b"{}", now=1_800_000_000)


@pytest.mark.django_db
def test_a_plan_s_default_rules_are_copied_to_each_new_subscriber(
    django_capture_on_commit_callbacks,
):
    calls = make_meter("count")
    plan = make_plan({calls: FREE_TIER})
    alert_rule_create(
        plan=plan,
        metric=AlertRule.Metric.USAGE,
        meter=calls,
        name="Free tier",
        thresholds=[("percent", Decimal(80)), ("percent", Decimal(100))],
    )
    org = make_organisation(billing_email="billing@new.test")
    with django_capture_on_commit_callbacks(execute=True):
        make_subscription(org, plan, START)
    [copy] = AlertRule.objects.filter(organisation=org)
    assert (copy.name, copy.meter, copy.email_to, copy.show_banner) == (
        "Free tier",
        calls,
        ["billing@new.test"],
        True,
    )
    assert sorted(t.value for t in copy.thresholds.all()) == [Decimal(80), Decimal(100)]
    assert copy.webhook_secret != AlertRule.objects.get(plan=plan).webhook_secret


@pytest.mark.django_db
def test_check_alerts_command_evaluates_as_of_the_given_instant(customer, capsys):
    org, calls = customer
    rule = usage_rule(org, calls, ("absolute", "1"))
    send(org, calls, 1)
    call_command("check_alerts", "--as-of", (MID - timedelta(hours=1)).isoformat())
    assert not AlertFiring.objects.exists()  # the event was not there yet
    call_command("check_alerts", "--as-of", (MID + timedelta(minutes=2)).isoformat())
    assert fired(rule) == [("absolute", Decimal(1), Decimal(1), Decimal(1))]
    out = capsys.readouterr().out
    assert "1 threshold(s) fired" in out
    assert "1 notification(s) sent" in out
    assert len(mail.outbox) == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_evaluators_at_once_fire_and_notify_once(at_once):
    org = make_organisation()
    calls = make_meter("count")
    make_subscription(org, make_plan({calls: FREE_TIER}), START)
    rule = usage_rule(org, calls, ("absolute", "1"), ("absolute", "2"))
    send(org, calls, 3)
    errors = at_once(
        lambda: alerts_evaluate(as_of=MID + timedelta(minutes=2), send=False), threads=4
    )
    assert errors == []
    assert AlertFiring.objects.filter(rule=rule).count() == 2
    assert AlertDelivery.objects.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_crossing_is_noticed_right_after_the_api_stores_the_batch(client):
    """Through the HTTP API, with real commits: the check runs after the events commit (the
    test settings run django-q2 tasks inline), with no schedule."""
    from django.utils import timezone

    from accounts.tests.factories import make_api_key

    issued = make_api_key()
    org = issued.api_key.organisation
    calls = make_meter("count")
    now = timezone.now()
    make_subscription(org, make_plan({calls: FREE_TIER}), now - timedelta(days=3))
    rule = usage_rule(org, calls, ("absolute", "3"))
    batch = [{"event_name": calls.code, "idempotency_key": f"api-{n}"} for n in range(3)]
    response = client.post(
        "/api/v1/events",
        {"events": batch},
        content_type="application/json",
        headers={"Authorization": f"Bearer {issued.secret}"},
    )
    assert response.status_code == 200
    [firing] = AlertFiring.objects.filter(rule=rule)
    assert firing.observed == 3
    assert len(mail.outbox) == 1


@pytest.mark.django_db
def test_evaluation_reads_a_batch_of_organisations_in_the_same_few_queries():
    """Queries per batch do not grow with the number of organisations or rules."""
    from django.test.utils import CaptureQueriesContext

    calls = make_meter("count")
    tokens = make_meter("sum", property="tokens")
    plan = make_plan(
        {calls: FREE_TIER, tokens: {"model": "standard", "unit_price": "0.001"}},
        base_fee=Decimal(5),
    )

    def organisations(count):
        ids = []
        for _ in range(count):
            org = make_organisation()
            make_subscription(org, plan, START)
            usage_rule(org, calls, ("percent", "80"))
            alert_rule_create(
                organisation=org,
                metric=AlertRule.Metric.PROJECTED_COST,
                thresholds=[(AlertThreshold.Kind.ABSOLUTE, Decimal(1000))],
            )
            send(org, calls, 2)
            send(org, tokens, quantity=100)
            ids.append(org.pk)
        return ids

    counts = []
    for size in (3, 12):
        ids = organisations(size)
        with CaptureQueriesContext(connection) as queries:
            summary = alerts_evaluate(as_of=MID + timedelta(minutes=2), organisation_ids=ids)
        assert summary.rules == 2 * size and summary.fired == []
        counts.append(len(queries))
    assert counts[0] == counts[1] <= 20, counts


@pytest.mark.django_db
def test_a_firing_whose_sender_died_is_sent_by_the_every_minute_schedule(customer):
    from alerts.tasks import check_alerts

    org, calls = customer
    usage_rule(org, calls, ("absolute", "5"))
    send(org, calls, 6)
    # Fired and committed, but the process died before its after-commit send ran.
    alerts_evaluate(as_of=MID + timedelta(minutes=2), send=False)
    assert AlertDelivery.objects.get().status == "pending"
    assert "0 threshold(s) fired; 1 notification(s) sent" in check_alerts(
        (MID + timedelta(minutes=3)).isoformat()
    )
    assert "0 notification(s) sent" in check_alerts((MID + timedelta(minutes=4)).isoformat())
    assert len(mail.outbox) == 1
    assert AlertFiring.objects.count() == 1
