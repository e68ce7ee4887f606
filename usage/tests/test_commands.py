import io
import json
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import APIKey, Organisation
from accounts.services import api_key_authenticate
from accounts.tests.factories import make_organisation
from usage.models import Meter, UsageEvent
from usage.tests.factories import make_meter


def run(*args, stdin=None, monkeypatch=None):
    out, err = io.StringIO(), io.StringIO()
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_create_organisation_and_api_key():
    run("create_organisation", "Wayne Enterprises", "--currency", "jpy", "--timezone", "Asia/Tokyo")
    org = Organisation.objects.get(slug="wayne-enterprises")
    assert (org.currency, org.timezone) == ("JPY", "Asia/Tokyo")
    out, _ = run("create_api_key", "wayne-enterprises")
    secret = out.strip().splitlines()[-1]
    assert api_key_authenticate(secret=secret).organisation == org
    assert APIKey.objects.get().digest != secret


@pytest.mark.django_db
@pytest.mark.parametrize(
    "args",
    [
        ("create_organisation", "X", "--currency", "ZZZ1"),
        ("create_organisation", "X", "--timezone", "Mars/Olympus"),
        ("create_api_key", "nobody"),
        ("create_meter", "m", "{bad json"),
        ("create_meter", "m", '{"aggregation": "sum"}'),
    ],
)
def test_commands_refuse_bad_input_clearly(args):
    with pytest.raises(CommandError):
        run(*args)
    assert not Organisation.objects.exists()
    assert not Meter.objects.exists()


@pytest.mark.django_db
def test_create_meter_from_a_spec():
    run(
        "create_meter",
        "eu_tokens",
        '{"aggregation": "sum", "property": "tokens", "filters": {"region": ["eu"]}}',
        "--unit",
        "token",
    )
    meter = Meter.objects.get(code="eu_tokens")
    assert meter.spec.to_json() == {
        "aggregation": "sum",
        "property": "tokens",
        "filters": {"region": ["eu"]},
    }
    assert meter.unit == "token"


@pytest.mark.django_db
def test_import_events_reports_and_writes_rejected_lines(tmp_path):
    org = make_organisation(slug="acme")
    other = make_organisation(slug="globex")
    make_meter("sum", code="tokens", property="tokens")
    old = (timezone.now() - timedelta(days=400)).isoformat()
    lines = [
        {
            "event_name": "tokens",
            "idempotency_key": "a",
            "timestamp": old,
            "properties": {"tokens": 5},
        },
        {
            "event_name": "tokens",
            "idempotency_key": "a",
            "timestamp": old,
            "properties": {"tokens": 5},
        },
        {"event_name": "tokens", "idempotency_key": "b", "properties": {"tokens": "x"}},
        {
            "event_name": "tokens",
            "idempotency_key": "c",
            "properties": {"tokens": 7},
            "organisation": "globex",
        },
        {
            "event_name": "tokens",
            "idempotency_key": "d",
            "properties": {"tokens": 1},
            "organisation": "nowhere",
        },
    ]
    source = tmp_path / "events.jsonl"
    source.write_text("\n".join(json.dumps(line) for line in lines) + "\n{not json\n\n")

    out, _ = run("import_events", str(source), "--organisation", "acme", "--allow-backdated")
    assert out.strip().splitlines()[-1] == "accepted 2, duplicate 1, rejected 3"
    assert UsageEvent.objects.get(organisation=org).quantity == 5
    assert UsageEvent.objects.get(organisation=other).quantity == 7
    assert UsageEvent.objects.get(organisation=org).source == "import"
    rejected = [
        json.loads(line)
        for line in (tmp_path / "events.jsonl.rejected.jsonl").read_text().splitlines()
    ]
    assert sorted((r["line"], r["code"]) for r in rejected) == [
        (3, "invalid_quantity"),
        (5, "unknown_organisation"),
        (6, "invalid_json"),
    ]

    # Re-running the same file stores nothing new.
    out, _ = run("import_events", str(source), "--organisation", "acme", "--allow-backdated")
    assert out.strip().splitlines()[-1] == "accepted 0, duplicate 3, rejected 3"
    assert UsageEvent.objects.count() == 2


@pytest.mark.django_db
def test_import_events_without_backdating_keeps_the_window(tmp_path):
    make_organisation(slug="acme")
    make_meter("count", code="calls")
    source = tmp_path / "old.jsonl"
    old = (timezone.now() - timedelta(days=400)).isoformat()
    source.write_text(
        json.dumps({"event_name": "calls", "idempotency_key": "a", "timestamp": old}) + "\n"
    )
    out, _ = run("import_events", str(source), "--organisation", "acme")
    assert out.strip().splitlines()[-1] == "accepted 0, duplicate 0, rejected 1"
    assert not UsageEvent.objects.exists()


def test_meter_preview_prints_the_value_first(monkeypatch):
    events = "\n".join(
        json.dumps(e)
        for e in [
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "properties": {"tokens": "1.5", "region": "eu"},
                "idempotency_key": "a",
            },
            {
                "timestamp": "2026-01-01T00:00:00Z",
                "properties": {"tokens": "1.5", "region": "eu"},
                "idempotency_key": "a",
            },
            {
                "timestamp": "2026-01-15T00:00:00Z",
                "quantity": 99,
                "properties": {"tokens": 2, "region": "eu"},
            },
            {"timestamp": "2026-01-20T00:00:00Z", "properties": {"tokens": 4, "region": "us"}},
            {"timestamp": "2026-02-01T00:00:00Z", "properties": {"tokens": 8, "region": "eu"}},
            {"timestamp": "2026-01-21T00:00:00Z", "properties": {"tokens": "lots", "region": "eu"}},
        ]
    )
    spec = '{"aggregation": "sum", "property": "tokens", "filters": {"region": ["eu"]}}'
    out, err = run(
        "meter_preview",
        "--meter",
        spec,
        "--start",
        "2026-01-01T00:00:00Z",
        "--end",
        "2026-02-01T00:00:00Z",
        stdin=events,
        monkeypatch=monkeypatch,
    )
    lines = out.splitlines()
    assert lines[0] == "3.5"
    assert (
        "6 events read: 3 counted, 1 not matching the filters, 1 duplicates, 1 rejected" in lines[1]
    )
    assert "line 6: invalid_quantity" in err


def test_meter_preview_weighted_sum_uses_the_level_before_the_start(monkeypatch):
    events = "\n".join(
        json.dumps({"timestamp": ts, "properties": {"gb": gb}})
        for ts, gb in [("2025-12-01T00:00:00Z", 10), ("2026-01-11T00:00:00Z", 0)]
    )
    out, _ = run(
        "meter_preview",
        "--meter",
        '{"aggregation": "weighted_sum", "property": "gb"}',
        "--start",
        "2026-01-01T00:00:00Z",
        "--end",
        "2026-01-21T00:00:00Z",
        stdin=events,
        monkeypatch=monkeypatch,
    )
    assert out.splitlines()[0] == "5"


@pytest.mark.parametrize(
    "args",
    [
        ("--meter", "{}", "--start", "2026-01-01T00:00:00Z", "--end", "2026-02-01T00:00:00Z"),
        (
            "--meter",
            '{"aggregation": "count"}',
            "--start",
            "2026-01-01",
            "--end",
            "2026-02-01T00:00:00Z",
        ),
        (
            "--meter",
            '{"aggregation": "count"}',
            "--start",
            "2026-02-01T00:00:00Z",
            "--end",
            "2026-01-01T00:00:00Z",
        ),
    ],
)
def test_meter_preview_refuses_bad_arguments(args, monkeypatch):
    with pytest.raises(CommandError):
        run("meter_preview", *args, stdin="", monkeypatch=monkeypatch)
