"""The ingestion buffer (Redis stream) under load, on a realistically large events table.

    .venv/bin/python bench/buffer.py --events 10000000          # load once (kept), then measure
    .venv/bin/python bench/buffer.py --skip-load                 # measure on the loaded table

It works in one PostgreSQL database (default `meterline_buffer`, kept between runs) and one
Redis database (default redis://127.0.0.1:6379/4, its stream keys deleted before and after).

1. **Load** (unless the table already holds --events rows or --skip-load): migrate, create 1,000
   organisations and the meters api_calls (count), ai_tokens (sum of `tokens`) and storage_gb,
   then bulk-load --events events over October 2026 with `_common.bulk_load_events` (the close
   benchmark's skewed shares: the biggest customer has 5%), indexes rebuilt, VACUUM ANALYZE.
2. **Direct API**: gunicorn (`--config`, default sync:2) without the buffer; batches of 100
   events over --clients keep-alive connections (bench/ingest.py's client), 5% resent keys.
3. **Buffered API**: the same with INGEST_BUFFER=redis and no consumer running: the answers are
   `queued`/`duplicate` and the stream grows.
4. **Drain**: `manage.py ingest_worker --until-empty`, 1 worker then 2 workers, over what the
   buffered phase queued (re-queued for the second run), events/s from first read to empty.
5. **Lag**: buffered API at a fixed rate (--lag-rate events/s) with 2 workers running; for
   sampled events the time from the API's answer to the row being visible in PostgreSQL.
Then SQL checks: every unique key sent is stored exactly once, the token sums match.

`--phases` picks some of direct, buffered, drain and lag (all by default). The buffered API's
speed does not depend on the table's size, so it and the lag can be measured on a small
database, e.g.:

    .venv/bin/python bench/buffer.py --db meterline_buffer_small --skip-load \
        --phases buffered,lag --lag-rate 40000

Without `drain`, what the buffered phase queued is stored (not measured) before the lag phase.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import close
import orjson
import psycopg
import redis
from _common import (
    PYTHON,
    REPO,
    Gunicorn,
    ServerConfig,
    app_environment,
    cpu_delta,
    cpu_snapshot,
    database_url,
    events_table_size,
    machine_busy_seconds,
    machine_info,
    manage,
)
from ingest import (
    KeepAliveClient,
    PhaseResult,
    Plan,
    Request,
    Tally,
    describe,
    http_request,
    plan_batches,
    quiet,
    run_phase,
    warm_up,
)

ROOT = Path(__file__).resolve().parent
STREAM = "bench:events"
ORGANISATIONS = 1_000


def say(text: str = "") -> None:
    print(text, flush=True)


SETUP = """
import json
from accounts.models import Organisation
from accounts.services import api_key_create
from usage.models import Meter
from usage.services import meter_create
if not Meter.objects.filter(code="api_calls").exists():
    meter_create(code="api_calls", spec={"aggregation": "count"})
    meter_create(code="ai_tokens", spec={"aggregation": "sum", "property": "tokens"}, unit="token")
    meter_create(code="storage_gb", spec={"aggregation": "weighted_sum", "property": "gb"})
have = Organisation.objects.filter(slug__startswith="customer-").count()
Organisation.objects.bulk_create(
    [Organisation(name=f"Customer {n:05d}", slug=f"customer-{n:05d}", timezone="UTC",
                  currency="USD") for n in range(have, ORGS)], batch_size=2000)
org = Organisation.objects.get(slug="customer-00000")
print(json.dumps({
    "organisations": list(Organisation.objects.filter(slug__startswith="customer-")
                          .order_by("slug").values_list("pk", flat=True)),
    "meters": dict(Meter.objects.values_list("code", "pk")),
    "api_key": api_key_create(organisation=org, name="bench").secret,
}))
"""


def setup(env: dict[str, str]) -> dict[str, Any]:
    import json

    manage(env, "migrate", "--noinput", timeout=900)
    out = manage(env, "shell", "-c", SETUP.replace("ORGS", str(ORGANISATIONS)))
    return json.loads(out.strip().splitlines()[-1])


def load(db: str, workload: dict[str, Any], events: int) -> None:
    """bench/close.py's loader: its skewed shares (the biggest customer has 5%), October 2026."""
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        have = conn.execute("SELECT count(*) FROM usage_usageevent").fetchone()[0]  # type: ignore[index]
        if have >= events * 0.99:  # the skewed shares round to a few rows less
            say(f"  usage_usageevent already holds {have:,} rows: not loading")
            return
        conn.execute("TRUNCATE usage_usageevent, usage_usageeventkey")
    organisations = workload["organisations"]
    counts = close.event_counts(len(organisations), events, seed=8)
    close.load_events(db, close.Workload(organisations, [], workload["meters"], 0), counts, seed=8)
    close.describe_load(db)


def table_size(db: str) -> str:
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute("SELECT count(*) FROM usage_usageevent").fetchone()[0]  # type: ignore[index]
        heap, total = events_table_size(conn)
    return f"{rows:,} rows, {heap} heap, {total} with indexes"


# --- The phases -----------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    env: dict[str, str]
    buffered_env: dict[str, str]
    api_key: str
    organisation: int
    work: Path
    tally: Tally = field(default_factory=Tally)
    seed: int = 1000
    # Every run's keys carry their own suffix: the database keeps earlier runs' events.
    run: str = field(default_factory=lambda: f"r{int(time.time()) % 10**7}")
    queued: int = 0
    drain_env: dict[str, str] = field(default_factory=dict)

    def plan(self, name: str, events: int, clients: int | None = None) -> Plan:
        self.seed += 1
        return plan_batches(
            name,
            events=events,
            batch_size=self.args.batch,
            clients=clients or self.args.clients,
            dup_fraction=0.05,
            seed=self.seed,
        )

    def serve(self, env: dict[str, str]) -> Gunicorn:
        server = Gunicorn(ServerConfig.parse(self.args.config), env, self.work / "gunicorn.log")
        server.start(self.api_key)
        self.seed += 1
        try:
            warm_up(server, self.api_key, self.tally, f"{self.run}x{self.seed}")
        except BaseException:
            server.stop()
            raise
        return server

    def api_phase(self, server: Gunicorn, name: str, *, redis: bool = False) -> PhaseResult:
        quiet(self.args.quiet_wait)
        plan = self.plan(f"{name}{self.run}", self.args.api_events)
        result = run_phase(server, self.api_key, plan, 120, redis=redis)
        self.tally.add(result)
        for line in describe(result):
            say(line)
        return result


def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def stream_clear(url: str) -> None:
    client = redis_client(url)
    keys = list(client.scan_iter(f"{STREAM}*", count=10_000))
    for offset in range(0, len(keys), 10_000):
        client.delete(*keys[offset : offset + 10_000])


def workers_start(
    env: dict[str, str], count: int, until_empty: bool
) -> list[subprocess.Popen[str]]:
    argv = [PYTHON, "manage.py", "ingest_worker"] + (["--until-empty"] if until_empty else [])
    return [
        subprocess.Popen(  # noqa: S603 - fixed argv
            [*argv, "--name", f"bench-{n}"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(count)
    ]


def workers_stop(workers: list[subprocess.Popen[str]], *, wait: bool = False) -> list[str]:
    """SIGTERM the workers (or, with `wait`, let them finish) and return their summaries."""
    outputs = []
    for worker in workers:
        if worker.poll() is None and not wait:
            worker.send_signal(signal.SIGTERM)
    for worker in workers:
        out, err = worker.communicate(timeout=120)
        outputs.append(out.strip() or err.strip()[-500:])
    return outputs


def database_pids(db: str) -> list[int]:
    """PostgreSQL's processes serving `db`, and its shared ones (WAL writer, checkpointer...):
    other people's test databases share the server, and `postgres_pids()` would count them."""
    with psycopg.connect(database_url(db), autocommit=True, connect_timeout=10) as conn:
        return [
            pid
            for (pid,) in conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE (datname = %s "
                "AND pid <> pg_backend_pid()) OR backend_type NOT IN ('client backend', "
                "'autovacuum worker', 'parallel worker')",
                [db],
            ).fetchall()
        ]


def drain(bench: Bench, workers: int) -> float:
    """Start `workers` consumers on the queued stream; events/s from first entry gone to empty.

    Measured from outside: the stream's length is polled every 50 ms (acknowledged entries are
    deleted), from the first poll that shows a drop to the one that shows none left."""
    client = redis_client(bench.args.redis)
    entries = client.xlen(STREAM)
    queued = bench.queued
    per_entry = queued / entries
    say(f"  {entries:,} entries ({queued:,} events) queued; {workers} worker(s) start")
    quiet(bench.args.quiet_wait)
    procs = workers_start(bench.drain_env, workers, until_empty=True)
    pids = [proc.pid for proc in procs]
    started = time.monotonic()
    busy_before = machine_busy_seconds()
    first: tuple[float, int] | None = None
    cpu_before: dict[int, float] = {}
    deadline = started + 600
    while time.monotonic() < deadline:
        left = client.xlen(STREAM)
        now = time.monotonic()
        if first is None and left < entries:
            first = (now, left)
            cpu_before = cpu_snapshot(pids + database_pids(bench.args.db))
            busy_before = machine_busy_seconds()
        if left == 0:
            break
        time.sleep(0.05)
    done = time.monotonic()
    cpu_after = cpu_snapshot(pids + database_pids(bench.args.db))
    busy = machine_busy_seconds() - busy_before
    cpu_workers = cpu_delta(cpu_before, {p: c for p, c in cpu_after.items() if p in pids})
    cpu_pg = cpu_delta(cpu_before, {p: c for p, c in cpu_after.items() if p not in pids})
    outputs = workers_stop(procs)
    assert first is not None and client.xlen(STREAM) == 0, outputs
    drained = first[1] * per_entry
    elapsed = done - first[0]
    if not drained:
        say("  too few entries to measure: drained in one read (use a larger --api-events)")
        bench.queued = 0
        return 0.0
    rate = drained / elapsed
    say(
        f"  drained {first[1]:,} entries after the first ({drained:,.0f} events) "
        f"in {elapsed:.2f} s: {rate:,.0f} events/s "
        f"(process start to empty: {done - started:.2f} s)"
    )
    other = max(0.0, busy - cpu_workers - cpu_pg)
    say(
        f"  CPU over the drain ({2 * elapsed:.1f} core-s available): ingest_worker "
        f"{cpu_workers:.1f} s, postgres {cpu_pg:.1f} s, everything else {other:.1f} s; per "
        f"1,000 events: worker {cpu_workers / drained * 1e6:.2f} ms, postgres "
        f"{cpu_pg / drained * 1e6:.2f} ms"
    )
    if other > 0.2 * elapsed:
        say(
            f"  WARNING: other processes used {other / elapsed:.2f} of the 2 cores during "
            "the drain: the figure above is understated"
        )
    for out in outputs:
        say(f"    {out}")
    bench.queued = 0
    return rate


def lag_client(
    port: int, api_key: str, requests: list[Request], *, rate: float, go: Any, out: Any
) -> None:
    """Sends one batch every batch/rate seconds (no catching up) and reports each answer's time."""
    wire = [http_request(api_key, request.body) for request in requests]
    markers = [orjson.loads(request.body)["events"][0]["idempotency_key"] for request in requests]
    client = KeepAliveClient(port)
    go.wait(timeout=60)
    interval = requests[0].events / rate
    start = time.monotonic()
    for index, request in enumerate(wire):
        pause = start + index * interval - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        status, _ = client.exchange(request)
        out.put((markers[index], time.monotonic(), status))
    out.put(None)


def lag(bench: Bench, server: Gunicorn, rate: float) -> None:
    args = bench.args
    events = int(rate * args.lag_seconds)
    name = f"lag{bench.run}x{int(rate)}"
    senders_count = args.lag_clients
    plan = plan_batches(
        name,
        events=events,
        batch_size=args.batch,
        clients=senders_count,
        dup_fraction=0,
        seed=7,
    )
    procs = workers_start(bench.buffered_env, 2, until_empty=False)
    time.sleep(3)  # the workers are reading
    ctx = mp.get_context("fork")
    go, out = ctx.Event(), ctx.Queue()
    senders = [
        ctx.Process(
            target=lag_client,
            args=(server.port, bench.api_key, requests),
            kwargs={"rate": rate / senders_count, "go": go, "out": out},
            daemon=True,
        )
        for requests in plan.per_client
    ]
    for sender in senders:
        sender.start()
    answered: dict[str, float] = {}
    seen: dict[str, float] = {}
    errors = 0
    finished = False
    running = senders_count
    go.set()
    began = time.monotonic()
    with psycopg.connect(database_url(args.db), autocommit=True) as conn:
        while time.monotonic() - began < args.lag_seconds + 120:
            while True:
                try:
                    item = out.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    running -= 1
                    finished = running == 0
                    if finished:
                        break
                    continue
                key, at, status = item
                answered[key] = at
                errors += status != 200
            waiting = [key for key in answered if key not in seen]
            if waiting:
                now = time.monotonic()
                for (key,) in conn.execute(
                    # The key guard's row commits with its event: the same visibility, by
                    # its primary key (the partitioned events table has no index on keys).
                    "SELECT idempotency_key FROM usage_usageeventkey "
                    "WHERE organisation_id = %s AND idempotency_key = ANY(%s)",
                    [bench.organisation, waiting],
                ).fetchall():
                    seen[key] = now
            elif finished:
                break
            time.sleep(0.1)
    for sender in senders:
        sender.join(timeout=10)
    outputs = workers_stop(procs)
    lags = sorted(seen[key] - answered[key] for key in seen)
    sent_for = max(answered.values()) - began if answered else 0
    say(
        f"  {len(answered):,} batches ({len(answered) * args.batch:,} events) sent at "
        f"{len(answered) * args.batch / sent_for:,.0f} events/s over {sent_for:.1f} s, "
        f"{errors} errors; 2 ingest_worker processes"
    )
    say(
        f"  answer to visible in PostgreSQL (polled every 0.1 s), per batch: "
        f"p50 {percentile(lags, 0.5):.2f} s, p95 {percentile(lags, 0.95):.2f} s, "
        f"p99 {percentile(lags, 0.99):.2f} s, max {lags[-1]:.2f} s; "
        f"{len(answered) - len(seen)} never seen"
    )
    for output in outputs:
        say(f"    {output}")
    bench.tally.unique[name] = events
    bench.tally.tokens[name] = sum(r.tokens for requests in plan.per_client for r in requests)


def buffered_phases(bench: Bench, rates: dict[str, float]) -> None:
    """The phases on the buffered API (one gunicorn): buffered, drain, lag, as chosen."""
    args, phases = bench.args, bench.args.phases
    server = bench.serve(bench.buffered_env)
    # The warm-up's entries, not measured.
    workers_stop(workers_start(bench.drain_env, 1, until_empty=True), wait=True)
    try:
        if "buffered" in phases:
            say("\n== Buffered API (INGEST_BUFFER=redis, no consumer running)")
            first = bench.api_phase(server, "buffered", redis=True)
            bench.queued = first.totals["accepted"]
            rates["buffered"] = first.events_per_s
        if "drain" in phases:
            say("\n== Drain into PostgreSQL: 1 ingest_worker")
            rates["drain 1"] = drain(bench, 1)
            say("\n== Buffered API again, to queue for 2 workers")
            second = bench.api_phase(server, "buffered2", redis=True)
            bench.queued = second.totals["accepted"]
            rates["buffered"] = max(rates["buffered"], second.events_per_s)
            say("\n== Drain into PostgreSQL: 2 ingest_worker processes")
            rates["drain 2"] = drain(bench, 2)
        elif bench.queued:
            say(f"\n== Storing the {bench.queued:,} queued events (not measured)")
            workers_stop(workers_start(bench.drain_env, 2, until_empty=True), wait=True)
            bench.queued = 0
        for rate in args.lag_rate if "lag" in phases else []:
            say(
                f"\n== Lag: buffered API at {rate:,.0f} events/s for "
                f"{args.lag_seconds:.0f} s, 2 workers running"
            )
            quiet(args.quiet_wait)
            lag(bench, server, rate)
    finally:
        server.stop()


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


def verify_phases(db: str, organisation: int, tally: Tally) -> bool:
    """Each phase's keys (a prefix) stored exactly once, with the tokens sent."""
    ok = True
    with psycopg.connect(database_url(db), autocommit=True) as conn:
        for name, unique in tally.unique.items():
            rows, tokens = conn.execute(
                "SELECT count(*), coalesce(sum(quantity) FILTER (WHERE meter_id = "
                "(SELECT id FROM usage_meter WHERE code = 'ai_tokens')), 0) "
                "FROM usage_usageevent WHERE organisation_id = %s "
                "AND idempotency_key >= %s AND idempotency_key < %s",
                [organisation, f"{name}-", f"{name}."],
            ).fetchone()  # type: ignore[misc]
            phase_ok = rows == unique and int(tokens) == tally.tokens[name]
            ok = ok and phase_ok
            say(
                f"  {name:<10} rows {rows:>9,} / keys sent {unique:>9,}; ai_tokens "
                f"{int(tokens):>13,} / sent {tally.tokens[name]:>13,} "
                f"{'ok' if phase_ok else 'MISMATCH'}"
            )
    return ok


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", default="meterline_buffer")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/4")
    parser.add_argument("--events", type=int, default=10_000_000, help="rows to load first")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--load-only", action="store_true")
    parser.add_argument("--config", default="sync:2", help="gunicorn setup, e.g. sync:2")
    parser.add_argument("--clients", type=int, default=4, help="client connections")
    parser.add_argument("--batch", type=int, default=100, help="events per request")
    parser.add_argument("--api-events", type=int, default=300_000, help="events per API phase")
    parser.add_argument(
        "--lag-rate",
        type=lambda text: [float(rate) for rate in text.split(",")],
        default=[10_000.0, 20_000.0],
        help="events/s sent while measuring the lag, comma-separated",
    )
    parser.add_argument("--lag-seconds", type=float, default=20)
    parser.add_argument(
        "--lag-clients", type=int, default=2, help="sending connections in the lag phase"
    )
    parser.add_argument("--quiet-wait", type=float, default=20, help="wait for an idle machine")
    parser.add_argument(
        "--phases",
        type=_phases,
        default=PHASES,
        help=f"comma-separated, among {','.join(PHASES)} (default: all)",
    )
    return parser.parse_args()


PHASES = ("direct", "buffered", "drain", "lag")


def _phases(text: str) -> tuple[str, ...]:
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    if not chosen or chosen - set(PHASES):
        raise argparse.ArgumentTypeError(f"expected some of {','.join(PHASES)}, got {text!r}")
    if "drain" in chosen and "buffered" not in chosen:
        raise argparse.ArgumentTypeError("drain needs buffered: it drains what that queued")
    return tuple(name for name in PHASES if name in chosen)


def main() -> int:
    args = parse_args()
    say(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    for label, value in machine_info():
        say(f"{label:>18}: {value}")
    env = app_environment(args.db)
    say("\n== Setup")
    workload = setup(env)
    if not args.skip_load:
        load(args.db, workload, args.events)
    say(f"  usage_usageevent: {table_size(args.db)}")
    if args.load_only:
        return 0
    buffered_env = {
        **env,
        "REDIS_URL": args.redis,
        "INGEST_BUFFER": "redis",
        "INGEST_BUFFER_STREAM": STREAM,
    }
    bench = Bench(
        args,
        env,
        buffered_env,
        workload["api_key"],
        workload["organisations"][0],
        Path(tempfile.mkdtemp(prefix="meterline-buffer-")),
    )
    bench.drain_env = {**buffered_env, "INGEST_BUFFER_BLOCK_MS": "100"}
    stream_clear(args.redis)
    rates: dict[str, float] = {}
    try:
        if "direct" in args.phases:
            say(
                f"\n== Direct API (no buffer): {args.api_events:,} events in batches of "
                f"{args.batch}"
            )
            server = bench.serve(env)
            try:
                rates["direct"] = bench.api_phase(server, "direct").events_per_s
            finally:
                server.stop()
        if args.phases != ("direct",):
            buffered_phases(bench, rates)
        say("\n== Verification")
        ok = verify_phases(args.db, bench.organisation, bench.tally)
    finally:
        stream_clear(args.redis)
    say(f"\n  usage_usageevent after: {table_size(args.db)}")
    say("\n== Summary (events/s)")
    for name, rate in rates.items():
        say(f"  {name:<10} {rate:>10,.0f}")
    if ok:
        shutil.rmtree(bench.work, ignore_errors=True)  # gunicorn's log; kept after a failure
    else:
        say(f"  gunicorn's log: {bench.work / 'gunicorn.log'}")
    return 0 if ok else 1


if __name__ == "__main__":
    os.chdir(ROOT.parent)
    sys.exit(main())
