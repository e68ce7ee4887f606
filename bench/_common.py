"""Shared helpers for the benchmarks: the machine, a scratch PostgreSQL database, manage.py and
gunicorn. Everything here talks to 127.0.0.1 only, and every wait is bounded in time."""

from __future__ import annotations

import datetime as dt
import http.client
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
PYTHON = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
HOST = "127.0.0.1"
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# --- The machine ----------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return 0.0


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],  # noqa: S607
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (+ uncommitted changes)" if dirty else "")


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine_info() -> list[tuple[str, str]]:
    """(label, value) pairs describing where the figures were measured."""
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        pg_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        settings = dict(
            conn.execute(
                "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)",
                (["shared_buffers", "synchronous_commit", "fsync", "max_wal_size"],),
            ).fetchall()
        )
    load1, load5, _ = os.getloadavg()
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("cpu", f"{_cpu_model()}, {os.cpu_count()} logical cores"),
        ("ram", f"{_mem_total_gib():.1f} GiB"),
        ("os", f"{platform.system()} {platform.release()}"),
        ("load avg at start", f"{load1:.2f} (1 min), {load5:.2f} (5 min)"),
        (
            "postgresql",
            f"{pg_version} (shared_buffers={settings.get('shared_buffers')}, "
            f"synchronous_commit={settings.get('synchronous_commit')}, "
            f"fsync={settings.get('fsync')})",
        ),
        ("python", f"{platform.python_implementation()} {platform.python_version()}"),
        (
            "packages",
            ", ".join(
                f"{name} {_package_version(name)}"
                for name in ("Django", "django-ninja", "pydantic", "gunicorn", "psycopg", "orjson")
            ),
        ),
        ("repo", f"{REPO} @ {_git_revision()}"),
    ]


# --- A scratch database ---------------------------------------------------------------------------


def database_url(name: str) -> str:
    return f"postgres://postgres@127.0.0.1:5432/{name}"


def database_recreate(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def database_drop(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def app_environment(db_name: str) -> dict[str, str]:
    """The environment of a production-like Meterline on `db_name` (DEBUG off, no TLS redirect)."""
    env = dict(os.environ)
    for key in ("REDIS_URL", "EMAIL_URL", "DJANGO_SETTINGS_MODULE"):
        env.pop(key, None)
    env.update(
        DATABASE_URL=database_url(db_name),
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(48),  # 64 characters
        DJANGO_SECURE_SSL_REDIRECT="false",
        DJANGO_ALLOWED_HOSTS=HOST,
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def manage(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    """Run `manage.py ARGS` and return its stdout; raise with its output when it fails."""
    done = subprocess.run(  # noqa: S603 - fixed argv
        [PYTHON, "manage.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"manage.py {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    return done.stdout


# --- gunicorn -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerConfig:
    """A gunicorn setup: `sync:3` (3 sync workers) or `gthread:2x4` (2 workers, 4 threads)."""

    worker_class: str
    workers: int
    threads: int = 1

    @classmethod
    def parse(cls, text: str) -> ServerConfig:
        kind, _, shape = text.strip().partition(":")
        if kind not in {"sync", "gthread"} or not shape:
            raise ValueError(f"{text!r}: expected sync:N or gthread:NxT")
        if kind == "sync":
            return cls("sync", int(shape))
        workers, _, threads = shape.partition("x")
        return cls("gthread", int(workers), int(threads or 1))

    def __str__(self) -> str:
        if self.worker_class == "sync":
            return f"sync:{self.workers}"
        return f"gthread:{self.workers}x{self.threads}"

    def describe(self) -> str:
        if self.worker_class == "sync":
            return f"gunicorn, {self.workers} sync workers"
        return f"gunicorn, {self.workers} gthread workers x {self.threads} threads"


@dataclass
class Gunicorn:
    """One gunicorn master started by us, with its log file; `stop()` ends it and its workers."""

    config: ServerConfig
    env: dict[str, str]
    log_path: Path
    app: str = "billing_site.wsgi"
    extra_args: list[str] = field(default_factory=list)
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            str(VENV_BIN / "gunicorn"),
            self.app,
            "-b",
            f"{HOST}:{self.port}",
            "-w",
            str(self.config.workers),
            "-k",
            self.config.worker_class,
            "--threads",
            str(self.config.threads),
            "--timeout",
            "120",
            "--keep-alive",
            "5",
            "--log-level",
            "warning",
            *self.extra_args,
        ]

    def start(self, api_key: str, timeout: float = 60) -> None:
        self.port = free_port()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv
            self.argv(), cwd=REPO, env=self.env, stdout=log, stderr=log
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.process.returncode}; see {self.log_path}"
                )
            if self._answers(api_key):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer within {timeout:.0f} s; see {self.log_path}")

    def _answers(self, api_key: str) -> bool:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request("GET", "/api/v1/meters", headers={"Authorization": f"Bearer {api_key}"})
            response = conn.getresponse()
            response.read()
        except OSError:
            return False
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(
                f"GET /api/v1/meters answered {response.status}; see {self.log_path}"
            )
        return True

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def stop(self, timeout: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the given processes so far (0 for those gone)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _pids_named(name: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (backends, WAL writer, checkpointer)."""
    return _pids_named("postgres")


def redis_pids() -> list[int]:
    """The Redis server's process(es) on this machine (shared: other people's databases too)."""
    return _pids_named("redis-server")


def cpu_snapshot(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds([pid]) for pid in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds spent between two snapshots by the processes alive at the second one."""
    return sum(max(0.0, seconds - before.get(pid, 0.0)) for pid, seconds in after.items())


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent busy (not idle, not waiting for I/O) since boot."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_seconds: float, threshold: float = 0.25) -> tuple[bool, float]:
    """Wait (at most `max_seconds`) until the whole machine is busy less than `threshold` cores
    over one second; other people's test runs share these 2 cores. Returns (quiet, waited)."""
    start = time.monotonic()
    while True:
        before = machine_busy_seconds()
        time.sleep(1.0)
        if machine_busy_seconds() - before < threshold:
            return True, time.monotonic() - start
        if time.monotonic() - start >= max_seconds:
            return False, time.monotonic() - start


@dataclass
class LoadTimes:
    inserted: int
    insert_seconds: float
    indexes: int
    rebuild_seconds: float


def bulk_load_events(
    conn: psycopg.Connection[Any],
    plan: list[tuple[int, int, str, int]],
    *,
    timestamp_sql: str,
    params: dict[str, Any],
    seed: float,
    key_prefix: str = "",
) -> LoadTimes:
    """Insert synthetic usage events fast, the way ingestion would store them (in time order).

    `plan` rows are (organisation id, meter id, meter code, count) for the meters api_calls,
    ai_tokens and storage_gb; `timestamp_sql` is the SQL expression that draws each event's
    timestamp (it may use random() and `params`). The table's unique constraints and secondary
    indexes (and the key guard's primary key) are dropped during the insert and rebuilt after,
    and foreign key triggers skipped (session_replication_role = replica; the ids are known to
    exist); the keys (`key_prefix` + meter code + "-" + n) are claimed in the guard as
    ingestion would. Columns not named here
    (`delayed`) take their database defaults. `conn` must be in autocommit mode.
    """
    conn.execute("SET maintenance_work_mem = '512MB'")
    conn.execute("SET session_replication_role = replica")
    conn.execute("CREATE TEMP TABLE bench_plan (org bigint, meter bigint, code text, n int)")
    with conn.cursor() as cursor, cursor.copy("COPY bench_plan FROM STDIN") as copy:
        for row in plan:
            copy.write_row(row)
    indexes = conn.execute(
        """
        SELECT c.conname, pg_get_constraintdef(c.oid), NULL FROM pg_constraint c
         WHERE c.conrelid = 'usage_usageevent'::regclass AND c.contype = 'u'
        UNION ALL
        SELECT i.indexrelid::regclass::text, NULL, pg_get_indexdef(i.indexrelid)
          FROM pg_index i
         WHERE i.indrelid = 'usage_usageevent'::regclass AND NOT i.indisprimary
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = i.indexrelid)
        """
    ).fetchall()
    for name, constraint, _ in indexes:
        if constraint:
            conn.execute(f'ALTER TABLE usage_usageevent DROP CONSTRAINT "{name}"')
        else:
            conn.execute(f"DROP INDEX {name}")
    conn.execute("SELECT setseed(%s)", [seed])
    first_id = conn.execute("SELECT coalesce(max(id), 0) FROM usage_usageevent").fetchone()[0]  # type: ignore[index]
    conn.execute("ALTER TABLE usage_usageeventkey DROP CONSTRAINT usage_usageeventkey_pkey")
    began = time.perf_counter()
    # Quantities and properties as the API stores them: count events carry 1; sums and levels
    # carry the property's value (ai_tokens: integer tokens, storage_gb: 3 places).
    statement = """
        INSERT INTO usage_usageevent (organisation_id, meter_id, quantity, properties,
                                      "timestamp", received_at, idempotency_key, source)
        SELECT org, meter, q,
               CASE code
                 WHEN 'api_calls' THEN jsonb_build_object('endpoint', endpoint)
                 WHEN 'ai_tokens' THEN jsonb_build_object('tokens', q, 'model', 'medium')
                 ELSE jsonb_build_object('gb', q)
               END,
               ts, ts, %(key_prefix)s || code || '-' || i, 'import'
          FROM (SELECT p.org, p.meter, p.code, g.i, TIMESTAMP_SQL AS ts,
                       CASE p.code
                         WHEN 'api_calls' THEN 1::numeric
                         WHEN 'ai_tokens' THEN (1 + floor(random() * 4000))::numeric
                         ELSE round((random() * 500)::numeric, 3)
                       END AS q,
                       (ARRAY['/v1/search', '/v1/items', '/v1/export'])[
                         1 + floor(random() * 3)::int] AS endpoint
                  FROM bench_plan p, generate_series(1, p.n) AS g(i)) s
         ORDER BY ts
    """.replace("TIMESTAMP_SQL", timestamp_sql)
    inserted = conn.execute(statement, {**params, "key_prefix": key_prefix}).rowcount  # type: ignore[arg-type]
    # Their keys, as ingestion claims them (usage.models.UsageEventKey).
    conn.execute(
        "INSERT INTO usage_usageeventkey (organisation_id, idempotency_key, event_id) "
        "SELECT organisation_id, idempotency_key, id FROM usage_usageevent WHERE id > %s",
        [first_id],
    )
    insert_seconds = time.perf_counter() - began
    began = time.perf_counter()
    for name, constraint, definition in indexes:
        if constraint:
            conn.execute(f'ALTER TABLE usage_usageevent ADD CONSTRAINT "{name}" {constraint}')
        else:
            # A partitioned table's index definition reads "ON ONLY": without it, the index is
            # built on every partition too.
            conn.execute(definition.replace(" ON ONLY ", " ON ", 1))
    conn.execute(
        "ALTER TABLE usage_usageeventkey ADD CONSTRAINT usage_usageeventkey_pkey "
        "PRIMARY KEY (organisation_id, idempotency_key)"
    )
    conn.execute("SET session_replication_role = DEFAULT")
    return LoadTimes(inserted, insert_seconds, len(indexes), time.perf_counter() - began)


def events_table_size(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    """(heap, heap with indexes) of the events table, all its partitions included."""
    row = conn.execute(
        "SELECT pg_size_pretty(sum(pg_relation_size(relid))), "
        "pg_size_pretty(sum(pg_total_relation_size(relid))) "
        "FROM pg_partition_tree('usage_usageevent')"
    ).fetchone()
    assert row is not None
    return row[0], row[1]


# --- The benchmarks' meters and plan --------------------------------------------------------------

BASE_FEE = Decimal("49")
# One price of each common kind, on the three meters every benchmark loads.
PRICES: dict[str, dict[str, Any]] = {
    "api_calls": {
        "model": "graduated",
        "tiers": [
            {"up_to": "1000", "unit_price": "0", "flat_fee": "0"},
            {"up_to": "50000", "unit_price": "0.0005"},
            {"up_to": None, "unit_price": "0.0002"},
        ],
    },
    "ai_tokens": {"model": "standard", "unit_price": "0.000002"},
    "storage_gb": {
        "model": "package",
        "package_size": "10",
        "package_price": "2.5",
        "free_units": "5",
        "rounding": "up",
    },
}


def bench_catalogue() -> tuple[dict[str, Any], Any]:
    """Create the meters api_calls (count), ai_tokens (sum of `tokens`) and storage_gb
    (weighted_sum of `gb`) and the USD plan `bench` pricing them (Django must be set up)."""
    from plans.services import plan_create, price_set
    from usage.services import meter_create

    meters = {
        "api_calls": meter_create(code="api_calls", spec={"aggregation": "count"}),
        "ai_tokens": meter_create(
            code="ai_tokens", spec={"aggregation": "sum", "property": "tokens"}, unit="token"
        ),
        "storage_gb": meter_create(
            code="storage_gb",
            spec={"aggregation": "weighted_sum", "property": "gb"},
            unit="GB-month",
        ),
    }
    plan = plan_create(code="bench", name="Bench plan", currency="USD", base_fee=BASE_FEE)
    for code, spec in PRICES.items():
        price_set(plan=plan, meter=meters[code], spec=spec)
    return meters, plan
