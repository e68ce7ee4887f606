"""The one module that calls Stripe: the official SDK, pointed at the configured base addresses.

dj-stripe has no Billing Meter models, so meters, meter events and their summaries go through
here, as do customers and invoice pushes. Every call returns plain dicts. The SDK's own retries
are off (`max_network_retries=0`): the outbox decides when to try again, with its back-off.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, cast

import stripe
from django.conf import settings

Outcome = Literal["duplicate", "retry", "refused"]


class StripeOff(RuntimeError):  # noqa: N818 - reads as the state: "Stripe (is) off"
    """No secret key is configured: nothing is sent, the outbox keeps its rows."""


def enabled() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def client() -> stripe.StripeClient:
    if not enabled():
        raise StripeOff("STRIPE_SECRET_KEY is not set.")
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        base_addresses={
            "api": settings.STRIPE_API_BASE,
            "meter_events": settings.STRIPE_METER_EVENTS_API_BASE,
        },
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_SECONDS),
    )


def classify(exc: stripe.StripeError) -> Outcome:
    """Say what a failed call means for the rows it carried.

    No answer, 409 (a concurrent request with the same idempotency key), 429 and 5xx are
    temporary. 401 and 403 are about our key, not the rows: they are retried too, rather than
    parking every row while the key is being fixed. Stripe's "already exists" is a delivery.
    """
    if isinstance(exc, stripe.TemporarySessionExpiredError):
        return "retry"
    status = exc.http_status
    if status is None or status in (401, 403, 409, 429) or status >= 500:
        return "retry"
    code = (exc.code or "").lower()
    if code == "resource_already_exists" or "already exists" in str(exc.user_message or ""):
        return "duplicate"
    return "refused"


def describe(exc: stripe.StripeError) -> str:
    return f"{exc.http_status or 'no answer'} {exc.code or type(exc).__name__}: {exc.user_message}"


def _dict(obj: Any) -> dict[str, Any]:
    return cast(dict[str, Any], obj.to_dict())


def _unix(instant: datetime) -> int:
    return int(instant.timestamp())


# --- Customers ----------------------------------------------------------------------------------


def customer_create(
    *, organisation_id: int, name: str, email: str, idempotency_key: str
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "name": name,
        "metadata": {"meterline_organisation_id": str(organisation_id)},
    }
    if email:
        params["email"] = email
    return _dict(
        client().v1.customers.create(
            cast(Any, params), cast(Any, {"idempotency_key": idempotency_key})
        )
    )


def customer_retrieve(*, stripe_id: str) -> dict[str, Any]:
    return _dict(client().v1.customers.retrieve(stripe_id))


# --- Meters -------------------------------------------------------------------------------------

# The meter event payload names the customer and the value under these keys.
CUSTOMER_KEY = "stripe_customer_id"
VALUE_KEY = "value"


def meter_create(*, display_name: str, event_name: str, idempotency_key: str) -> dict[str, Any]:
    params = {
        "display_name": display_name,
        "event_name": event_name,
        # Every value we report is a quantity to add up: per event (stream) or a period's total
        # (period_summary, one event per period).
        "default_aggregation": {"formula": "sum"},
        "customer_mapping": {"type": "by_id", "event_payload_key": CUSTOMER_KEY},
        "value_settings": {"event_payload_key": VALUE_KEY},
    }
    return _dict(
        client().v1.billing.meters.create(
            cast(Any, params), cast(Any, {"idempotency_key": idempotency_key})
        )
    )


@dataclass(frozen=True)
class MeterEvent:
    event_name: str
    identifier: str
    customer: str
    value: str
    timestamp: datetime

    def v2(self) -> dict[str, Any]:
        return {
            "event_name": self.event_name,
            "identifier": self.identifier,
            "payload": {CUSTOMER_KEY: self.customer, VALUE_KEY: self.value},
            "timestamp": self.timestamp.isoformat().replace("+00:00", "Z"),
        }


def meter_event_create(event: MeterEvent) -> dict[str, Any]:
    """Send one meter event through v1 (one event a call); the identifier is the idempotency key."""
    params = {
        "event_name": event.event_name,
        "identifier": event.identifier,
        "payload": {CUSTOMER_KEY: event.customer, VALUE_KEY: event.value},
        "timestamp": _unix(event.timestamp),
    }
    return _dict(
        client().v1.billing.meter_events.create(
            cast(Any, params), cast(Any, {"idempotency_key": f"meter-event:{event.identifier}"})
        )
    )


class _Session:
    """The v2 stream's session token (valid 15 minutes), shared by the threads of a process."""

    lock = threading.Lock()
    token = ""
    key = ""
    expires = 0.0


def _stream_token(*, renew: bool = False) -> str:
    with _Session.lock:
        # Renewed a minute early, so that no batch starts with a token about to expire.
        if renew or _Session.key != settings.STRIPE_SECRET_KEY or time.time() > _Session.expires:
            session = client().v2.billing.meter_event_session.create()
            _Session.token = session.authentication_token
            _Session.key = settings.STRIPE_SECRET_KEY
            expires: Any = session.expires_at  # an RFC 3339 string in the v2 API
            if isinstance(expires, str):
                expires = datetime.fromisoformat(expires.replace("Z", "+00:00"))
            _Session.expires = expires.timestamp() - 60
        return _Session.token


def meter_events_stream(events: list[MeterEvent]) -> None:
    """Send up to 100 meter events in one request of the v2 stream.

    Stripe deduplicates on each event's identifier, so resending a batch is harmless.
    """
    if not events:
        return
    body = cast(Any, {"events": [event.v2() for event in events]})
    try:
        client().v2.billing.meter_event_stream.create(body, cast(Any, {"api_key": _stream_token()}))
    except (stripe.TemporarySessionExpiredError, stripe.AuthenticationError):
        # The session ran out (or was revoked) before its time: one more try with a new one.
        client().v2.billing.meter_event_stream.create(
            body, cast(Any, {"api_key": _stream_token(renew=True)})
        )


def meter_event_summaries(
    *, stripe_meter_id: str, customer: str, start: datetime, end: datetime
) -> list[dict[str, Any]]:
    """Stripe's aggregated values of a meter for one customer over `[start, end)`."""
    page = client().v1.billing.meters.event_summaries.list(
        stripe_meter_id,
        cast(Any, {"customer": customer, "start_time": _unix(start), "end_time": _unix(end)}),
    )
    return [_dict(summary) for summary in page.auto_paging_iter()]


# --- Invoices -----------------------------------------------------------------------------------


def invoice_create(*, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
    return _dict(
        client().v1.invoices.create(
            cast(Any, params), cast(Any, {"idempotency_key": idempotency_key})
        )
    )


def invoice_item_create(*, params: dict[str, Any], idempotency_key: str) -> dict[str, Any]:
    return _dict(
        client().v1.invoice_items.create(
            cast(Any, params), cast(Any, {"idempotency_key": idempotency_key})
        )
    )


def invoice_retrieve(*, stripe_id: str) -> dict[str, Any]:
    return _dict(client().v1.invoices.retrieve(stripe_id))


def invoice_line_ids(*, stripe_id: str) -> set[str]:
    """Our line ids already on a Stripe invoice (from each item's metadata)."""
    lines = client().v1.invoices.line_items.list(stripe_id, cast(Any, {"limit": 100}))
    return {
        str(line.to_dict().get("metadata", {}).get("meterline_invoice_line_id"))
        for line in lines.auto_paging_iter()
    }


def invoice_finalize(*, stripe_id: str, idempotency_key: str) -> dict[str, Any]:
    return _dict(
        client().v1.invoices.finalize_invoice(
            stripe_id,
            cast(Any, {"auto_advance": True}),
            cast(Any, {"idempotency_key": idempotency_key}),
        )
    )


def unix(instant: datetime) -> int:
    return _unix(instant)
