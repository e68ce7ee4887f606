"""Store the events queued in the ingestion buffer (INGEST_BUFFER=redis) until stopped."""

from __future__ import annotations

import logging
import signal
import time
from argparse import ArgumentParser
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from usage.buffer import (
    Drained,
    buffer_backlog,
    buffer_consume,
    buffer_requeue_dead,
    consumer_name,
)

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Read batches from the ingestion buffer's Redis stream and store them, until SIGINT or "
        "SIGTERM (the batch in hand is finished first). Run any number, on any machines."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--name", default="", help="Consumer name, unique per process (default: host-pid)."
        )
        parser.add_argument(
            "--batch", type=int, default=0, help="Stream entries per read (INGEST_BUFFER_BATCH)."
        )
        parser.add_argument(
            "--until-empty", action="store_true", help="Stop when a read finds nothing."
        )
        parser.add_argument(
            "--requeue-dead",
            action="store_true",
            help="Put the entries set aside in <stream>:dead back in the stream, then exit.",
        )
        parser.add_argument(
            "--report-seconds",
            type=int,
            default=60,
            help="Log the rate, the backlog and the lag this often (0: never).",
        )

    def handle(self, *args: object, **options: Any) -> None:
        if settings.INGEST_BUFFER != "redis":
            raise CommandError(
                "The ingestion buffer is off: set INGEST_BUFFER=redis (and REDIS_URL)."
            )
        if options["requeue_dead"]:
            moved = buffer_requeue_dead()
            self.stdout.write(f"{moved} entries put back in {settings.INGEST_BUFFER_STREAM}")
            return
        stopping: list[int] = []

        def stop(signum: int, frame: FrameType | None) -> None:
            stopping.append(signum)

        previous = {
            signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)
        }
        name = options["name"] or consumer_name()
        lag_ms = [0]
        every = options["report_seconds"]
        window = {"since": time.monotonic(), "inserted": 0, "lag": 0}

        def on_batch(drained: Drained) -> None:
            if drained.oldest_ms is not None:
                lag = int(time.time() * 1000) - drained.oldest_ms
                lag_ms[0] = max(lag_ms[0], lag)
                window["lag"] = max(window["lag"], lag)
            window["inserted"] += drained.inserted
            seconds = time.monotonic() - window["since"]
            if every and seconds >= every:
                # What an operator watches: the rate, the backlog, the delay to visibility.
                logger.info(
                    "%s: %d events stored in %.0f s (%.0f/s), %d entries queued, longest "
                    "queued-to-stored %d ms",
                    name,
                    window["inserted"],
                    seconds,
                    window["inserted"] / seconds,
                    buffer_backlog(),
                    window["lag"],
                )
                window.update(since=time.monotonic(), inserted=0, lag=0)

        began = time.monotonic()
        self.stderr.write(
            f"ingest_worker {name}: reading {settings.INGEST_BUFFER_STREAM} "
            f"as group {settings.INGEST_BUFFER_GROUP}"
        )
        try:
            totals = buffer_consume(
                consumer=name,
                should_stop=lambda: bool(stopping),
                until_empty=options["until_empty"],
                count=options["batch"] or None,
                on_batch=on_batch,
            )
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        seconds = time.monotonic() - began
        self.stdout.write(
            f"{name}: {totals.batches} batches, {totals.events} events read, "
            f"{totals.inserted} stored, {totals.events - totals.inserted} already stored, "
            f"{totals.dead} entries dead-lettered, {totals.failures} connection failures, "
            f"longest queued-to-stored {lag_ms[0]} ms, {seconds:.1f} s"
        )
