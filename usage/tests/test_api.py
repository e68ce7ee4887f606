"""The usage HTTP API: every rejection code, batches, idempotency, tenancy, usage reads, OpenAPI."""

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from accounts.services import api_key_revoke
from accounts.tests.factories import make_api_key, make_organisation
from usage.api import _has_digit_run
from usage.models import UsageEvent
from usage.tests.factories import make_meter

EVENTS_URL = "/api/v1/events"
USAGE_URL = "/api/v1/usage"
# The API reads the clock through django.utils.timezone.now; `frozen_now` pins it here.
NOW = datetime(2026, 3, 31, 12, tzinfo=UTC)


def auth(secret):
    return {"Authorization": f"Bearer {secret}"}


def send(client, secret, document):
    return send_text(client, secret, json.dumps(document))


def send_text(client, secret, text):
    return client.post(EVENTS_URL, data=text, content_type="application/json", headers=auth(secret))


def read_usage(client, secret, **params):
    return client.get(USAGE_URL, params, headers=auth(secret))


def event(name="api_calls", key="k1", **fields):
    return {"event_name": name, "idempotency_key": key, **fields}


def without(field):
    payload = event(name="tokens", quantity="1")
    del payload[field]
    return payload


def error_code(response):
    return response.json()["error"]["code"]


def stored_quantities(organisation=None):
    events = UsageEvent.objects.order_by("idempotency_key")
    if organisation is not None:
        events = events.filter(organisation=organisation)
    return dict(events.values_list("idempotency_key", "quantity"))


@pytest.fixture
def frozen_now(monkeypatch):
    monkeypatch.setattr(timezone, "now", lambda: NOW)
    return NOW


@pytest.fixture
def org(db):
    return make_organisation()


@pytest.fixture
def secret(org):
    return make_api_key(org).secret


@pytest.fixture
def meters(db):
    """One meter per aggregation; the numeric ones read the `quantity` property."""
    return {
        "api_calls": make_meter("count", code="api_calls"),
        "tokens": make_meter("sum", code="tokens", property="quantity"),
        "peak_seats": make_meter("max", code="peak_seats", property="quantity"),
        "seats": make_meter("latest", code="seats", property="quantity"),
        "storage_gb": make_meter("weighted_sum", code="storage_gb", property="quantity"),
        "active_users": make_meter("unique_count", code="active_users", property="user"),
    }


# --- Requests refused as a whole ------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("", id="empty-body"),
        pytest.param('{"event_name": "api_calls", "idempotency_key": "k1"', id="truncated"),
        pytest.param("{'event_name': 'api_calls'}", id="single-quotes"),
        pytest.param("NaN", id="nan-document"),
        pytest.param(
            '{"event_name": "tokens", "idempotency_key": "k1", "quantity": NaN}', id="nan"
        ),
        pytest.param('{"events": [{"quantity": Infinity}]}', id="infinity-literal"),
        pytest.param(
            '{"event_name": "api_calls", "idempotency_key": "k1"} trailing', id="trailing"
        ),
    ],
)
@pytest.mark.usefixtures("meters")
def test_a_body_that_is_not_json_is_refused_as_invalid_json(client, secret, body):
    response = send_text(client, secret, body)

    assert response.status_code == 400
    assert response.json() == {
        "error": {"code": "invalid_json", "message": "The body is not valid JSON."}
    }
    assert not UsageEvent.objects.exists()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param({"events": {"event_name": "api_calls"}}, 400, "invalid_request", id="object"),
        pytest.param({"events": "k1"}, 400, "invalid_request", id="string"),
        pytest.param({"events": None}, 400, "invalid_request", id="null"),
        pytest.param({"events": []}, 400, "empty_batch", id="empty"),
    ],
)
@pytest.mark.usefixtures("meters")
def test_a_malformed_batch_is_refused_whole(client, secret, body, status, code):
    response = send(client, secret, body)

    assert (response.status_code, error_code(response)) == (status, code)
    assert "results" not in response.json()


@pytest.mark.usefixtures("meters")
def test_a_batch_over_the_limit_stores_nothing(client, secret, settings):
    batch = [event(key=f"k{n}") for n in range(settings.INGEST_MAX_BATCH + 1)]

    response = send(client, secret, {"events": batch})

    assert response.status_code == 413
    assert error_code(response) == "batch_too_large"
    assert "1001" in response.json()["error"]["message"]
    assert not UsageEvent.objects.exists()


@pytest.mark.usefixtures("meters")
def test_a_batch_at_the_limit_is_stored_whole(client, secret, settings):
    batch = [event(key=f"k{n:04}") for n in range(settings.INGEST_MAX_BATCH)]

    response = send(client, secret, {"events": batch})

    assert response.status_code == 200
    assert response.json()["accepted"] == settings.INGEST_MAX_BATCH
    assert UsageEvent.objects.count() == settings.INGEST_MAX_BATCH


@pytest.mark.parametrize(
    ("ingest_limit", "django_limit"),
    [
        pytest.param(300, 300, id="declared-length-over-ingest-limit"),
        pytest.param(10_000, 300, id="django-upload-limit"),
    ],
)
@pytest.mark.usefixtures("meters")
def test_a_body_over_the_size_limit_is_refused(
    client, secret, settings, ingest_limit, django_limit
):
    settings.INGEST_MAX_BODY_BYTES = ingest_limit
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = django_limit
    body = json.dumps({"events": [event(key=f"k{n}") for n in range(10)]})
    assert len(body) > 300

    response = send_text(client, secret, body)

    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"
    assert not UsageEvent.objects.exists()


@pytest.mark.usefixtures("meters")
def test_a_body_of_exactly_the_size_limit_is_accepted(client, secret, settings):
    settings.INGEST_MAX_BODY_BYTES = settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 300
    padding = 300 - len(json.dumps(event(key="")))
    body = json.dumps(event(key="k" * padding))
    assert len(body.encode()) == 300

    response = send_text(client, secret, body)

    assert response.status_code == 200
    assert UsageEvent.objects.count() == 1


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(None, id="no-header"),
        pytest.param("Basic {secret}", id="wrong-scheme"),
        pytest.param("{secret}", id="no-scheme"),
        pytest.param("Bearer", id="no-token"),
        pytest.param("Bearer ml_00000000_not-a-key", id="wrong-key"),
        pytest.param("Bearer {secret}x", id="key-with-extra-character"),
    ],
)
@pytest.mark.usefixtures("meters")
def test_a_request_without_a_valid_key_is_unauthenticated(client, secret, header):
    headers = {} if header is None else {"Authorization": header.format(secret=secret)}

    response = client.post(
        EVENTS_URL, data=json.dumps(event()), content_type="application/json", headers=headers
    )

    assert response.status_code == 401
    assert error_code(response) == "unauthenticated"
    assert response["WWW-Authenticate"] == "Bearer"
    assert not UsageEvent.objects.exists()


@pytest.mark.usefixtures("meters")
def test_a_revoked_key_is_unauthenticated_everywhere(client, org):
    issued = make_api_key(org)
    api_key_revoke(api_key=issued.api_key)

    posted = send(client, issued.secret, event())
    listed = client.get("/api/v1/meters", headers=auth(issued.secret))
    read = read_usage(
        client, issued.secret, meter="api_calls", start="2026-03-01T00:00Z", end="2026-04-01T00:00Z"
    )

    assert [r.status_code for r in (posted, listed, read)] == [401, 401, 401]
    assert not UsageEvent.objects.exists()


# --- One event rejected, with its code ---------------------------------------------------------

REJECTIONS = [
    pytest.param(["api_calls", "k1"], "invalid_event", id="event-is-a-list"),
    pytest.param("api_calls", "invalid_event", id="event-is-a-string"),
    pytest.param(event(colour="red"), "unknown_field", id="unknown-field"),
    pytest.param(event(eventName="api_calls"), "unknown_field", id="misspelt-field"),
    pytest.param(without("idempotency_key"), "missing_idempotency_key", id="key-missing"),
    pytest.param(event(key=""), "missing_idempotency_key", id="key-empty"),
    pytest.param(event(key=None), "missing_idempotency_key", id="key-null"),
    pytest.param(event(key="k" * 256), "invalid_idempotency_key", id="key-256-chars"),
    pytest.param(event(key=42), "invalid_idempotency_key", id="key-a-number"),
    pytest.param(without("event_name"), "missing_event_name", id="name-missing"),
    pytest.param(event(name=""), "missing_event_name", id="name-empty"),
    pytest.param(event(name=7), "missing_event_name", id="name-a-number"),
    pytest.param(event(name="no_such_meter"), "unknown_meter", id="unknown-meter"),
    pytest.param(event(timestamp="yesterday"), "invalid_timestamp", id="ts-garbage"),
    pytest.param(event(timestamp="2026-03-31T11:00:00"), "invalid_timestamp", id="ts-naive"),
    pytest.param(event(timestamp="2026-03-31"), "invalid_timestamp", id="ts-date-only"),
    pytest.param(event(timestamp=1774954800), "invalid_timestamp", id="ts-a-number"),
    pytest.param(
        event(timestamp=(NOW - timedelta(days=36)).isoformat()),
        "timestamp_out_of_window",
        id="ts-36-days-old",
    ),
    pytest.param(
        event(timestamp=(NOW + timedelta(minutes=10)).isoformat()),
        "timestamp_out_of_window",
        id="ts-10-minutes-ahead",
    ),
    pytest.param(event(properties=["tier", "gold"]), "invalid_properties", id="props-a-list"),
    pytest.param(event(properties="tier=gold"), "invalid_properties", id="props-a-string"),
    pytest.param(
        event(name="tokens", quantity="1", properties={"quantity": "1"}),
        "invalid_properties",
        id="quantity-given-twice",
    ),
    pytest.param(
        event(properties={"blob": "x" * 16 * 1024}), "invalid_properties", id="props-over-16kib"
    ),
    pytest.param(event(name="tokens", quantity="ten"), "invalid_quantity", id="qty-not-a-number"),
    pytest.param(event(name="tokens", quantity=True), "invalid_quantity", id="qty-a-bool"),
    pytest.param(event(name="tokens", quantity=[1]), "invalid_quantity", id="qty-a-list"),
    pytest.param(event(name="tokens", quantity="Infinity"), "invalid_quantity", id="qty-inf"),
    pytest.param(event(name="tokens", quantity="NaN"), "invalid_quantity", id="qty-nan-string"),
    pytest.param(event(name="tokens", quantity="0.0000001"), "invalid_quantity", id="qty-7-places"),
    pytest.param(event(name="tokens", quantity=1e-7), "invalid_quantity", id="qty-7-places-num"),
    pytest.param(
        event(name="tokens", quantity="1000000000000000"), "invalid_quantity", id="qty-1e15"
    ),
    pytest.param(event(name="tokens", quantity=-1e15), "invalid_quantity", id="qty-minus-1e15"),
    pytest.param(
        event(name="tokens", quantity="1234567890123.456"),
        "invalid_quantity",
        id="qty-16-significant-digits",
    ),
    pytest.param(event(name="tokens"), "invalid_quantity", id="qty-missing-for-sum"),
    pytest.param(event(name="tokens", quantity=None), "invalid_quantity", id="qty-null"),
    pytest.param(
        event(name="tokens", properties={"tokens": "5"}),
        "invalid_quantity",
        id="qty-under-another-name",
    ),
    pytest.param(event(name="peak_seats", quantity="-1"), "invalid_quantity", id="max-negative"),
    pytest.param(event(name="seats", quantity="-1"), "invalid_quantity", id="latest-negative"),
    pytest.param(
        event(name="storage_gb", quantity="-0.5"), "invalid_quantity", id="weighted-negative"
    ),
    pytest.param(event(name="active_users"), "invalid_quantity", id="unique-value-missing"),
    pytest.param(
        event(name="active_users", properties={"user": True}),
        "invalid_quantity",
        id="unique-value-a-bool",
    ),
]


@pytest.mark.parametrize(("payload", "code"), REJECTIONS)
@pytest.mark.usefixtures("meters", "frozen_now")
def test_an_invalid_event_is_rejected_with_its_code(client, secret, payload, code):
    response = send(client, secret, payload)

    body = response.json()
    assert response.status_code == 422
    assert body["error"]["code"] == code
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (0, 0, 1)
    [result] = body["results"]
    assert (result["index"], result["status"], result["code"]) == (0, "rejected", code)
    assert result["message"] == body["error"]["message"]
    assert "id" not in result
    assert not UsageEvent.objects.exists()


@pytest.mark.parametrize(
    ("offset", "status"),
    [
        pytest.param(-timedelta(days=35), 200, id="35-days-old"),
        pytest.param(-timedelta(days=35, microseconds=1), 422, id="35-days-old-and-1us"),
        pytest.param(timedelta(minutes=5), 200, id="5-minutes-ahead"),
        pytest.param(timedelta(minutes=5, microseconds=1), 422, id="5-minutes-and-1us-ahead"),
    ],
)
@pytest.mark.usefixtures("meters")
def test_the_acceptance_window_includes_its_edges(client, secret, frozen_now, offset, status):
    response = send(client, secret, event(timestamp=(frozen_now + offset).isoformat()))

    assert response.status_code == status
    if status == 422:
        assert error_code(response) == "timestamp_out_of_window"
    assert UsageEvent.objects.count() == (status == 200)


@pytest.mark.usefixtures("meters")
def test_the_acceptance_window_follows_the_real_clock(client, secret):
    now = timezone.now()
    payloads = [
        event(key="old", timestamp=(now - timedelta(days=36)).isoformat()),
        event(key="ahead", timestamp=(now + timedelta(minutes=10)).isoformat()),
        event(key="recent", timestamp=(now - timedelta(days=34)).isoformat()),
    ]

    response = send(client, secret, {"events": payloads})

    assert response.status_code == 207
    assert [r.get("code") for r in response.json()["results"]] == [
        "timestamp_out_of_window",
        "timestamp_out_of_window",
        None,
    ]
    assert list(UsageEvent.objects.values_list("idempotency_key", flat=True)) == ["recent"]


# --- Accepted events: what is stored -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quantity", "stored"),
    [
        pytest.param("tokens", "1.5", Decimal("1.5"), id="decimal-string"),
        pytest.param("tokens", 0.1, Decimal("0.1"), id="json-float-kept-as-written"),
        pytest.param("tokens", 12, Decimal(12), id="json-integer"),
        pytest.param("tokens", " 7 ", Decimal(7), id="padded-string"),
        pytest.param("tokens", "1e3", Decimal(1000), id="exponent"),
        pytest.param("tokens", "0.000001", Decimal("0.000001"), id="6-places"),
        pytest.param("tokens", "999999999999999", Decimal("999999999999999"), id="15-digits"),
        pytest.param("tokens", "123456789.123456", Decimal("123456789.123456"), id="15-sig"),
        pytest.param("tokens", "-2.5", Decimal("-2.5"), id="sum-takes-negative-corrections"),
        pytest.param("peak_seats", "0", Decimal(0), id="max-zero"),
        pytest.param("seats", 3, Decimal(3), id="latest"),
        pytest.param("storage_gb", "0.25", Decimal("0.25"), id="weighted-sum"),
    ],
)
@pytest.mark.usefixtures("meters")
def test_an_accepted_quantity_is_stored_exactly(client, secret, name, quantity, stored):
    response = send(client, secret, event(name=name, quantity=quantity))

    assert response.status_code == 200, response.json()
    event_row = UsageEvent.objects.get()
    assert event_row.quantity == stored
    assert event_row.properties == {"quantity": quantity}


def test_an_accepted_event_is_stored_as_sent(client, org, secret, meters, frozen_now):
    payload = event(
        name="tokens",
        key="order-17",
        timestamp="2026-03-30T13:30:00+02:00",
        properties={"quantity": "42.5", "model": "large", "region": "eu"},
    )

    response = send(client, secret, payload)

    assert response.status_code == 200
    [result] = response.json()["results"]
    stored = UsageEvent.objects.get()
    assert result == {
        "index": 0,
        "status": "accepted",
        "idempotency_key": "order-17",
        "id": stored.pk,
    }
    assert stored.organisation == org
    assert stored.meter == meters["tokens"]
    assert stored.quantity == Decimal("42.5")
    assert stored.properties == {"quantity": "42.5", "model": "large", "region": "eu"}
    assert stored.timestamp == datetime(2026, 3, 30, 11, 30, tzinfo=UTC)
    assert (stored.received_at, stored.source) == (frozen_now, "api")


@pytest.mark.usefixtures("meters")
def test_a_count_event_counts_one_and_timestamp_defaults_to_receipt(client, secret, frozen_now):
    response = send(client, secret, event(key="call-1"))

    assert response.status_code == 200
    stored = UsageEvent.objects.get()
    assert (stored.quantity, stored.timestamp, stored.received_at) == (
        Decimal(1),
        frozen_now,
        frozen_now,
    )


# --- Batches -------------------------------------------------------------------------------


@pytest.mark.usefixtures("meters")
def test_a_partial_batch_stores_the_valid_events_and_reports_each_in_order(client, secret):
    batch = [
        event(name="tokens", key="a", quantity="2"),
        event(name="no_such_meter", key="b"),
        event(name="tokens", key="c", properties={"quantity": "3.25"}),
        event(name="tokens", key="d", quantity=True),
        7,
    ]

    response = send(client, secret, {"events": batch})

    body = response.json()
    ids = dict(UsageEvent.objects.values_list("idempotency_key", "id"))
    assert response.status_code == 207
    assert "error" not in body
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (2, 0, 3)
    assert [
        (r["index"], r["status"], r.get("idempotency_key"), r.get("id"), r.get("code"))
        for r in body["results"]
    ] == [
        (0, "accepted", "a", ids["a"], None),
        (1, "rejected", "b", None, "unknown_meter"),
        (2, "accepted", "c", ids["c"], None),
        (3, "rejected", "d", None, "invalid_quantity"),
        (4, "rejected", None, None, "invalid_event"),
    ]
    assert stored_quantities() == {"a": Decimal(2), "c": Decimal("3.25")}


@pytest.mark.usefixtures("meters")
def test_a_batch_with_an_integer_beyond_64_bits_rejects_only_that_event(client, secret):
    body = (
        '{"events": ['
        '{"event_name": "tokens", "idempotency_key": "huge", "quantity": 36893488147419103232},'
        '{"event_name": "tokens", "idempotency_key": "fine", "quantity": 5}'
        "]}"
    )

    response = send_text(client, secret, body)

    assert response.status_code == 207
    assert [(r["status"], r.get("code")) for r in response.json()["results"]] == [
        ("rejected", "invalid_quantity"),
        ("accepted", None),
    ]
    assert stored_quantities() == {"fine": Decimal(5)}


# What the body parser looked for with the regular expression `[0-9]{19}` before.
DIGIT_RUN = re.compile(rb"[0-9]{19}")
# Digits in runs around 19 long, separators, and the UTF-8 of characters that are digits but not
# ASCII ones (Arabic-Indic one, fullwidth zero, superscript two).
BODY_PIECES = st.sampled_from(
    [
        *(b"0", b"1", b"9", b"5" * 18, b"7" * 19, b"12345"),
        *(b"-", b".", b"e", b'"', b" ", b"/", b":"),
        *("\u0661".encode(), "\uff10".encode(), "\u00b2".encode()),
    ]
)


@given(st.one_of(st.binary(max_size=300), st.lists(BODY_PIECES, max_size=80).map(b"".join)))
def test_the_digit_run_check_finds_what_the_regular_expression_found(body):
    assert _has_digit_run(body) == bool(DIGIT_RUN.search(body))


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b'{"quantity": 1234567890123456789}', True),
        (b'{"quantity": 123456789012345678}', False),
        (b'{"key": "a1234567890123456789z"}', True),
        (b"9" * 18 + b"." + b"9" * 18, False),
        ("\u0661".encode() * 19, False),
    ],
)
def test_the_digit_run_check_at_its_boundary(body, found):
    assert _has_digit_run(body) is found


@pytest.mark.usefixtures("meters")
def test_an_infinite_json_number_is_an_invalid_quantity(client, secret):
    body = '{"event_name": "tokens", "idempotency_key": "k1", "quantity": 1e400}'

    response = send_text(client, secret, body)

    assert (response.status_code, error_code(response)) == (422, "invalid_quantity")
    assert not UsageEvent.objects.exists()


@pytest.mark.usefixtures("meters")
def test_a_batch_rejected_whole_for_one_reason_reports_that_reason(client, secret):
    batch = [event(name="no_such_meter", key="a"), event(name="no_such_meter", key="b")]

    response = send(client, secret, {"events": batch})

    assert response.status_code == 422
    assert error_code(response) == "unknown_meter"
    assert response.json()["rejected"] == 2


@pytest.mark.usefixtures("meters")
def test_a_batch_rejected_whole_for_several_reasons_reports_all_rejected(client, secret):
    batch = [event(name="no_such_meter", key="a"), event(key="k" * 256)]

    response = send(client, secret, {"events": batch})

    assert response.status_code == 422
    assert error_code(response) == "all_rejected"
    assert [r["code"] for r in response.json()["results"]] == [
        "unknown_meter",
        "invalid_idempotency_key",
    ]


# --- Idempotency ---------------------------------------------------------------------------


@pytest.mark.usefixtures("meters")
def test_a_key_repeated_in_one_batch_is_stored_once_and_the_copy_is_a_duplicate(client, secret):
    batch = [
        event(name="tokens", key="k1", quantity="5"),
        event(name="tokens", key="k1", quantity="7"),
    ]

    response = send(client, secret, {"events": batch})

    body = response.json()
    stored = UsageEvent.objects.get()
    assert response.status_code == 200
    assert (body["accepted"], body["duplicates"], body["rejected"]) == (1, 1, 0)
    assert [(r["index"], r["status"], r["id"]) for r in body["results"]] == [
        (0, "accepted", stored.pk),
        (1, "duplicate", stored.pk),
    ]
    assert stored.quantity == Decimal(5)


@pytest.mark.usefixtures("meters", "frozen_now")
def test_a_resent_event_is_a_duplicate_and_counted_once(client, secret):
    first = send(client, secret, event(name="tokens", key="k1", quantity="5"))
    again = send(client, secret, event(name="tokens", key="k1", quantity="5"))
    changed = send(client, secret, event(name="tokens", key="k1", quantity="9"))

    event_id = first.json()["results"][0]["id"]
    for response in (again, changed):
        assert response.status_code == 200
        assert response.json()["duplicates"] == 1
        assert response.json()["results"] == [
            {"index": 0, "status": "duplicate", "idempotency_key": "k1", "id": event_id}
        ]
    assert stored_quantities() == {"k1": Decimal(5)}
    usage = read_usage(
        client, secret, meter="tokens", start="2026-03-01T00:00:00Z", end="2026-04-01T00:00:00Z"
    )
    assert usage.json()["value"] == "5"


@pytest.mark.usefixtures("meters")
def test_the_same_key_in_two_organisations_is_two_events(client):
    org_a, org_b = make_organisation(), make_organisation()
    secret_a, secret_b = make_api_key(org_a).secret, make_api_key(org_b).secret

    first = send(client, secret_a, event(name="tokens", key="shared", quantity="1"))
    second = send(client, secret_b, event(name="tokens", key="shared", quantity="2"))

    assert [r.json()["results"][0]["status"] for r in (first, second)] == ["accepted"] * 2
    assert stored_quantities(org_a) == {"shared": Decimal(1)}
    assert stored_quantities(org_b) == {"shared": Decimal(2)}


# --- Tenancy -------------------------------------------------------------------------------


@pytest.mark.usefixtures("meters", "frozen_now")
def test_a_key_writes_and_reads_only_its_own_organisation(client):
    org_a, org_b = make_organisation(), make_organisation()
    secret_a, secret_b = make_api_key(org_a).secret, make_api_key(org_b).secret
    send(client, secret_a, {"events": [event(name="tokens", key="a1", quantity="100")]})
    send(
        client,
        secret_b,
        {
            "events": [
                event(name="tokens", key="b1", quantity="1.5"),
                event(name="tokens", key="b2", quantity="2.25"),
            ]
        },
    )
    period = {"meter": "tokens", "start": "2026-03-01T00:00:00Z", "end": "2026-04-01T00:00:00Z"}

    usage_a = read_usage(client, secret_a, **period)
    usage_b = read_usage(client, secret_b, **period)

    assert stored_quantities(org_a) == {"a1": Decimal(100)}
    assert stored_quantities(org_b) == {"b1": Decimal("1.5"), "b2": Decimal("2.25")}
    assert usage_a.json()["value"] == "100"
    assert usage_b.json()["value"] == "3.75"


# --- Reading usage -------------------------------------------------------------------------


@pytest.mark.usefixtures("meters", "frozen_now")
def test_usage_by_day_follows_the_organisations_local_days(client):
    """Berlin moves to summer time on 2026-03-29: that local day lasts 23 hours."""
    berlin = make_organisation(timezone_name="Europe/Berlin")
    secret = make_api_key(berlin).secret
    sent = {
        "2026-03-27T23:59:59+01:00": "32",  # the day before the period
        "2026-03-28T00:00:00+01:00": "1",  # the period's start: counted
        "2026-03-28T23:30:00+01:00": "2",  # 22:30 UTC on the 28th
        "2026-03-29T00:30:00+01:00": "4",  # 23:30 UTC on the 28th, but the 29th in Berlin
        "2026-03-30T23:59:59.999999+02:00": "8",
        "2026-03-31T00:00:00+02:00": "16",  # the period's end: not counted
    }
    batch = [
        event(name="tokens", key=f"k{n}", timestamp=at, quantity=quantity)
        for n, (at, quantity) in enumerate(sent.items())
    ]
    assert send(client, secret, {"events": batch}).status_code == 200

    response = read_usage(
        client,
        secret,
        meter="tokens",
        start="2026-03-28T00:00:00+01:00",
        end="2026-03-31T00:00:00+02:00",
        group_by="day",
    )

    body = response.json()
    assert response.status_code == 200
    assert (body["meter"], body["aggregation"], body["value"]) == ("tokens", "sum", "15")
    assert datetime.fromisoformat(body["start"]) == datetime(2026, 3, 27, 23, tzinfo=UTC)
    assert datetime.fromisoformat(body["end"]) == datetime(2026, 3, 30, 22, tzinfo=UTC)
    assert [
        (datetime.fromisoformat(b["start"]), datetime.fromisoformat(b["end"]), b["value"])
        for b in body["series"]
    ] == [
        (datetime(2026, 3, 27, 23, tzinfo=UTC), datetime(2026, 3, 28, 23, tzinfo=UTC), "3"),
        (datetime(2026, 3, 28, 23, tzinfo=UTC), datetime(2026, 3, 29, 22, tzinfo=UTC), "4"),
        (datetime(2026, 3, 29, 22, tzinfo=UTC), datetime(2026, 3, 30, 22, tzinfo=UTC), "8"),
    ]


@pytest.mark.usefixtures("meters", "frozen_now")
def test_usage_by_hour_uses_utc_hours(client, secret):
    stamps = ["2026-03-30T10:00:00Z", "2026-03-30T10:59:59Z", "2026-03-30T12:15:00Z"]
    send(client, secret, {"events": [event(key=at, timestamp=at) for at in stamps]})

    response = read_usage(
        client,
        secret,
        meter="api_calls",
        start="2026-03-30T10:00:00Z",
        end="2026-03-30T13:00:00Z",
        group_by="hour",
    )

    body = response.json()
    assert body["value"] == "3"
    assert [(datetime.fromisoformat(b["start"]).hour, b["value"]) for b in body["series"]] == [
        (10, "2"),
        (11, "0"),
        (12, "1"),
    ]


@pytest.mark.parametrize(
    ("end", "value"),
    [
        pytest.param("2026-03-30T12:00:00Z", "0", id="event-at-end-excluded"),
        pytest.param("2026-03-30T12:00:00.000001Z", "1", id="event-before-end-included"),
    ],
)
@pytest.mark.usefixtures("meters", "frozen_now")
def test_usage_periods_are_half_open(client, secret, end, value):
    send(client, secret, event(timestamp="2026-03-30T12:00:00Z"))

    response = read_usage(client, secret, meter="api_calls", start="2026-03-30T00:00:00Z", end=end)

    assert (response.status_code, response.json()["value"]) == (200, value)


@pytest.mark.usefixtures("frozen_now")
def test_usage_counts_only_events_that_match_the_meters_filters(client, secret):
    make_meter("count", code="eu_calls", filters={"region": ["eu"]})
    regions = {"k1": "eu", "k2": "us", "k3": "eu"}
    batch = [
        event(name="eu_calls", key=key, properties={"region": region})
        for key, region in regions.items()
    ]
    send(client, secret, {"events": batch})

    response = read_usage(
        client, secret, meter="eu_calls", start="2026-03-30T00:00:00Z", end="2026-04-01T00:00:00Z"
    )

    assert UsageEvent.objects.count() == 3  # stored as received
    assert response.json()["value"] == "2"


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        pytest.param(
            {"meter": "nope", "start": "2026-03-01T00:00Z", "end": "2026-04-01T00:00Z"},
            404,
            "unknown_meter",
            id="unknown-meter",
        ),
        pytest.param(
            {"meter": "api_calls", "start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"},
            422,
            "invalid_period",
            id="naive-datetimes",
        ),
        pytest.param(
            {"meter": "api_calls", "start": "2026-03-01T00:00Z", "end": "2026-04-01T00:00:00"},
            422,
            "invalid_period",
            id="naive-end",
        ),
        pytest.param(
            {"meter": "api_calls", "start": "2026-04-01T00:00Z", "end": "2026-04-01T00:00Z"},
            422,
            "invalid_period",
            id="empty-period",
        ),
        pytest.param(
            {"meter": "api_calls", "start": "2026-04-01T00:00Z", "end": "2026-03-01T00:00Z"},
            422,
            "invalid_period",
            id="end-before-start",
        ),
        pytest.param(
            {
                "meter": "api_calls",
                "start": "2026-01-01T00:00Z",
                "end": "2026-04-05T00:00Z",
                "group_by": "hour",
            },
            422,
            "range_too_large",
            id="94-days-of-hours",
        ),
        pytest.param(
            {
                "meter": "api_calls",
                "start": "2020-01-01T00:00Z",
                "end": "2027-01-01T00:00Z",
                "group_by": "day",
            },
            422,
            "range_too_large",
            id="7-years-of-days",
        ),
        pytest.param(
            {"start": "2026-03-01T00:00Z", "end": "2026-04-01T00:00Z"},
            422,
            "invalid_request",
            id="meter-missing",
        ),
        pytest.param(
            {"meter": "api_calls", "start": "last monday", "end": "2026-04-01T00:00Z"},
            422,
            "invalid_request",
            id="start-garbage",
        ),
        pytest.param(
            {
                "meter": "api_calls",
                "start": "2026-03-01T00:00Z",
                "end": "2026-04-01T00:00Z",
                "group_by": "week",
            },
            422,
            "invalid_request",
            id="group-by-week",
        ),
    ],
)
@pytest.mark.usefixtures("meters")
def test_a_bad_usage_query_is_refused_with_its_code(client, secret, params, status, code):
    response = read_usage(client, secret, **params)

    assert (response.status_code, error_code(response)) == (status, code)


@pytest.mark.usefixtures("meters")
def test_a_long_hourly_series_within_the_limit_is_served(client, secret):
    response = read_usage(
        client,
        secret,
        meter="api_calls",
        start="2026-01-01T00:00:00Z",
        end="2026-04-03T22:00:00Z",
        group_by="hour",
    )

    assert response.status_code == 200
    assert len(response.json()["series"]) == 2230


@pytest.mark.usefixtures("meters")
def test_a_series_of_exactly_the_documented_maximum_is_served(client, secret):
    response = read_usage(
        client,
        secret,
        meter="api_calls",
        start="2026-01-01T00:00:00Z",
        end="2026-04-04T00:00:00Z",
        group_by="hour",
    )

    assert response.status_code == 200
    assert len(response.json()["series"]) == 93 * 24


# --- Meters and the API's description ------------------------------------------------------


def test_meters_are_listed_with_their_specs(client, secret):
    make_meter("sum", code="tokens", property="tokens", filters={"model": ["large", "small"]})
    make_meter("count", code="api_calls")

    response = client.get("/api/v1/meters", headers=auth(secret))

    assert response.status_code == 200
    assert response.json() == [
        {
            "code": "api_calls",
            "name": "Api calls",
            "unit": "unit",
            "aggregation": "count",
            "property": None,
            "filters": {},
        },
        {
            "code": "tokens",
            "name": "Tokens",
            "unit": "unit",
            "aggregation": "sum",
            "property": "tokens",
            "filters": {"model": ["large", "small"]},
        },
    ]


def test_the_openapi_document_and_docs_are_served_without_a_key(client):
    document = client.get("/api/v1/openapi.json")
    docs = client.get("/api/v1/docs")

    assert document.status_code == 200
    paths = document.json()["paths"]
    assert "post" in paths["/api/v1/events"]
    assert {"/api/v1/meters", "/api/v1/usage"} <= paths.keys()
    assert docs.status_code == 200
    assert b"Meterline API" in docs.content


# --- Known bugs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            '{"event_name": "api_calls", "idempotency_key": "k1", "properties": {"x": "\\ud800"}}',
            id="lone-surrogate-in-properties",
        ),
        pytest.param(
            '{"event_name": "api_calls", "idempotency_key": "\\ud800"}',
            id="lone-surrogate-in-key",
        ),
        pytest.param(
            '{"event_name": "api_calls", "idempotency_key": "k1", "properties": {"x": 1e400}}',
            id="infinity-in-properties",
        ),
    ],
)
@pytest.mark.usefixtures("meters")
def test_json_that_orjson_refuses_is_never_a_server_error(client, secret, body):
    response = send_text(client, secret, body)

    assert response.status_code in {400, 422}
    assert "error" in response.json()
    assert not UsageEvent.objects.exists()


@pytest.mark.usefixtures("meters")
def test_an_integer_beyond_64_bits_in_properties_is_never_altered(client, secret):
    body = (
        '{"event_name": "api_calls", "idempotency_key": "k1", '
        '"properties": {"order": 123456789012345678901234567}}'
    )

    response = send_text(client, secret, body)

    if response.status_code == 200:
        stored = UsageEvent.objects.get()
        assert stored.properties == {"order": 123456789012345678901234567}
    else:
        assert not UsageEvent.objects.exists()


@pytest.mark.parametrize("timestamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
@pytest.mark.usefixtures("meters")
def test_a_timestamp_at_the_edge_of_the_calendar_is_rejected(client, secret, timestamp):
    response = send(client, secret, event(timestamp=timestamp))

    assert response.status_code == 422
    assert error_code(response) in {"invalid_timestamp", "timestamp_out_of_window"}


@pytest.mark.usefixtures("meters")
def test_a_quantity_with_a_huge_exponent_is_an_invalid_quantity(client, secret):
    response = send(client, secret, event(name="tokens", quantity="1e1000000"))

    assert response.status_code == 422
    assert error_code(response) == "invalid_quantity"


@pytest.mark.usefixtures("meters")
def test_a_top_level_quantity_counts_towards_the_properties_limit(client, secret):
    response = send(client, secret, event(quantity="x" * 20_000))

    assert response.status_code == 422
    assert error_code(response) == "invalid_properties"
    assert not UsageEvent.objects.exists()


@pytest.mark.parametrize(
    ("start", "end"),
    [
        ("0001-01-01T00:00:00+01:00", "2026-04-01T00:00:00Z"),
        ("2026-03-01T00:00:00Z", "9999-12-31T23:59:59-01:00"),
    ],
)
@pytest.mark.usefixtures("meters")
def test_a_usage_period_at_the_edge_of_the_calendar_is_refused(client, secret, start, end):
    response = read_usage(client, secret, meter="api_calls", start=start, end=end)

    assert response.status_code == 422
