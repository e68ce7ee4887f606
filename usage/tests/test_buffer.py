"""The ingestion buffer: the API queues, consumers store exactly once, outages lose nothing.

Redis is real (REDIS_URL, a stream of this test's own), and so are the servers the outage tests
kill: a private redis-server and a private PostgreSQL cluster started by the test.
"""

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import UTC, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import orjson
import psycopg
import pytest
import redis
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.utils import timezone
from hypothesis import given
from hypothesis import strategies as st

from accounts.models import Organisation
from accounts.tests.factories import make_api_key, make_organisation
from usage import buffer
from usage.buffer import buffer_backlog, buffer_consume, buffer_drain, events_enqueue
from usage.models import UsageEvent
from usage.services import events_ingest
from usage.signals import events_stored
from usage.tasks import drain_ingest_buffer
from usage.tests.factories import make_meter
from usage.tests.servers import PG_BIN, private_postgres, private_redis

REPO = Path(__file__).resolve().parents[2]
EVENTS_URL = "/api/v1/events"


@pytest.fixture
def buffered(settings):
    """The buffer on, with a stream no other test (or engineer) uses; its keys removed after."""
    stream = f"test:{uuid.uuid4().hex[:12]}"
    shared = settings.REDIS_URL  # a test may point REDIS_URL at a private server
    settings.INGEST_BUFFER = "redis"
    settings.INGEST_BUFFER_STREAM = stream
    settings.INGEST_BUFFER_CLAIM_IDLE = timedelta(milliseconds=300)
    settings.INGEST_BUFFER_BLOCK_MS = 100
    buffer._clients.clear()
    buffer._redis_down_until = 0.0
    yield stream
    buffer._redis_down_until = 0.0
    client = redis.Redis.from_url(shared)
    keys = list(client.scan_iter(f"{stream}*", count=1000))
    if keys:
        client.delete(*keys)
    buffer._clients.clear()


@pytest.fixture
def heard():
    calls = []

    def receiver(sender, organisation, events, **kwargs):
        calls.append((organisation, [(e.idempotency_key, e.quantity, e.id) for e in events]))

    events_stored.connect(receiver, sender=UsageEvent, weak=False)
    yield calls
    events_stored.disconnect(receiver, sender=UsageEvent)


@pytest.fixture
def tenant():
    """An organisation with an API key, and a meter summing `tokens`."""
    org = make_organisation()
    return SimpleNamespace(
        org=org, secret=make_api_key(org).secret, meter=make_meter("sum", property="tokens")
    )


def event(meter, key, tokens=1, **fields):
    return {
        "event_name": meter.code,
        "idempotency_key": key,
        "properties": {"tokens": tokens},
        **fields,
    }


def post(client, secret, events):
    response = client.post(
        EVENTS_URL,
        data=json.dumps({"events": events}),
        content_type="application/json",
        headers={"Authorization": f"Bearer {secret}"},
    )
    return response.status_code, response.json()


def stored(organisation=None):
    rows = UsageEvent.objects.all()
    if organisation is not None:
        rows = rows.filter(organisation=organisation)
    return dict(rows.values_list("idempotency_key", "quantity"))


def drain_all(consumer="test-consumer"):
    totals = [0, 0]
    for _ in range(100):
        drained = buffer_drain(consumer=consumer)
        if not drained.entries:
            return totals
        totals[0] += drained.events
        totals[1] += drained.inserted
    raise AssertionError("the buffer never emptied")


def group_pending(stream):
    return redis.Redis.from_url(settings.REDIS_URL).xpending(stream, settings.INGEST_BUFFER_GROUP)[
        "pending"
    ]


@pytest.mark.redis
@pytest.mark.django_db
def test_the_api_queues_and_a_consumer_stores_every_event_once(tenant, client, buffered, heard):
    org, meter = tenant.org, tenant.meter

    status, body = post(client, tenant.secret, [event(meter, f"k{i}", i) for i in range(1, 251)])

    assert status == 200
    assert (body["accepted"], body["queued"], body["duplicates"], body["rejected"]) == (
        0,
        250,
        0,
        0,
    )
    assert {r["status"] for r in body["results"]} == {"queued"}
    assert [r["idempotency_key"] for r in body["results"]][:2] == ["k1", "k2"]
    assert stored() == {}  # nothing in the database until a consumer runs
    assert buffer_backlog() == 1  # one stream entry per request

    assert drain_all() == [250, 250]

    assert stored(org) == {f"k{i}": Decimal(i) for i in range(1, 251)}
    assert UsageEvent.objects.filter(organisation=org, source="api").count() == 250
    assert buffer_backlog() == 0  # acknowledged entries are deleted
    assert group_pending(buffered) == 0
    # events_stored was sent once, in the storing transaction, for the stored events only.
    [(organisation, events)] = heard
    assert organisation == org
    assert sorted(key for key, _, _ in events) == sorted(f"k{i}" for i in range(1, 251))
    assert {event_id for _, _, event_id in events} == set(
        UsageEvent.objects.values_list("id", flat=True)
    )


@pytest.mark.redis
@pytest.mark.django_db
def test_duplicates_are_answered_by_redis_and_stored_once_by_the_database(
    tenant, client, buffered, heard
):
    org, meter, other = tenant.org, tenant.meter, make_organisation()
    # Stored directly before the buffer existed: Redis has not seen it, the database has.
    events_ingest(organisation=org, payloads=[event(meter, "old", 7)])
    # Another organisation's key of the same name is its own.
    events_ingest(organisation=other, payloads=[event(meter, "a", 100)])

    _, first = post(
        client, tenant.secret, [event(meter, "a", 1), event(meter, "b", 2), event(meter, "a", 9)]
    )
    _, second = post(
        client, tenant.secret, [event(meter, "b", 2), event(meter, "c", 3), event(meter, "old", 7)]
    )

    assert [r["status"] for r in first["results"]] == ["queued", "queued", "duplicate"]
    assert [r["status"] for r in second["results"]] == ["duplicate", "queued", "queued"]
    assert (second["queued"], second["duplicates"]) == (2, 1)
    assert drain_all() == [4, 3]  # a, b, c, old read; "old" was already stored
    assert stored(org) == {"a": Decimal(1), "b": Decimal(2), "c": Decimal(3), "old": Decimal(7)}
    assert stored(other) == {"a": Decimal(100)}
    assert sorted(key for _, events in heard[2:] for key, _, _ in events) == ["a", "b", "c"]
    # A seen key is remembered for at least the acceptance window.
    ttl = redis.Redis.from_url(settings.REDIS_URL).ttl(f"{buffered}:seen:{org.pk}:a")
    assert (
        settings.INGEST_MAX_PAST.total_seconds()
        <= ttl
        <= settings.INGEST_BUFFER_SEEN_TTL.total_seconds()
    )


@pytest.mark.redis
@pytest.mark.django_db
def test_a_batch_read_in_several_mgets_answers_each_key(buffered):
    """The script reads the "seen" keys 500 at a time; each answer stays with its own key."""
    org, meter = make_organisation(), make_meter("sum", property="tokens")
    before = {"k0", "k499", "k500", "k999", "k1000", "k1199"}
    events_enqueue(organisation=org, payloads=[event(meter, key, 1) for key in sorted(before)])

    results = events_enqueue(
        organisation=org, payloads=[event(meter, f"k{i}", 2) for i in range(1200)]
    )

    assert [result.status for result in results] == [
        "duplicate" if f"k{i}" in before else "queued" for i in range(1200)
    ]
    drain_all()
    assert stored(org) == {f"k{i}": Decimal(1 if f"k{i}" in before else 2) for i in range(1200)}


@pytest.mark.redis
@pytest.mark.django_db
@pytest.mark.parametrize("pattern", ["1111", "0000", "0111", "1110", "1010", "0101", "1100110"])
def test_the_entry_holds_exactly_the_new_events_in_order(buffered, pattern):
    """`pattern`: 1 for a new key, 0 for a key queued before. The script cuts runs of new ones."""
    org, meter = make_organisation(), make_meter("sum", property="tokens")
    keys = [f"k{i}" for i in range(len(pattern))]
    if "0" in pattern:
        before = [key for key, flag in zip(keys, pattern, strict=True) if flag == "0"]
        events_enqueue(organisation=org, payloads=[event(meter, key, 1) for key in before])
    queued = redis.Redis.from_url(settings.REDIS_URL).xlen(buffered)

    results = events_enqueue(organisation=org, payloads=[event(meter, key, 2) for key in keys])

    assert "".join("1" if result.status == "queued" else "0" for result in results) == pattern
    entries = redis.Redis.from_url(settings.REDIS_URL).xrange(buffered)[queued:]
    fresh = [key for key, flag in zip(keys, pattern, strict=True) if flag == "1"]
    if fresh:
        [(_, fields)] = entries
        assert [(e[4], e[1]) for e in orjson.loads(fields[b"e"])] == [
            (k, "2.000000") for k in fresh
        ]
    else:
        assert entries == []


@pytest.mark.redis
@pytest.mark.django_db
def test_a_redis_that_forgot_the_script_is_sent_it_again(buffered, settings, tmp_path):
    org, meter = make_organisation(), make_meter("sum", property="tokens")
    with private_redis(tmp_path) as server:
        settings.REDIS_URL = server.url
        buffer._clients.clear()
        events_enqueue(organisation=org, payloads=[event(meter, "a")])
        redis.Redis.from_url(server.url).script_flush()

        results = events_enqueue(organisation=org, payloads=[event(meter, "a"), event(meter, "b")])

        assert [result.status for result in results] == ["duplicate", "queued"]
        assert drain_all() == [2, 2]


OFFSETS = st.timedeltas(
    min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23, minutes=59)
).map(dt_timezone)


@given(st.datetimes(timezones=st.one_of(st.just(UTC), st.timezones(), OFFSETS)))
def test_a_queued_timestamp_is_written_as_its_isoformat(moment):
    assert orjson.dumps([buffer._timestamp(moment)]) == orjson.dumps([moment.isoformat()])


@pytest.mark.redis
@pytest.mark.django_db
def test_the_same_validation_answers_both_paths(tenant, client, buffered, settings):
    meter = tenant.meter
    now = timezone.now()
    bad = [
        event(meter, "fine", 1),
        {"event_name": "nope", "idempotency_key": "x"},
        event(meter, "old", 1, timestamp=(now - timedelta(days=40)).isoformat()),
        event(meter, "neg", "lots"),
        {"idempotency_key": "y", "event_name": meter.code, "colour": "red"},
    ]
    _, queued = post(client, tenant.secret, bad)
    settings.INGEST_BUFFER = ""
    _, direct = post(
        client, tenant.secret, [{**e, "idempotency_key": e["idempotency_key"] + "2"} for e in bad]
    )

    def rejections(body):
        return [(r["index"], r.get("code")) for r in body["results"] if r["status"] == "rejected"]

    assert rejections(queued) == rejections(direct)
    assert [code for _, code in rejections(queued)] == [
        "unknown_meter",
        "timestamp_out_of_window",
        "invalid_quantity",
        "unknown_field",
    ]
    assert (queued["queued"], direct["accepted"]) == (1, 1)


@pytest.mark.redis
@pytest.mark.django_db
def test_with_redis_unreachable_the_api_stores_directly(tenant, client, buffered, settings):
    org, meter = tenant.org, tenant.meter
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1

    status, body = post(client, tenant.secret, [event(meter, "a", 1), event(meter, "b", 2)])
    _, again = post(client, tenant.secret, [event(meter, "b", 2)])

    assert status == 200
    assert [r["status"] for r in body["results"]] == ["accepted", "accepted"]
    assert (body["accepted"], body["queued"]) == (2, 0)
    assert [r["status"] for r in again["results"]] == ["duplicate"]
    assert stored(org) == {"a": Decimal(1), "b": Decimal(2)}


@pytest.mark.redis
@pytest.mark.django_db
def test_an_entry_the_database_refuses_is_dead_lettered_and_the_rest_stored(buffered):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    events_enqueue(organisation=org, payloads=[event(meter, "good", 5)])
    client = redis.Redis.from_url(settings.REDIS_URL)
    # An event the API would never have queued (an empty key breaks a check constraint), and
    # garbage.
    client.xadd(
        buffered,
        {
            "o": org.pk,
            "s": "api",
            "e": json.dumps([[meter.pk, "1", {}, timezone.now().isoformat(), ""]]),
        },
    )
    client.xadd(buffered, {"o": org.pk, "s": "api", "e": "not json"})
    events_enqueue(organisation=org, payloads=[event(meter, "also-good", 6)])

    drained = buffer_drain(consumer="c1")

    assert (drained.entries, drained.inserted, drained.dead) == (4, 2, 2)
    assert stored() == {"good": Decimal(5), "also-good": Decimal(6)}
    dead = client.xrange(f"{buffered}:dead")
    assert [fields[b"error"].split(b":")[0] for _, fields in dead] == [
        b"undecodable",
        b"refused by the database",
    ]
    assert buffer_backlog() == 0
    assert group_pending(buffered) == 0

    # Once the cause is fixed (here: the garbage made readable), the dead entries go back.
    client.xadd(
        f"{buffered}:dead",
        {
            "o": org.pk,
            "s": "api",
            "e": json.dumps([[meter.pk, "7", {}, timezone.now().isoformat(), "late"]]),
        },
    )
    out = io.StringIO()
    call_command("ingest_worker", "--requeue-dead", stdout=out)
    assert out.getvalue() == f"3 entries put back in {buffered}\n"
    assert client.xlen(f"{buffered}:dead") == 0
    drained = buffer_drain(consumer="c1")
    assert (drained.entries, drained.inserted, drained.dead) == (3, 1, 2)
    assert stored()["late"] == Decimal(7)
    assert client.xlen(f"{buffered}:dead") == 2  # still refused: set aside again


@pytest.mark.redis
@pytest.mark.django_db
def test_a_failing_receiver_rolls_back_the_batch_which_is_stored_on_the_next_try(buffered):
    """events_stored receivers write in the consumer's transaction; the entries are acknowledged
    only after it commits."""
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    events_enqueue(organisation=org, payloads=[event(meter, f"k{i}", i) for i in range(1, 11)])
    calls = []

    def receiver(sender, organisation, events, **kwargs):
        calls.append(len(events))
        Organisation.objects.create(name="outbox row", slug=f"outbox-{len(calls)}")
        if len(calls) == 1:
            raise RuntimeError("the receiver's bug")

    events_stored.connect(receiver, sender=UsageEvent, weak=False)
    try:
        totals = buffer_consume(consumer="c1", should_stop=lambda: False, until_empty=True)
    finally:
        events_stored.disconnect(receiver, sender=UsageEvent)

    assert (totals.failures, totals.batches, totals.inserted, totals.dead) == (1, 1, 10, 0)
    assert calls == [10, 10]
    # The first try's outbox row went with its events; the second try's committed with them.
    assert list(Organisation.objects.filter(name="outbox row").values_list("slug", flat=True)) == [
        "outbox-2"
    ]
    assert sum(stored(org).values()) == sum(range(1, 11))
    assert buffer_backlog() == 0
    assert group_pending(buffered) == 0


@pytest.mark.redis
@pytest.mark.django_db
def test_the_scheduled_task_drains_the_buffer(buffered):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    events_enqueue(organisation=org, payloads=[event(meter, f"k{i}", i) for i in range(10)])

    summary = drain_ingest_buffer(seconds=1)

    assert summary == "stored 10 of 10 events read in 1 batches"
    assert sum(stored(org).values()) == Decimal(45)


@pytest.mark.redis
@pytest.mark.django_db
def test_the_worker_reports_its_rate_backlog_and_lag(buffered, caplog):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    events_enqueue(organisation=org, payloads=[event(meter, f"k{i}", i) for i in range(10)])

    def slow_receiver(sender, **kwargs):
        time.sleep(1.1)  # the batch takes longer than --report-seconds

    events_stored.connect(slow_receiver, sender=UsageEvent, weak=False)
    out = io.StringIO()
    try:
        with caplog.at_level(logging.INFO, logger="usage.management.commands.ingest_worker"):
            call_command(
                "ingest_worker",
                "--until-empty",
                "--name",
                "w9",
                "--report-seconds",
                "1",
                stdout=out,
            )
    finally:
        events_stored.disconnect(slow_receiver, sender=UsageEvent)

    [report] = [r.getMessage() for r in caplog.records if "events stored in" in r.getMessage()]
    assert report.startswith("w9: 10 events stored in 1 s (")
    assert ", 0 entries queued, longest queued-to-stored " in report
    assert out.getvalue().startswith("w9: 1 batches, 10 events read, 10 stored, 0 already stored")


@pytest.mark.django_db
def test_the_worker_refuses_to_start_with_the_buffer_off(settings):
    settings.INGEST_BUFFER = ""
    with pytest.raises(CommandError, match="INGEST_BUFFER=redis"):
        call_command("ingest_worker", "--until-empty")


@pytest.mark.redis
@pytest.mark.django_db
def test_redis_killed_and_restarted_mid_stream_keeps_its_queue(
    tenant, client, buffered, settings, tmp_path
):
    org, meter = tenant.org, tenant.meter
    with private_redis(tmp_path) as server:
        settings.REDIS_URL = server.url
        buffer._clients.clear()
        first = [event(meter, f"a{i}", i) for i in range(1, 101)]
        second = [event(meter, f"b{i}", i) for i in range(1, 101)]
        assert post(client, tenant.secret, first)[1]["queued"] == 100
        assert post(client, tenant.secret, second)[1]["queued"] == 100
        assert buffer_drain(consumer="c1", count=1).inserted == 100  # the first entry only

        server.kill()  # a crash, with the second entry queued and not yet stored
        with pytest.raises(redis.ConnectionError):
            buffer_drain(consumer="c1")
        # Meanwhile the API stores directly; a resent queued key is stored once in the end.
        _, during = post(client, tenant.secret, [event(meter, "c1", 1000), event(meter, "b1", 1)])
        assert [r["status"] for r in during["results"]] == ["accepted", "accepted"]

        server.start()  # same directory: the append-only file brings the stream back
        buffer._redis_down_until = 0.0
        _, after = post(client, tenant.secret, [event(meter, "a1", 1), event(meter, "d1", 5)])
        assert [r["status"] for r in after["results"]] == ["duplicate", "queued"]

        assert drain_all("c2") == [101, 100]  # b1..b100 (b1 already stored), d1

    expected = {f"a{i}": Decimal(i) for i in range(1, 101)} | {
        f"b{i}": Decimal(i) for i in range(1, 101)
    }
    assert stored(org) == expected | {"c1": Decimal(1000), "d1": Decimal(5)}


# --- Real processes on PostgreSQL -----------------------------------------------------------------


def app_env(database_url, stream, redis_url=None):
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DJANGO_SETTINGS_MODULE", "DATABASE_URL", "PYTEST_CURRENT_TEST"}
    }
    env.update(
        DJANGO_SETTINGS_MODULE="billing_site.settings",
        DATABASE_URL=database_url,
        REDIS_URL=redis_url or settings.REDIS_URL,
        INGEST_BUFFER="redis",
        INGEST_BUFFER_STREAM=stream,
        INGEST_BUFFER_CLAIM_IDLE_SECONDS="1",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def database_url_of_tests():
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


# The consumer stops at the named point of `buffer_drain` and says so: the test then kills it
# with SIGKILL, exactly there. The code it runs is the real one.
PAUSED_CONSUMER = """
import sys, time, django
django.setup()
from usage import buffer, services
point = sys.argv[1]
real = services._copy_insert_postgresql if point == "copied" else buffer.events_store_queued
def pause(*args, **kwargs):
    result = real(*args, **kwargs)
    print(point, flush=True)
    time.sleep(600)
    return result
if point == "copied":
    services._copy_insert_postgresql = pause
else:
    buffer.events_store_queued = pause
buffer.buffer_drain(consumer="doomed")
"""


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("point", ["copied", "committed"])
def test_a_consumer_killed_before_acknowledging_is_taken_over_without_double_counting(
    buffered, point
):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    for batch in range(3):
        events_enqueue(
            organisation=org,
            payloads=[event(meter, f"k{batch}-{i}", i) for i in range(1, 101)],
        )
    doomed = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CONSUMER, point],
        cwd=REPO,
        env=app_env(database_url_of_tests(), buffered),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert doomed.stdout.readline().strip() == point
        committed = UsageEvent.objects.filter(organisation=org).count()
        assert committed == (300 if point == "committed" else 0)
        assert group_pending(buffered) == 3  # read, not acknowledged
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)

    time.sleep(0.4)  # past INGEST_BUFFER_CLAIM_IDLE: the entries are claimed by the next reader
    assert drain_all("survivor") == [300, 300 - committed]

    assert UsageEvent.objects.filter(organisation=org).count() == 300
    assert sum(stored(org).values()) == 3 * sum(range(1, 101))
    assert buffer_backlog() == 0
    assert group_pending(buffered) == 0


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ingest_worker_stores_until_signalled_then_exits_cleanly(buffered, signum):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    worker = subprocess.Popen(
        [sys.executable, "manage.py", "ingest_worker", "--name", "w1"],
        cwd=REPO,
        env=app_env(database_url_of_tests(), buffered),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for batch in range(5):
            events_enqueue(
                organisation=org, payloads=[event(meter, f"k{batch}-{i}", i) for i in range(50)]
            )
        deadline = time.monotonic() + 30
        while UsageEvent.objects.filter(organisation=org).count() < 250:
            assert time.monotonic() < deadline, "the worker stored nothing"
            time.sleep(0.1)
    finally:
        worker.send_signal(signum)
        out, err = worker.communicate(timeout=30)

    assert worker.returncode == 0, err
    assert out.startswith("w1: ") and "250 stored, 0 already stored" in out
    assert sum(stored(org).values()) == 5 * sum(range(50))
    assert group_pending(buffered) == 0
    # A consumer that stops holding nothing leaves the group.
    consumers = redis.Redis.from_url(settings.REDIS_URL).xinfo_consumers(
        buffered, settings.INGEST_BUFFER_GROUP
    )
    assert consumers == []


def copy_rows(source_url, target, tables):
    """The rows of `tables` (organisations, meters), ids kept, into the private cluster."""
    with psycopg.connect(source_url) as source, target.connect() as sink:
        for table in tables:
            query = f"SELECT * FROM {table} LIMIT 0"  # noqa: S608 - our own table names
            columns = [column[0] for column in source.execute(query).description]
            with (
                source.cursor().copy(f"COPY {table} TO STDOUT") as out,
                sink.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as into,
            ):
                for data in out:
                    into.write(data)


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_postgresql_restarted_mid_burst_loses_and_doubles_nothing(buffered):
    org = make_organisation()
    meter = make_meter("sum", property="tokens")
    with private_postgres() as cluster:
        # The schema of the test database, and its organisation and meter, in a cluster this
        # test may crash.
        schema = subprocess.run(
            [str(PG_BIN / "pg_dump"), "--schema-only", "--no-owner", database_url_of_tests()],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        subprocess.run(
            [str(PG_BIN / "psql"), "-q", "-v", "ON_ERROR_STOP=1", cluster.url],
            input=schema,
            capture_output=True,
            check=True,
            timeout=60,
        )
        copy_rows(database_url_of_tests(), cluster, ["accounts_organisation", "usage_meter"])

        workers = [
            subprocess.Popen(
                [sys.executable, "manage.py", "ingest_worker", "--name", f"w{n}", "--batch", "5"],
                cwd=REPO,
                env=app_env(cluster.url, buffered),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for n in range(2)
        ]
        try:
            keys = 0
            for round_ in range(40):
                events_enqueue(
                    organisation=org,
                    payloads=[event(meter, f"r{round_}-{i}", i) for i in range(1, 51)]
                    # every round resends ten keys of the round before
                    + [event(meter, f"r{round_ - 1}-{i}", i) for i in range(1, 11) if round_],
                )
                keys += 50
                if round_ == 10:
                    cluster.stop("immediate")  # a crash in the middle of the burst
                if round_ == 25:
                    cluster.start()
                time.sleep(0.05)
            deadline = time.monotonic() + 60
            while (buffer_backlog() or group_pending(buffered)) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert buffer_backlog() == 0
        finally:
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            outputs = [worker.communicate(timeout=30) for worker in workers]
        assert [worker.returncode for worker in workers] == [0, 0], outputs
        assert any(
            "connection failures" in out and " 0 connection failures" not in out
            for out, _ in outputs
        ), outputs

        with cluster.connect() as conn:
            count, total, distinct = conn.execute(
                "SELECT count(*), sum(quantity), count(DISTINCT idempotency_key) "
                "FROM usage_usageevent WHERE organisation_id = %s",
                [org.pk],
            ).fetchone()
    assert (count, distinct) == (keys, keys)
    assert total == 40 * sum(range(1, 51))
