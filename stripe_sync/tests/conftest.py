"""The fake Stripe server (one per test session, emptied for each test) and Stripe switched on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.conf import settings

from accounts.tests.factories import make_organisation
from stripe_sync.gateway import _Session
from stripe_sync.services import meter_configure
from stripe_sync.tests.fake_stripe import FakeStripe, start
from usage.services import events_ingest
from usage.tests.factories import make_meter

SECRET_KEY = "sk_test_" + "FakeKeyForMeterlineTests0123"


@pytest.fixture(scope="session")
def _fake_server():
    fake, server = start(settings.STRIPE_FAKE_PORT)
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake(_fake_server: FakeStripe) -> FakeStripe:
    """The fake, empty; the SDK and dj-stripe reach it through the base-address settings."""
    _fake_server.reset()
    _fake_server.secret_key = SECRET_KEY
    _Session.expires = 0.0
    return _fake_server


@pytest.fixture
def stripe_on(settings, fake: FakeStripe) -> FakeStripe:
    settings.STRIPE_SECRET_KEY = SECRET_KEY
    return fake


class Ingest:
    """Events for one organisation through the real ingestion (so the outbox receiver runs)."""

    def __init__(self, organisation, meter):
        self.organisation = organisation
        self.meter = meter
        self.count = 0

    def __call__(self, n: int = 1, quantity: str = "1", at: datetime | None = None):
        now = datetime.now(UTC)
        payloads = []
        for _ in range(n):
            self.count += 1
            payloads.append(
                {
                    "event_name": self.meter.code,
                    "idempotency_key": f"{self.meter.code}-{self.count}",
                    "quantity": quantity,
                    "timestamp": (at or now - timedelta(minutes=1)).isoformat(),
                }
            )
        results = events_ingest(
            organisation=self.organisation, payloads=payloads, now=now, allow_backdated=True
        )
        assert all(r.status == "accepted" for r in results), results
        return results


@pytest.fixture
def streamed(db):
    """An organisation and a sum meter in stream mode, and a function that ingests its events."""
    organisation = make_organisation(billing_email="ap@example.com")
    meter = make_meter("sum", code="tokens", property="quantity")
    meter_configure(meter=meter, mode="stream")
    return Ingest(organisation, meter)


def total(values) -> Decimal:
    return sum((Decimal(v) for v in values), Decimal(0))
