"""Writes of usage: event ingestion (HTTP, in-process, import) and meter creation.

Every path goes through `events_ingest`: one validation, one idempotent insert. An event is
`accepted` (stored now), `duplicate` (its idempotency key was stored before, also by a concurrent
request: the key guard's primary key decides, see `UsageEventKey`) or `rejected` with a
machine-readable code.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import Organisation
from usage.aggregation import EventValueError, MeterSpec, SpecError
from usage.models import Meter, MeterRollup, UsageEvent, UsageEventKey
from usage.selectors import meter_cache_clear, meters_by_code
from usage.signals import StoredEvent, events_stored, events_will_store

MAX_IDEMPOTENCY_KEY_LENGTH = 255
MAX_PROPERTIES_BYTES = 16 * 1024
EVENT_FIELDS = frozenset({"event_name", "idempotency_key", "timestamp", "properties", "quantity"})
# SQLite allows 32,766 parameters in one statement; 500 rows x 8 columns stays far below.
INSERT_CHUNK = 500


class EventRejected(ValueError):  # noqa: N818 - reads as what happened: "event rejected"
    """Raised by `event_record` for an event the API would reject, with the same code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class EventResult:
    """What became of one submitted event."""

    index: int
    status: str  # "accepted", "queued" (in the ingestion buffer), "duplicate" or "rejected"
    idempotency_key: str | None = None
    event_id: int | None = None
    code: str | None = None
    message: str | None = None

    def as_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"index": self.index, "status": self.status}
        if self.idempotency_key is not None:
            result["idempotency_key"] = self.idempotency_key
        if self.event_id is not None:
            result["id"] = self.event_id
        if self.code is not None:
            result["code"] = self.code
            result["message"] = self.message
        return result


@dataclass(slots=True)
class ValidEvent:
    """An event that passed validation: what is stored, whichever path stores it."""

    index: int
    key: str
    meter: Meter
    quantity: Decimal
    properties: dict[str, Any]
    timestamp: datetime


class _Rejection(Exception):  # noqa: N818 - control flow inside this module only
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message


def events_ingest(
    *,
    organisation: Organisation,
    payloads: Sequence[object],
    source: str = UsageEvent.Source.API,
    now: datetime | None = None,
    allow_backdated: bool = False,
) -> list[EventResult]:
    """Validate and store events for `organisation`; return one result per payload, in order.

    Valid events are stored even when others in the same batch are rejected. `allow_backdated`
    lifts the lower bound of the acceptance window (history imports); the upper bound stays.
    """
    now = now or timezone.now()
    checked = events_validate(payloads=payloads, now=now, allow_backdated=allow_backdated)
    return events_store_checked(organisation=organisation, checked=checked, now=now, source=source)


@dataclass(slots=True)
class CheckedBatch:
    """A validated batch: the rejections answered, the events to store, the in-batch repeats."""

    results: list[EventResult | None]  # the rejections; None where the event is valid
    to_store: dict[str, ValidEvent]  # by key, first copy of each key, in submission order
    repeats: list[ValidEvent]  # same key twice in one batch: the later copies are duplicates

    def answer(self, status_of: Mapping[str, tuple[str, int | None]]) -> list[EventResult]:
        """Fill in each valid event's result from {key: (status, id)}; repeats are duplicates."""
        results = self.results
        for key, valid in self.to_store.items():
            status, event_id = status_of[key]
            results[valid.index] = EventResult(valid.index, status, key, event_id)
        for valid in self.repeats:
            _, event_id = status_of[valid.key]
            results[valid.index] = EventResult(valid.index, "duplicate", valid.key, event_id)
        return [result for result in results if result is not None]


def events_validate(
    *, payloads: Sequence[object], now: datetime, allow_backdated: bool = False
) -> CheckedBatch:
    """Check every payload as the API does, without storing anything.

    The one validation of every ingestion path: direct (`events_ingest`) and buffered
    (`usage.buffer.events_enqueue`) answer the same codes for the same events.
    """
    earliest = None if allow_backdated else now - settings.INGEST_MAX_PAST
    latest = now + settings.INGEST_MAX_FUTURE
    meters = meters_by_code(
        payload["event_name"]
        for payload in payloads
        if isinstance(payload, dict) and isinstance(payload.get("event_name"), str)
    )
    checked = CheckedBatch([None] * len(payloads), {}, [])
    for index, payload in enumerate(payloads):
        try:
            valid = _validate(
                index, payload, meters=meters, earliest=earliest, latest=latest, now=now
            )
        except _Rejection as rejection:
            checked.results[index] = EventResult(
                index,
                "rejected",
                _key_of(payload),
                code=rejection.code,
                message=rejection.message,
            )
            continue
        if valid.key in checked.to_store:
            checked.repeats.append(valid)
        else:
            checked.to_store[valid.key] = valid
    return checked


def events_store_checked(
    *, organisation: Organisation, checked: CheckedBatch, now: datetime, source: str
) -> list[EventResult]:
    """Store a validated batch straight into the database; answer `accepted` or `duplicate`."""
    to_store = checked.to_store
    # Inserted in key order: two requests with overlapping keys then take the unique index's
    # locks in the same order and wait for each other instead of deadlocking.
    ordered = sorted(to_store.values(), key=lambda v: v.key)
    # Receivers that write do so in the storing transaction (an outbox row commits with its
    # event); otherwise the insert is one statement, atomic by itself, with no BEGIN and COMMIT.
    shared = transaction.atomic() if _receivers_write(organisation, ordered) else nullcontext()
    with shared:
        stored = _insert(organisation, ordered, now, source)
        _events_stored_send(organisation=organisation, events=ordered, stored=stored)
    already = set(to_store) - stored.keys()
    existing = (
        dict(
            UsageEventKey.objects.filter(
                organisation=organisation, idempotency_key__in=already
            ).values_list("idempotency_key", "event_id")
        )
        if already
        else {}
    )
    status_of: dict[str, tuple[str, int | None]] = {
        key: ("accepted", stored[key]) if key in stored else ("duplicate", existing.get(key))
        for key in to_store
    }
    return checked.answer(status_of)


def _receivers_write(organisation: Organisation, events: Sequence[ValidEvent]) -> bool:
    if not events or not events_will_store.has_listeners(UsageEvent):
        return False
    answers = events_will_store.send(
        sender=UsageEvent,
        organisation=organisation,
        meter_ids=frozenset(event.meter.pk for event in events),
    )
    return any(answer for _, answer in answers)


def _events_stored_send(
    *, organisation: Organisation, events: Sequence[ValidEvent], stored: Mapping[str, int]
) -> None:
    """Send `events_stored` for those of `events` just inserted ({key: id} in `stored`)."""
    if stored and events_stored.has_listeners(UsageEvent):
        events_stored.send(
            sender=UsageEvent,
            organisation=organisation,
            events=[
                StoredEvent(stored[v.key], v.meter, v.timestamp, v.quantity, v.key)
                for v in events
                if v.key in stored
            ],
        )


def _key_of(payload: object) -> str | None:
    if isinstance(payload, dict):
        key = payload.get("idempotency_key")
        if isinstance(key, str) and 0 < len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH:
            return key
    return None


def _validate(
    index: int,
    payload: object,
    *,
    meters: Mapping[str, Meter],
    earliest: datetime | None,
    latest: datetime,
    now: datetime,
) -> ValidEvent:
    if not isinstance(payload, dict):
        raise _Rejection("invalid_event", "An event is a JSON object.")
    if not payload.keys() <= EVENT_FIELDS:  # no set built for the usual, valid event
        unknown = payload.keys() - EVENT_FIELDS
        raise _Rejection(
            "unknown_field",
            f"Unknown fields: {', '.join(sorted(map(str, unknown)))}. "
            f"An event has: {', '.join(sorted(EVENT_FIELDS))}.",
        )

    key = payload.get("idempotency_key")
    if key is None or key == "":
        raise _Rejection("missing_idempotency_key", "idempotency_key is required.")
    if not isinstance(key, str) or len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        raise _Rejection(
            "invalid_idempotency_key",
            f"idempotency_key is a string of 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} characters.",
        )

    event_name = payload.get("event_name")
    if not isinstance(event_name, str) or not event_name:
        raise _Rejection("missing_event_name", "event_name (the meter's code) is required.")
    meter = meters.get(event_name)
    if meter is None:
        raise _Rejection("unknown_meter", f"No meter has the code {event_name[:100]!r}.")

    timestamp = _parse_timestamp(payload.get("timestamp"), now)
    if earliest is not None and timestamp < earliest:
        raise _Rejection(
            "timestamp_out_of_window",
            f"timestamp is more than {settings.INGEST_MAX_PAST.days} days old; "
            "older events enter through `manage.py import_events --allow-backdated`.",
        )
    if timestamp > latest:
        raise _Rejection(
            "timestamp_out_of_window",
            f"timestamp is more than {int(settings.INGEST_MAX_FUTURE.total_seconds())} seconds "
            "in the future.",
        )

    properties = payload.get("properties")
    if properties is None:
        properties = {}
    if not isinstance(properties, dict):
        raise _Rejection("invalid_properties", "properties is a JSON object.")
    if "quantity" in payload:
        if "quantity" in properties:
            raise _Rejection(
                "invalid_properties",
                "quantity is given both at the top level and in properties; give it once.",
            )
        properties = {**properties, "quantity": payload["quantity"]}

    spec = meter.spec
    try:
        quantity = spec.event_quantity(properties)
    except EventValueError as error:
        raise _Rejection(error.code, error.message) from None
    try:
        size = len(orjson.dumps(properties))
    except orjson.JSONEncodeError:
        raise _Rejection(
            "invalid_properties",
            "properties holds a number too large to store (beyond 64-bit integers or doubles); "
            "send it as a string.",
        ) from None
    if size > MAX_PROPERTIES_BYTES:
        raise _Rejection(
            "invalid_properties", f"properties is larger than {MAX_PROPERTIES_BYTES} bytes."
        )
    return ValidEvent(index, key, meter, quantity, properties, timestamp)


def _parse_timestamp(raw: object, now: datetime) -> datetime:
    if raw is None:
        return now
    if not isinstance(raw, str):
        raise _Rejection("invalid_timestamp", "timestamp is an ISO 8601 string with a UTC offset.")
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise _Rejection(
            "invalid_timestamp", "timestamp is an ISO 8601 string with a UTC offset."
        ) from None
    if parsed.tzinfo is None:
        raise _Rejection(
            "invalid_timestamp",
            "timestamp has no UTC offset; add 'Z' or '+00:00' so its instant is unambiguous.",
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise _Rejection("invalid_timestamp", "timestamp is outside years 1 to 9999.") from None


_COLUMNS = (
    "organisation",
    "meter",
    "quantity",
    "properties",
    "timestamp",
    "received_at",
    "idempotency_key",
    "source",
    "delayed",
)


def _columns_sql() -> str:
    meta = UsageEvent._meta
    return ", ".join(
        connection.ops.quote_name(str(meta.get_field(name).column))  # type: ignore[union-attr]
        for name in _COLUMNS
    )


def _insert(
    organisation: Organisation, events: list[ValidEvent], now: datetime, source: str
) -> dict[str, int]:
    """Insert events, skipping keys already stored; return {key: id} of the rows inserted.

    The key is claimed first, in the guard table (`UsageEventKey`) by `INSERT ... ON CONFLICT
    DO NOTHING RETURNING`: its primary key, not a prior read, decides which copy of a key wins,
    so concurrent requests cannot both store one. Only the claimed keys' events are inserted,
    in the same transaction (statement, on PostgreSQL).
    """
    if not events:
        return {}
    if connection.vendor == "postgresql":
        return _insert_postgresql(organisation, events, now, source)
    qn = connection.ops.quote_name
    ops = connection.ops
    received_at = ops.adapt_datetimefield_value(now)
    events_table, keys_table = qn(UsageEvent._meta.db_table), qn(UsageEventKey._meta.db_table)
    row_sql = "(" + ", ".join(["%s"] * len(_COLUMNS)) + ")"
    inserted: dict[str, int] = {}
    with transaction.atomic(), connection.cursor() as cursor:
        for offset in range(0, len(events), INSERT_CHUNK):
            chunk = events[offset : offset + INSERT_CHUNK]
            cursor.execute(
                f"INSERT INTO {keys_table} (organisation_id, idempotency_key, event_id) "  # noqa: S608
                f"VALUES {', '.join(['(%s, %s, 0)'] * len(chunk))} "
                "ON CONFLICT DO NOTHING RETURNING idempotency_key",
                [value for event in chunk for value in (organisation.pk, event.key)],
            )
            claimed = {key for (key,) in cursor.fetchall()}
            rows = [event for event in chunk if event.key in claimed]
            if not rows:
                continue
            params: list[Any] = []
            for event in rows:
                params += [
                    organisation.pk,
                    event.meter.pk,
                    ops.adapt_decimalfield_value(event.quantity),
                    ops.adapt_json_value(event.properties, None),
                    ops.adapt_datetimefield_value(event.timestamp),
                    received_at,
                    event.key,
                    source,
                    now - event.timestamp > settings.INGEST_DELAYED_AFTER,
                ]
            cursor.execute(
                f"INSERT INTO {events_table} ({_columns_sql()}) "  # noqa: S608
                f"VALUES {', '.join([row_sql] * len(rows))} "
                f"RETURNING {qn('idempotency_key')}, {qn('id')}",
                params,
            )
            stored = dict(cursor.fetchall())
            cursor.executemany(
                f"UPDATE {keys_table} SET event_id = %s "  # noqa: S608
                "WHERE organisation_id = %s AND idempotency_key = %s",
                [(event_id, organisation.pk, key) for key, event_id in stored.items()],
            )
            inserted.update(stored)
    return inserted


def _insert_postgresql(
    organisation: Organisation, events: list[ValidEvent], now: datetime, source: str
) -> dict[str, int]:
    """One statement for the whole batch: five arrays unnested, bound by the server.

    Django's cursor binds parameters client-side, quoting every value into the SQL text; a
    1,000-event batch spent more time there than in PostgreSQL. psycopg's own cursor sends the
    arrays in binary. One statement is atomic by itself: no BEGIN/COMMIT round trips.
    """
    qn = connection.ops.quote_name
    sql = (
        # Ids drawn first (the CTE is materialized: one nextval per row), so that the guard row
        # names its event; the events inserted are exactly those whose key was claimed.
        "WITH u AS MATERIALIZED (SELECT nextval(%s::regclass) AS id, m, q, p, t, k "  # noqa: S608
        "FROM unnest(%s::bigint[], %s::numeric[], %s::text[], %s::timestamptz[], %s::text[]) "
        "AS u(m, q, p, t, k)), "
        f"claimed AS (INSERT INTO {qn(UsageEventKey._meta.db_table)} "
        "(organisation_id, idempotency_key, event_id) SELECT %s, k, id FROM u "
        "ON CONFLICT DO NOTHING RETURNING event_id) "
        f"INSERT INTO {qn(UsageEvent._meta.db_table)} (id, {_columns_sql()}) "
        "SELECT u.id, %s, u.m, u.q, u.p::jsonb, u.t, %s, u.k, %s, u.t < %s "
        "FROM u JOIN claimed ON claimed.event_id = u.id "
        f"RETURNING {qn('idempotency_key')}, {qn('id')}"
    )
    params = [
        _id_sequence(),
        [event.meter.pk for event in events],
        [event.quantity for event in events],
        [orjson.dumps(event.properties).decode() for event in events],
        [event.timestamp for event in events],
        [event.key for event in events],
        organisation.pk,
        organisation.pk,
        now,
        source,
        now - settings.INGEST_DELAYED_AFTER,
    ]
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(sql, params)
        return dict(cursor.fetchall())


def _id_sequence() -> str:
    """The events' id sequence (usage migration 0004 made it; PostgreSQL only)."""
    return f"{UsageEvent._meta.db_table}_id_seq"


class ReceiverFailedError(RuntimeError):
    """An `events_stored` receiver raised while queued events were stored: nothing was stored."""


@dataclass(frozen=True, slots=True)
class QueuedEvent:
    """A validated event read back from the ingestion buffer, as text ready for `COPY`."""

    organisation_id: int
    meter_id: int
    quantity: str
    properties: str  # JSON text
    timestamp: str  # ISO 8601 with offset
    idempotency_key: str
    source: str


def events_store_queued(*, events: Sequence[QueuedEvent], now: datetime) -> int:
    """Store events the buffer accepted earlier, skipping keys already stored; return how many
    were inserted. `events_stored` is sent, per organisation, in the storing transaction.

    Events arrive here already validated (by `events_validate`, when the API queued them) and
    may arrive twice (a consumer that died before acknowledging): the key guard decides.
    `now` becomes `received_at`, the moment the event became visible to a period close, not the
    moment it was queued: a close's cutoff assumes that what was received before it has
    committed within BILLING_CUTOFF_SETTLE, which a backlog in the buffer would break.
    """
    if not events:
        return 0
    heard = events_stored.has_listeners(UsageEvent)
    with transaction.atomic():
        if connection.vendor == "postgresql":
            count, inserted = _copy_insert_postgresql(events, now, returning=heard)
        else:
            inserted = _insert_queued_portable(events, now)
            count = len(inserted)
        if inserted and heard:
            try:
                _stored_send_all(inserted)
            except Exception as error:
                # Rolls the events back with the receivers' writes; told apart from a refusal
                # of the events themselves, which the buffer would set aside.
                raise ReceiverFailedError(str(error)) from error
    return count


# (organisation id, key, id, meter id, timestamp, quantity) of each inserted row
_Inserted = tuple[int, str, int, int, datetime, Decimal]

_STAGING = "usage_buffer_staging"


def _copy_insert_postgresql(
    events: Sequence[QueuedEvent], now: datetime, *, returning: bool
) -> tuple[int, list[_Inserted]]:
    """COPY into a temporary staging table, then one INSERT ... ON CONFLICT DO NOTHING.

    The staging table lives as long as the connection (created when missing, so a reconnect
    after a PostgreSQL restart recreates it) and empties itself at each commit. COPY is the
    cheapest way in for thousands of rows; the INSERT keeps the one rule of idempotency.
    The inserted rows are read back only for `events_stored` receivers: parsing them cost the
    consumer more CPU than the COPY.
    """
    meta = UsageEvent._meta
    qn = connection.ops.quote_name
    connection.ensure_connection()
    with connection.wrap_database_errors, connection.connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {_STAGING} (seq integer, organisation_id bigint, "
            "meter_id bigint, quantity numeric, properties text, ts timestamptz, "
            "idempotency_key text, source text) ON COMMIT DELETE ROWS"
        )
        with cursor.copy(
            f"COPY {_STAGING} (seq, organisation_id, meter_id, quantity, properties, ts, "
            "idempotency_key, source) FROM STDIN"
        ) as copy:
            for seq, event in enumerate(events):
                copy.write_row(
                    (
                        seq,
                        event.organisation_id,
                        event.meter_id,
                        event.quantity,
                        event.properties,
                        event.timestamp,
                        event.idempotency_key,
                        event.source,
                    )
                )
        # DISTINCT ON keeps the first queued copy of a key; the order by (organisation, key)
        # takes the guard's locks in the order every other writer takes them. As in
        # `_insert_postgresql`: ids drawn first, the key claimed, the claimed events inserted.
        cursor.execute(
            "WITH u AS MATERIALIZED (SELECT DISTINCT ON (organisation_id, idempotency_key) "  # noqa: S608
            "nextval(%s::regclass) AS id, organisation_id, meter_id, quantity, properties, ts, "
            f"idempotency_key, source FROM {_STAGING} "
            "ORDER BY organisation_id, idempotency_key, seq), "
            f"claimed AS (INSERT INTO {qn(UsageEventKey._meta.db_table)} "
            "(organisation_id, idempotency_key, event_id) "
            "SELECT organisation_id, idempotency_key, id FROM u "
            "ON CONFLICT DO NOTHING RETURNING event_id) "
            f"INSERT INTO {qn(meta.db_table)} (id, {_columns_sql()}) "
            "SELECT u.id, organisation_id, meter_id, quantity, properties::jsonb, ts, %s, "
            "idempotency_key, source, ts < %s FROM u JOIN claimed ON claimed.event_id = u.id "
            + (
                f"RETURNING {qn('organisation_id')}, {qn('idempotency_key')}, {qn('id')}, "
                f"{qn('meter_id')}, {qn('timestamp')}, {qn('quantity')}"
                if returning
                else ""
            ),
            [_id_sequence(), now, now - settings.INGEST_DELAYED_AFTER],
        )
        rows: list[_Inserted] = cursor.fetchall() if returning else []
        return cursor.rowcount, rows


def _insert_queued_portable(events: Sequence[QueuedEvent], now: datetime) -> list[_Inserted]:
    """The normal insert path (`_insert`), per organisation: SQLite has no COPY."""
    meters = Meter.objects.in_bulk({event.meter_id for event in events})
    by_organisation: dict[int, dict[str, ValidEvent]] = {}
    sources: dict[int, str] = {}
    for index, event in enumerate(events):
        batch = by_organisation.setdefault(event.organisation_id, {})
        sources.setdefault(event.organisation_id, event.source)
        if event.idempotency_key not in batch:
            batch[event.idempotency_key] = ValidEvent(
                index,
                event.idempotency_key,
                meters[event.meter_id],
                Decimal(event.quantity),
                orjson.loads(event.properties),
                datetime.fromisoformat(event.timestamp),
            )
    inserted: list[_Inserted] = []
    for organisation_id in sorted(by_organisation):
        ordered = sorted(by_organisation[organisation_id].values(), key=lambda v: v.key)
        stored = _insert(Organisation(pk=organisation_id), ordered, now, sources[organisation_id])
        inserted += [
            (organisation_id, v.key, stored[v.key], v.meter.pk, v.timestamp, v.quantity)
            for v in ordered
            if v.key in stored
        ]
    return inserted


def _stored_send_all(inserted: list[_Inserted]) -> None:
    organisations = Organisation.objects.in_bulk({row[0] for row in inserted})
    meters = Meter.objects.in_bulk({row[3] for row in inserted})
    by_organisation: dict[int, list[StoredEvent]] = {}
    for organisation_id, key, event_id, meter_id, timestamp, quantity in sorted(inserted):
        by_organisation.setdefault(organisation_id, []).append(
            StoredEvent(event_id, meters[meter_id], timestamp, quantity, key)
        )
    for organisation_id, stored in by_organisation.items():
        events_stored.send(
            sender=UsageEvent, organisation=organisations[organisation_id], events=stored
        )


def event_record(
    *,
    organisation: Organisation,
    event_name: str,
    idempotency_key: str,
    quantity: Decimal | int | str | None = None,
    properties: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
    source: str = UsageEvent.Source.RECORD,
) -> EventResult:
    """Record one event in-process, with the API's validation and idempotency.

    Returns the `accepted` or `duplicate` result; raises EventRejected with the API's code.
    """
    payload: dict[str, Any] = {"event_name": event_name, "idempotency_key": idempotency_key}
    payload["properties"] = dict(properties or {})
    if quantity is not None:
        payload["quantity"] = str(quantity) if isinstance(quantity, Decimal) else quantity
    if timestamp is not None:
        if timestamp.tzinfo is None:
            raise EventRejected("invalid_timestamp", "timestamp must be timezone-aware.")
        payload["timestamp"] = timestamp.isoformat()
    [result] = events_ingest(organisation=organisation, payloads=[payload], source=source)
    if result.status == "rejected":
        raise EventRejected(result.code or "rejected", result.message or "")
    return result


def meter_create(
    *, code: str, spec: Mapping[str, Any], name: str = "", unit: str = "unit", description: str = ""
) -> Meter:
    """Create a meter from its spec document; raise ValidationError for a bad spec."""
    try:
        parsed = MeterSpec.from_json(spec)
    except SpecError as exc:
        raise ValidationError({"spec": str(exc)}) from exc
    meter = Meter(
        code=code,
        name=name or code.replace("_", " ").capitalize(),
        unit=unit,
        aggregation=parsed.aggregation.value,
        property_name=parsed.property or "",
        filters={key: list(values) for key, values in parsed.filters.items()},
        description=description,
    )
    meter.full_clean()
    with transaction.atomic():
        meter.save()
        # A new meter has no events: its (empty) buckets are current from the start.
        MeterRollup.objects.create(meter=meter, spec=meter.spec_document())
    meter_cache_clear()
    return meter
