"""Reads of the Stripe sync: what Stripe's meter totals say against ours (reconciliation)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db.models import Sum

from accounts.models import Organisation
from core.periods import Period
from stripe_sync import gateway
from stripe_sync.models import MeterEventState, PeriodSummaryEvent, StripeCustomer, StripeMeter
from usage.selectors import usage_totals

_PLACES = Decimal("0.000001")


# (monotonic expiry, ids of meters in stream mode): asked on every ingestion, so each process
# keeps its own copy for STRIPE_MODE_CACHE_SECONDS instead of a query per request.
_STREAMED: list[tuple[float, frozenset[int]]] = []


def streamed_meter_cache_clear() -> None:
    _STREAMED.clear()


def streamed_meter_ids() -> frozenset[int]:
    """Meters whose every event goes to Stripe through the outbox. A mode changed in another
    process applies here within STRIPE_MODE_CACHE_SECONDS; in this one, at once."""
    now = time.monotonic()
    if _STREAMED and _STREAMED[0][0] > now:
        return _STREAMED[0][1]
    ids = frozenset(
        StripeMeter.objects.filter(mode=StripeMeter.Mode.STREAM).values_list("meter_id", flat=True)
    )
    _STREAMED[:] = [(now + settings.STRIPE_MODE_CACHE_SECONDS, ids)]
    return ids


@dataclass(frozen=True)
class Difference:
    """One customer and meter whose total over the period differs between us and Stripe."""

    organisation: Organisation
    stripe_customer: str
    stripe_meter: StripeMeter
    ours: Decimal
    stripe: Decimal

    @property
    def missing(self) -> Decimal:
        """What Stripe lacks (negative: Stripe counts more than we do)."""
        return self.ours - self.stripe


def meter_totals_compare(*, period: Period) -> list[Difference]:
    """Compare, for every linked customer and provisioned meter, our total over `period` with
    Stripe's meter event summary; return the pairs that differ.

    Ours is what we send: for a stream meter the sum of the events' quantities in the period,
    for a period_summary meter the summaries timestamped in it (expired ones included: Stripe
    lacks them, and that is a difference to see).
    """
    customers = list(StripeCustomer.objects.select_related("organisation").order_by("id"))
    organisation_ids = [c.organisation_id for c in customers]
    differences = []
    for link in StripeMeter.objects.select_related("meter").exclude(stripe_id="").order_by("id"):
        if link.mode == StripeMeter.Mode.STREAM:
            ours = usage_totals(organisation_ids=organisation_ids, meter=link.meter, period=period)
        else:
            ours = dict.fromkeys(organisation_ids, Decimal(0))
            ours.update(
                PeriodSummaryEvent.objects.filter(
                    meter=link.meter, timestamp__gte=period.start, timestamp__lt=period.end
                )
                .exclude(state=MeterEventState.PARKED)
                .values("organisation_id")
                .annotate(total=Sum("value"))
                .values_list("organisation_id", "total")
            )
        for customer in customers:
            summaries = gateway.meter_event_summaries(
                stripe_meter_id=link.stripe_id,
                customer=customer.stripe_id,
                start=period.start,
                end=period.end,
            )
            # Stripe's aggregated_value is a JSON number; read through str, never float maths.
            theirs = sum((Decimal(str(s["aggregated_value"])) for s in summaries), Decimal(0))
            mine = ours.get(customer.organisation_id, Decimal(0))
            if mine.quantize(_PLACES) != theirs.quantize(_PLACES):
                differences.append(
                    Difference(customer.organisation, customer.stripe_id, link, mine, theirs)
                )
    return differences
