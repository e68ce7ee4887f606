"""The ingestion buffer: a Redis stream between the HTTP API and the events table.

With `INGEST_BUFFER=redis`, `events_enqueue` validates a request's events (`events_validate`,
the one validation of every path) and, in one Lua script, appends the new ones to the stream as
one entry and remembers their keys for INGEST_BUFFER_SEEN_TTL: a key seen before is answered
`duplicate`, the others `queued`. Consumers (`manage.py ingest_worker`, the django-q2 task) read
entries in a consumer group, store them with `events_store_queued` (COPY into a staging table,
INSERT ... ON CONFLICT DO NOTHING) and acknowledge and delete them only after the commit. An
entry whose consumer died stays pending and is claimed by another after INGEST_BUFFER_CLAIM_IDLE.
So: at least once into Redis, exactly once into the events table, whose key guard
(`UsageEventKey`) stays the final word on duplicates.

When Redis cannot be reached, the request is stored straight into the database (`accepted`),
as without the buffer: nothing is refused, and a key queued before the outage and sent again
during it is still stored once.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis
from django.conf import settings
from django.db import DatabaseError, InterfaceError, OperationalError, connection
from django.utils import timezone

from accounts.models import Organisation
from usage.models import UsageEvent
from usage.services import (
    EventResult,
    QueuedEvent,
    ReceiverFailedError,
    events_store_checked,
    events_store_queued,
    events_validate,
)

logger = logging.getLogger(__name__)

# Appends the batch's new events as one stream entry, then remembers their keys. In this order,
# a script stopped half-way (it cannot be, short of a crash) would leave events queued but not
# remembered (stored once anyway), never remembered but not queued (lost). The shebang makes
# Redis refuse the whole script up front when it is out of memory.
# KEYS[1]: the stream. ARGV: TTL seconds, organisation id, source, the "seen" keys' prefix, the
# idempotency keys as a JSON array, the events' JSON texts joined by commas and, as a JSON array,
# the offset after each event. Seven arguments whatever the batch's size: redis-py packs each
# argument in Python, and 200 of them cost more than the script. The "seen" keys are built from
# the prefix, so the stream and its keys must live on one Redis server (not a cluster's shards).
# Returns one character per event, "1" (queued) or "0" (seen before): one string is cheaper for
# redis-py to read than a hundred integers. The "seen" keys are read with MGET, a few hundred at a
# time (Lua's unpack() has a limit), not one EXISTS each: every redis.call() costs Redis about as
# much as the command itself. A "seen" key only ever holds "1", so MGET's nil means what EXISTS's
# 0 meant. The new events are cut out in runs of neighbours, not one by one: a batch with a few
# repeats is a few runs. Sent by its SHA1 (EVALSHA): Redis does not hash its text every time.
_ENQUEUE = """#!lua
local keys = cjson.decode(ARGV[5])
local ends = cjson.decode(ARGV[7])
local events = ARGV[6]
local seen = {}
for i = 1, #keys do
  seen[i] = ARGV[4] .. keys[i]
end
local found = {}
for first = 1, #seen, 500 do
  local values = redis.call('MGET', unpack(seen, first, math.min(first + 499, #seen)))
  for j = 1, #values do
    found[first + j - 1] = values[j]
  end
end
local runs, flags = {}, {}
local start, run = 1, nil
for i = 1, #keys do
  if not found[i] then
    flags[i] = '1'
    run = run or start
  else
    flags[i] = '0'
    if run then
      runs[#runs + 1] = string.sub(events, run, start - 2)
      run = nil
    end
  end
  start = ends[i] + 1
end
if run then
  runs[#runs + 1] = string.sub(events, run)
end
if #runs > 0 then
  redis.call('XADD', KEYS[1], '*', 'o', ARGV[2], 's', ARGV[3],
             'e', '[' .. table.concat(runs, ',') .. ']')
  for i = 1, #keys do
    if flags[i] == '1' then
      redis.call('SET', seen[i], '1', 'EX', ARGV[1])
    end
  end
end
return table.concat(flags)
"""

_ENQUEUE_SHA1 = hashlib.sha1(_ENQUEUE.encode(), usedforsecurity=False).hexdigest()

_clients: dict[str, redis.Redis] = {}
# After a failure, this process writes straight to the database for a few seconds instead of
# paying a connection timeout on every request.
_redis_down_until = 0.0
REDIS_RETRY_SECONDS = 2.0


def buffer_enabled() -> bool:
    return bool(settings.INGEST_BUFFER == "redis")


def redis_client() -> redis.Redis:
    """A client per process (redis-py pools its connections), with short timeouts."""
    url = settings.REDIS_URL
    client = _clients.get(url)
    if client is None:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=1,
            # Above the consumers' blocking read (INGEST_BUFFER_BLOCK_MS).
            socket_timeout=10,
            health_check_interval=30,
        )
        _clients[url] = client
    return client


def _enqueue_script(client: redis.Redis, stream: str, *args: bytes | str | int) -> Any:
    """Run the enqueue script by its SHA1, or by its text when Redis does not know it (after
    a restart or SCRIPT FLUSH; EVAL also puts it back in Redis's script cache)."""
    try:
        return client.evalsha(_ENQUEUE_SHA1, 1, stream, *args)
    except redis.exceptions.NoScriptError:
        return client.eval(_ENQUEUE, 1, stream, *args)


def _timestamp(moment: datetime) -> datetime | str:
    """`moment` as orjson may write it: itself in UTC, its isoformat() otherwise.

    orjson writes a UTC datetime exactly as isoformat() does, at a quarter of the cost, but
    rounds an offset with seconds (a `now` given in such a zone) to the minute.
    """
    return moment if moment.tzinfo is UTC else moment.isoformat()


def _seen_key(organisation_id: int, key: str) -> str:
    return f"{settings.INGEST_BUFFER_STREAM}:seen:{organisation_id}:{key}"


def events_enqueue(
    *, organisation: Organisation, payloads: Sequence[object], now: datetime | None = None
) -> list[EventResult]:
    """Validate events and queue the new ones in the buffer; one result per payload, in order.

    Valid events are answered `queued`, or `duplicate` when their key was queued before (within
    INGEST_BUFFER_SEEN_TTL). When Redis is unreachable they are stored directly (`accepted`).
    """
    global _redis_down_until  # noqa: PLW0603 - a per-process circuit breaker
    now = now or timezone.now()
    checked = events_validate(payloads=payloads, now=now)
    source = UsageEvent.Source.API
    if not checked.to_store:
        return checked.answer({})
    if time.monotonic() < _redis_down_until:
        return events_store_checked(
            organisation=organisation, checked=checked, now=now, source=source
        )
    keys = list(checked.to_store)
    events = [
        orjson.dumps([v.meter.id, str(v.quantity), v.properties, _timestamp(v.timestamp), v.key])
        for v in checked.to_store.values()
    ]
    ends = list(itertools.accumulate(len(event) + 1 for event in events))  # + 1: the comma
    try:
        flags = _enqueue_script(
            redis_client(),
            settings.INGEST_BUFFER_STREAM,
            int(settings.INGEST_BUFFER_SEEN_TTL.total_seconds()),
            organisation.pk,
            source,
            _seen_key(organisation.pk, ""),
            orjson.dumps(keys),
            b",".join(events),
            orjson.dumps(ends),
        )
    except redis.RedisError:
        # Whether the script ran is unknown: storing directly is safe either way (the unique
        # constraint keeps one copy).
        logger.exception("ingestion buffer unreachable; storing %d events directly", len(keys))
        _redis_down_until = time.monotonic() + REDIS_RETRY_SECONDS
        return events_store_checked(
            organisation=organisation, checked=checked, now=now, source=source
        )
    return checked.answer(
        {
            key: _QUEUED if flag == 49 else _DUPLICATE  # 49: b"1"
            for key, flag in zip(keys, flags, strict=True)
        }
    )


_QUEUED, _DUPLICATE = ("queued", None), ("duplicate", None)


# --- Consumers ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drained:
    """What one `buffer_drain` call did."""

    entries: int
    events: int
    inserted: int
    dead: int = 0
    oldest_ms: int | None = None  # when the oldest entry drained was queued (epoch ms)


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _group_ensure(client: redis.Redis) -> None:
    try:
        # From the stream's first entry: what was queued before any consumer existed is read too.
        client.xgroup_create(
            settings.INGEST_BUFFER_STREAM, settings.INGEST_BUFFER_GROUP, id="0", mkstream=True
        )
    except redis.ResponseError as error:
        if "BUSYGROUP" not in str(error):
            raise


def _read(client: redis.Redis, consumer: str, count: int, block_ms: int) -> list[Any]:
    """This consumer's own unacknowledged entries first, then dead consumers', then new ones."""
    stream, group = settings.INGEST_BUFFER_STREAM, settings.INGEST_BUFFER_GROUP
    mine: Any
    try:
        mine = client.xreadgroup(group, consumer, {stream: "0"}, count=count)
    except redis.ResponseError as error:
        if "NOGROUP" not in str(error):
            raise
        _group_ensure(client)  # a Redis that lost its data (no append-only file)
        mine = client.xreadgroup(group, consumer, {stream: "0"}, count=count)
    entries = mine[0][1] if mine else []
    if entries:
        return entries
    idle_ms = int(settings.INGEST_BUFFER_CLAIM_IDLE.total_seconds() * 1000)
    claimed: Any = client.xautoclaim(stream, group, consumer, idle_ms, "0-0", count=count)
    if claimed[1]:
        return list(claimed[1])
    new: Any = client.xreadgroup(
        group, consumer, {stream: ">"}, count=count, block=block_ms or None
    )
    return new[0][1] if new else []


def _decode(fields: dict[bytes, bytes]) -> list[QueuedEvent]:
    organisation_id = int(fields[b"o"])
    source = fields[b"s"].decode()
    return [
        QueuedEvent(
            organisation_id,
            int(meter_id),
            quantity,
            orjson.dumps(properties).decode(),
            timestamp,
            key,
            source,
        )
        for meter_id, quantity, properties, timestamp, key in orjson.loads(fields[b"e"])
    ]


def buffer_drain(*, consumer: str, count: int | None = None, block_ms: int = 0) -> Drained:
    """Read one batch of entries, store their events, then acknowledge and delete the entries.

    An entry that cannot be stored by itself (undecodable, or refused by the database for a
    reason other than a lost connection) is moved to the `<stream>:dead` stream with the error,
    so that it blocks nothing. A lost connection, or an `events_stored` receiver that raised,
    raises here, leaving the batch pending: the events are fine, and are stored on a later try.
    """
    client = redis_client()
    count = count or settings.INGEST_BUFFER_BATCH
    entries = _read(client, consumer, count, block_ms)
    if not entries:
        return Drained(0, 0, 0)
    decoded: list[tuple[bytes, list[QueuedEvent] | None, str]] = []
    for entry_id, fields in entries:
        if not fields:  # deleted but still pending: acknowledged below, nothing to store
            decoded.append((entry_id, [], ""))
            continue
        try:
            decoded.append((entry_id, _decode(fields), ""))
        except (KeyError, ValueError, TypeError) as error:  # orjson errors are ValueErrors
            decoded.append((entry_id, None, f"undecodable: {error!r}"))
    events = [event for _, batch, _ in decoded if batch for event in batch]
    dead: list[tuple[bytes, str]] = [
        (entry_id, why) for entry_id, batch, why in decoded if batch is None
    ]
    try:
        inserted = events_store_queued(events=events, now=timezone.now())
    except (OperationalError, InterfaceError, ReceiverFailedError):
        raise
    except DatabaseError:
        # One bad entry must not hold the others back: store them one by one.
        inserted = 0
        for entry_id, batch, _ in decoded:
            if batch is None:
                continue
            try:
                inserted += events_store_queued(events=batch, now=timezone.now())
            except (OperationalError, InterfaceError, ReceiverFailedError):
                raise
            except DatabaseError as error:
                dead.append((entry_id, f"refused by the database: {error}"))
    ids = [entry_id for entry_id, _ in entries]
    stream = settings.INGEST_BUFFER_STREAM
    with client.pipeline(transaction=True) as pipe:
        for entry_id, why in dead:
            original: dict[Any, Any] = dict(next(f for i, f in entries if i == entry_id))
            pipe.xadd(f"{stream}:dead", {**original, b"id": entry_id, b"error": why.encode()})
        pipe.xack(stream, settings.INGEST_BUFFER_GROUP, *ids)
        pipe.xdel(stream, *ids)
        pipe.execute()
    for entry_id, why in dead:
        logger.error("ingestion buffer: entry %s moved to %s:dead, %s", entry_id, stream, why)
    oldest = min(int(entry_id.split(b"-")[0]) for entry_id in ids)
    return Drained(len(entries), len(events), inserted, len(dead), oldest)


def buffer_requeue_dead() -> int:
    """Put the entries set aside in `<stream>:dead` back in the stream; return how many.

    For after the cause is fixed. Each entry moves in one MULTI (appended, then removed from
    the dead stream); one stored meanwhile by other means is skipped by the key guard.
    """
    client = redis_client()
    stream = settings.INGEST_BUFFER_STREAM
    moved = 0
    dead: Any = client.xrange(f"{stream}:dead")
    for entry_id, fields in dead:
        original: dict[Any, Any] = {n: fields[n] for n in (b"o", b"s", b"e") if n in fields}
        with client.pipeline(transaction=True) as pipe:
            pipe.xadd(stream, original)
            pipe.xdel(f"{stream}:dead", entry_id)
            pipe.execute()
        moved += 1
    return moved


def buffer_backlog() -> int:
    """Entries in the stream: queued or being stored (acknowledged entries are deleted)."""
    return int(redis_client().xlen(settings.INGEST_BUFFER_STREAM))


@dataclass(slots=True)
class ConsumeTotals:
    batches: int = 0
    events: int = 0
    inserted: int = 0
    dead: int = 0
    failures: int = 0


def buffer_consume(
    *,
    consumer: str,
    should_stop: Callable[[], bool],
    until_empty: bool = False,
    count: int | None = None,
    on_batch: Callable[[Drained], None] | None = None,
) -> ConsumeTotals:
    """Drain batches until `should_stop()` (checked between batches) or, with `until_empty`,
    until a read finds nothing. A lost Redis or database connection, or any other failure (an
    `events_stored` receiver's bug), is logged and retried with a pause growing to 5 s; the
    batch in hand stays pending and is re-read first. Queued events wait in Redis, never
    dropped, until they can be stored."""
    client = redis_client()
    totals = ConsumeTotals()
    pause = 0.1
    group_ready = False
    while not should_stop():
        try:
            if not group_ready:
                _group_ensure(client)
                group_ready = True
            drained = buffer_drain(
                consumer=consumer, count=count, block_ms=settings.INGEST_BUFFER_BLOCK_MS
            )
        except (
            redis.ConnectionError,
            redis.TimeoutError,
            OperationalError,
            InterfaceError,
        ) as error:
            totals.failures += 1
            logger.warning("ingestion buffer: %s; retrying in %.1f s", error, pause)
            # A connection broken by a database restart is not reused.
            connection.close()
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
            continue
        except Exception:
            totals.failures += 1
            logger.exception("ingestion buffer: storing failed; retrying in %.1f s", pause)
            time.sleep(pause)
            pause = min(pause * 2, 5.0)
            continue
        pause = 0.1
        if drained.entries:
            totals.batches += 1
            totals.events += drained.events
            totals.inserted += drained.inserted
            totals.dead += drained.dead
            if on_batch:
                on_batch(drained)
        elif until_empty:
            break
    _consumer_forget(client, consumer)
    return totals


def _consumer_forget(client: redis.Redis, consumer: str) -> None:
    """Remove this consumer from the group if it holds nothing, so names do not pile up."""
    stream, group = settings.INGEST_BUFFER_STREAM, settings.INGEST_BUFFER_GROUP
    try:
        pending = client.xpending_range(stream, group, "-", "+", 1, consumername=consumer)
        if not pending:
            client.xgroup_delconsumer(stream, group, consumer)
    except redis.RedisError:
        pass
