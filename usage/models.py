"""Meters (what is measured, defined by staff) and usage events (the system of record)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models, transaction
from django.utils.functional import cached_property

from accounts.models import Organisation
from usage.aggregation import Aggregation, MeterSpec, SpecError


class Meter(models.Model):
    """A measured thing, shared by every organisation: its code is the event name clients send."""

    code = models.SlugField(max_length=64, unique=True, help_text="The event name, e.g. api_calls.")
    name = models.CharField(max_length=200)
    unit = models.CharField(max_length=32, default="unit", help_text="Shown after quantities.")
    aggregation = models.CharField(max_length=16, choices=[(a.value, a.value) for a in Aggregation])
    # The event property that carries the number (or, for unique_count, the value counted);
    # empty for count meters.
    property_name = models.CharField(max_length=64, blank=True, default="")
    # {"region": ["eu", "us"]}: an event counts only when each named property has a listed value.
    filters = models.JSONField(default=dict, blank=True)
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(aggregation__in=[a.value for a in Aggregation]),
                name="meter_aggregation_valid",
            ),
            models.CheckConstraint(
                condition=models.Q(aggregation="count", property_name="")
                | (~models.Q(aggregation="count") & ~models.Q(property_name="")),
                name="meter_property_matches_aggregation",
            ),
        ]

    def __str__(self) -> str:
        return self.code

    def clean(self) -> None:
        try:
            MeterSpec.from_json(self.spec_document())
        except SpecError as exc:
            raise ValidationError(str(exc)) from exc

    def spec_document(self) -> dict[str, Any]:
        document: dict[str, Any] = {"aggregation": self.aggregation}
        if self.property_name:
            document["property"] = self.property_name
        if self.filters:
            document["filters"] = self.filters
        return document

    @cached_property
    def spec(self) -> MeterSpec:
        # Parsed once per instance: ingestion reads it for every event of a batch.
        return MeterSpec.from_json(self.spec_document())


class UsageEvent(models.Model):
    """One usage event as received: append-only, attributed by its own timestamp."""

    class Source(models.TextChoices):
        API = "api", "HTTP API"
        RECORD = "record", "In-process record()"
        IMPORT = "import", "import_events"

    # No single-column indexes: the covering index below leads with the organisation, and no
    # query reads one meter's events across organisations often enough to pay for one on every
    # insert.
    organisation = models.ForeignKey(
        Organisation, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    meter = models.ForeignKey(Meter, on_delete=models.PROTECT, related_name="+", db_index=False)
    # The number this event contributes to its meter (1 for count and unique_count), at most
    # 6 decimal places and 15 significant digits (validated in usage.aggregation).
    quantity = models.DecimalField(max_digits=24, decimal_places=6)
    properties = models.JSONField(default=dict, blank=True)
    # Event time, UTC: decides the period the event is billed in, whatever its arrival time.
    timestamp = models.DateTimeField()
    received_at = models.DateTimeField()
    # Unique per organisation for ever: a retried event is answered `duplicate`, counted once.
    # `UsageEventKey` holds the keys (a partitioned table cannot be unique on them).
    idempotency_key = models.CharField(max_length=255)
    source = models.CharField(max_length=8, choices=Source.choices, default=Source.API)
    # Received more than INGEST_DELAYED_AFTER after its own timestamp: its period may already
    # be invoiced, so the next close looks at it (through a small partial index) to bill it as
    # an adjustment. Set at ingestion from the event alone, no coordination with billing.
    delayed = models.BooleanField(default=False, db_default=False)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=~models.Q(idempotency_key=""), name="usage_event_key_not_empty"
            ),
        ]
        indexes = [
            # Answers one organisation's meter over a period; on PostgreSQL it also covers the
            # quantity and the receipt time (a close's cutoff), so sums and counts are read from
            # the index alone.
            models.Index(
                fields=["organisation", "meter", "timestamp"],
                include=["quantity", "received_at"],
                name="usage_event_org_meter_ts",
            ),
            models.Index(
                fields=["organisation", "received_at"],
                condition=models.Q(delayed=True),
                name="usage_event_delayed",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.meter_id} {self.quantity} @ {self.timestamp.isoformat()}"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if self.pk is not None and not self._state.adding:
            raise ValueError("Usage events are append-only; record a correction instead.")
        # As ingestion sets it (bulk inserts compute it in SQL).
        self.delayed = self.received_at - self.timestamp > settings.INGEST_DELAYED_AFTER
        # The key is claimed as ingestion claims it: a key stored before raises IntegrityError.
        with transaction.atomic(using=kwargs.get("using")):
            super().save(*args, **kwargs)
            UsageEventKey.objects.using(kwargs.get("using")).create(
                organisation_id=self.organisation_id,
                idempotency_key=self.idempotency_key,
                event_id=self.pk,
            )


class UsageEventKey(models.Model):
    """The idempotency guard: every key an organisation's stored events used, for ever.

    On PostgreSQL the events table is partitioned by month (`usage.partitions`) and a unique
    constraint there would have to include the timestamp, which a retried event may not repeat
    exactly; so the keys live here, written in the statement that inserts the events (the key
    row first: whichever insert writes it stores the event, any other answers `duplicate`).
    Kept when events are archived, so an archived event's key still answers `duplicate`.
    """

    pk = models.CompositePrimaryKey("organisation_id", "idempotency_key")
    organisation = models.ForeignKey(
        Organisation,
        on_delete=models.PROTECT,
        related_name="+",
        db_constraint=False,  # the event's own foreign key checks it
        db_index=False,  # the primary key leads with it
    )
    idempotency_key = models.CharField(max_length=255)
    # The event stored under the key (no foreign key: the events table is partitioned).
    event_id = models.BigIntegerField()

    def __str__(self) -> str:
        return f"{self.organisation_id}:{self.idempotency_key} -> {self.event_id}"


# --- Rollups (see usage.rollups for how they are kept and why they are exact) --------------------


class ExactDecimalField(models.DecimalField):  # type: ignore[type-arg]
    """A decimal that stays exact on every backend: NUMERIC on PostgreSQL, TEXT on SQLite.

    SQLite keeps a DECIMAL column as a double (15 significant digits), enough for one event's
    quantity but not for an hour's sum of a million of them. Its internal type is TextField so
    that SQLite's float converter is not applied; `ml_dsum` adds the text exactly.
    """

    def get_internal_type(self) -> str:
        return "TextField"

    def db_type(self, connection: Any) -> str:
        if connection.vendor == "sqlite":
            return "text"
        return f"numeric({self.max_digits}, {self.decimal_places})"

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        if value is None:
            return None
        return str(self.to_python(value)) if connection.vendor == "sqlite" else value

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Decimal | None:
        return None if value is None else Decimal(str(value))


class HourlyUsage(models.Model):
    """One organisation's folded events of one meter in one UTC hour `[hour, hour + 1h)`.

    Holds what the hour's events aggregate to for every aggregation that merges: count, sum,
    max and the latest reading (by timestamp, then id); for weighted_sum also the first reading
    and the level's integral inside the hour. `received_max` is the latest receipt
    time among them: a read "as received until R" uses the bucket only when it is <= R.
    """

    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="+")
    meter = models.ForeignKey(Meter, on_delete=models.CASCADE, related_name="+")
    # Start of the UTC hour; events at exactly hour + 1h belong to the next bucket.
    hour = models.DateTimeField()
    events = models.BigIntegerField(default=0)
    # Exact sum of the quantities: 38 digits hold any number of 24-digit quantities we can store.
    total = ExactDecimalField(max_digits=38, decimal_places=6, default=Decimal(0))
    peak = models.DecimalField(max_digits=24, decimal_places=6, null=True)
    # The hour's last event (timestamp, id): a `latest` meter's reading.
    last_timestamp = models.DateTimeField(null=True)
    last_id = models.BigIntegerField(null=True)
    last_quantity = models.DecimalField(max_digits=24, decimal_places=6, null=True)
    # weighted_sum only: the hour's first event, and the integral of the level between its
    # first and last events (level x microseconds, exact); a reader joins buckets by carrying
    # each one's last level to the next one's first event.
    first_timestamp = models.DateTimeField(null=True)
    first_id = models.BigIntegerField(null=True)
    first_quantity = models.DecimalField(max_digits=24, decimal_places=6, null=True)
    level_integral = ExactDecimalField(max_digits=40, decimal_places=6, null=True)
    received_max = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organisation", "meter", "hour"], name="hourly_usage_bucket"
            )
        ]

    def __str__(self) -> str:
        return f"{self.organisation_id}/{self.meter_id} {self.hour.isoformat()}"


class HourlyUniqueValue(models.Model):
    """A value a `unique_count` meter saw in one organisation's UTC hour (folded events only).

    A period's distinct count is COUNT(DISTINCT value) over its hours: one row per value and
    hour instead of one per event. `value` is the JSON text of the property (so "1" and 1 stay
    distinct), computed by the same SQL expression on the raw events.
    """

    organisation = models.ForeignKey(Organisation, on_delete=models.CASCADE, related_name="+")
    meter = models.ForeignKey(Meter, on_delete=models.CASCADE, related_name="+")
    hour = models.DateTimeField()
    value = models.TextField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organisation", "meter", "hour", "value"], name="hourly_unique_value"
            )
        ]

    def __str__(self) -> str:
        return f"{self.organisation_id}/{self.meter_id} {self.hour.isoformat()} {self.value}"


class RollupState(models.Model):
    """The fold's watermark: one row (pk 1). Says which events are in the buckets.

    On PostgreSQL: events with `xact_id < cursor` whose `xact_id` is not in `pending` (the
    transactions still running when the fold looked, which are folded once they have ended).
    On SQLite: events with `id <= cursor` (`pending` stays empty). `version` grows with every
    fold that changed something: a reader that sees it change while reading starts again.
    """

    cursor = models.BigIntegerField(default=0)
    pending = models.JSONField(default=list)
    version = models.BigIntegerField(default=0)
    folded_at = models.DateTimeField(null=True)

    def __str__(self) -> str:
        return f"rollups up to {self.cursor} (version {self.version})"


class MeterRollup(models.Model):
    """The spec a meter's buckets were folded with; a meter whose spec changed is read raw
    until the next fold rebuilds its buckets."""

    meter = models.OneToOneField(Meter, on_delete=models.CASCADE, related_name="+")
    spec = models.JSONField()

    def __str__(self) -> str:
        return f"rollup of {self.meter_id}"
