"""A fake Stripe HTTP server for the tests: only what stripe_sync and dj-stripe call.

It listens on 127.0.0.1, keeps state (customers, meters, meter events, invoices, invoice items,
events), answers with the shapes of Stripe's own example objects (`/work/shared/stripe/
fixtures3.json`, copied in `fixtures3.json` beside this file), honours idempotency keys, records
every request, can be told to fail (status codes, timeouts, a dropped answer after applying),
and signs webhooks the way Stripe does.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

FIXTURES = json.loads((Path(__file__).with_name("fixtures3.json")).read_text())["resources"]


def fixture(resource: str, /, **fields: Any) -> dict[str, Any]:
    obj: dict[str, Any] = copy.deepcopy(FIXTURES[resource])
    obj.update(fields)
    return obj


def parse_form(body: str) -> dict[str, Any]:
    """Stripe's form encoding: `metadata[a]=1&items[0][x]=2` into nested dicts and lists."""
    result: dict[str, Any] = {}
    for key, value in parse_qsl(body, keep_blank_values=True):
        parts = key.replace("]", "").split("[")
        target: Any = result
        for part, following in itertools.pairwise(parts):
            container: Any = [] if following.isdigit() else {}
            if isinstance(target, list):
                index = int(part)
                while len(target) <= index:
                    target.append(None)
                if target[index] is None:
                    target[index] = container
                target = target[index]
            else:
                target = target.setdefault(part, container)
        last = parts[-1]
        if isinstance(target, list):
            target.append(value)
        else:
            target[last] = value
    return result


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    params: dict[str, Any]
    headers: dict[str, str]


@dataclass
class Failure:
    """What the next matching request gets instead of its answer."""

    status: int = 500  # 0: no answer at all (the connection is dropped after `delay`)
    path: str = ""  # only requests whose path starts with this
    delay: float = 0.0
    apply: bool = False  # do the work first, then fail (the answer is lost on the way back)
    body: dict[str, Any] | None = None
    body_contains: str = ""  # only requests whose raw body contains this


@dataclass
class FakeStripe:
    port: int
    secret_key: str = ""
    webhook_secret: str = "whsec_test_fake_secret_0123456789"
    requests: list[Request] = field(default_factory=list)
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    meters: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Meter events as Stripe keeps them: one per identifier.
    meter_events: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoices: dict[str, dict[str, Any]] = field(default_factory=dict)
    invoice_items: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    # Every request while set fails with this status (an outage); 0 means no answer.
    outage: int | None = None
    crashes: list[str] = field(default_factory=list)
    sessions: dict[str, float] = field(default_factory=dict)
    _idempotent: dict[tuple[str, str], tuple[int, dict[str, Any]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    lock: threading.RLock = field(default_factory=threading.RLock)

    def reset(self) -> None:
        """Forget everything (between tests), keeping the port and the running server."""
        self.__init__(port=self.port)  # type: ignore[misc]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_fake{next(self._ids):08d}"

    # --- what tests look at ---------------------------------------------------------------------

    def calls(self, method: str, path_prefix: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]

    def stream_requests(self) -> list[Request]:
        return self.calls("POST", "/v2/billing/meter_event_stream")

    def meter_total(self, *, meter_event_name: str, customer: str) -> Decimal:
        return sum(
            (
                Decimal(e["payload"]["value"])
                for e in self.meter_events.values()
                if e["event_name"] == meter_event_name
                and e["payload"]["stripe_customer_id"] == customer
            ),
            Decimal(0),
        )

    def fail(self, times: int = 1, **failure: Any) -> None:
        with self.lock:
            self.failures.extend(Failure(**failure) for _ in range(times))

    # --- webhooks -------------------------------------------------------------------------------

    def event_create(self, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
        event = fixture(
            "event",
            id=self.new_id("evt"),
            type=type_,
            created=int(time.time()),
            api_version="2026-05-27.dahlia",
            data={"object": copy.deepcopy(obj)},
            livemode=False,
            pending_webhooks=1,
            request={"id": None, "idempotency_key": None},
        )
        self.events[event["id"]] = event
        return event

    def sign(self, payload: str, *, secret: str | None = None, at: int | None = None) -> str:
        timestamp = at or int(time.time())
        signed = f"{timestamp}.{payload}".encode()
        digest = hmac.new((secret or self.webhook_secret).encode(), signed, hashlib.sha256)
        return f"t={timestamp},v1={digest.hexdigest()}"

    def deliver(
        self,
        event: dict[str, Any],
        post: Callable[..., Any],
        path: str,
        *,
        secret: str | None = None,
    ) -> Any:
        """POST `event` to a webhook endpoint as Stripe does: raw JSON, Stripe-Signature header."""
        payload = json.dumps(event, indent=2)
        return post(
            path,
            data=payload,
            content_type="application/json; charset=utf-8",
            headers={
                "Stripe-Signature": self.sign(payload, secret=secret),
                "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            },
        )

    # --- the API --------------------------------------------------------------------------------

    def handle(self, request: Request) -> tuple[int, dict[str, Any]]:
        if not self._authorised(request):
            return 401, _error("invalid_request_error", "Invalid API Key provided.", "api_key")
        method, path, params = request.method, request.path, request.params
        parts = path.strip("/").split("/")
        now = int(time.time())
        match method, parts:
            case "POST", ["v1", "customers"]:
                customer = fixture(
                    "customer",
                    id=self.new_id("cus"),
                    created=now,
                    email=params.get("email"),
                    name=params.get("name"),
                    metadata=params.get("metadata", {}),
                    discount=None,
                )
                self.customers[customer["id"]] = customer
                return 200, customer
            case "GET", ["v1", "customers", customer_id]:
                if customer_id not in self.customers:
                    return _missing("customer", customer_id)
                return 200, self.customers[customer_id]
            case "DELETE", ["v1", "customers", customer_id]:
                if self.customers.pop(customer_id, None) is None:
                    return _missing("customer", customer_id)
                return 200, fixture("deleted_customer", id=customer_id)
            case "POST", ["v1", "billing", "meters"]:
                meter = fixture(
                    "billing.meter",
                    id=self.new_id("mtr"),
                    created=now,
                    updated=now,
                    livemode=False,
                    display_name=params["display_name"],
                    event_name=params["event_name"],
                    default_aggregation=params["default_aggregation"],
                    customer_mapping=params["customer_mapping"],
                    value_settings=params["value_settings"],
                )
                self.meters[meter["id"]] = meter
                return 200, meter
            case "GET", ["v1", "billing", "meters", meter_id, "event_summaries"]:
                return self._summaries(meter_id, request.query)
            case "POST", ["v1", "billing", "meter_events"]:
                event = {
                    "event_name": params["event_name"],
                    "identifier": params["identifier"],
                    "payload": params["payload"],
                    "timestamp": int(params["timestamp"]),
                }
                if event["identifier"] in self.meter_events:
                    return 400, _error(
                        "invalid_request_error",
                        f"An event with identifier {event['identifier']} already exists.",
                        "resource_already_exists",
                    )
                refused = self._refuse(event)
                if refused:
                    return 400, _error("invalid_request_error", refused, "parameter_invalid")
                self.meter_events[event["identifier"]] = event
                return 200, fixture("billing.meter_event", created=now, livemode=False, **event)
            case "POST", ["v2", "billing", "meter_event_session"]:
                token = self.new_id("mes")
                expires = now + 15 * 60
                self.sessions[token] = expires
                return 200, {
                    "id": self.new_id("mes_id"),
                    "object": "v2.billing.meter_event_session",
                    "authentication_token": token,
                    "created": _iso(now),
                    "expires_at": _iso(expires),
                    "livemode": False,
                }
            case "POST", ["v2", "billing", "meter_event_stream"]:
                for raw in params["events"]:
                    event = {
                        "event_name": raw["event_name"],
                        "identifier": raw["identifier"],
                        "payload": raw["payload"],
                        "timestamp": int(
                            datetime.fromisoformat(
                                raw["timestamp"].replace("Z", "+00:00")
                            ).timestamp()
                        ),
                    }
                    # The stream validates asynchronously: refusals and duplicates never reach
                    # the sender; Stripe keeps the first event of an identifier.
                    if not self._refuse(event):
                        self.meter_events.setdefault(event["identifier"], event)
                return 200, {}
            case "POST", ["v1", "invoices"]:
                customer = params["customer"]
                if customer not in self.customers:
                    return _missing("customer", customer)
                invoice = fixture(
                    "invoice",
                    id=self.new_id("in"),
                    created=now,
                    customer=customer,
                    currency=params.get("currency", "usd"),
                    collection_method=params.get("collection_method", "charge_automatically"),
                    metadata=params.get("metadata", {}),
                    description=params.get("description"),
                    status="draft",
                    livemode=False,
                    subscription=None,
                    lines={
                        "object": "list",
                        "data": [],
                        "has_more": False,
                        "url": "/v1/invoices/lines",
                    },
                )
                invoice.pop("parent", None)
                _set_totals(invoice)
                self.invoices[invoice["id"]] = invoice
                return 200, invoice
            case "GET", ["v1", "invoices", invoice_id]:
                if invoice_id not in self.invoices:
                    return _missing("invoice", invoice_id)
                return 200, self.invoices[invoice_id]
            case "GET", ["v1", "invoices", invoice_id, "lines"]:
                if invoice_id not in self.invoices:
                    return _missing("invoice", invoice_id)
                return 200, self.invoices[invoice_id]["lines"]
            case "POST", ["v1", "invoices", invoice_id, "finalize"]:
                if invoice_id not in self.invoices:
                    return _missing("invoice", invoice_id)
                invoice = self.invoices[invoice_id]
                if invoice["status"] != "draft":
                    return 400, _error(
                        "invalid_request_error",
                        "This invoice is already finalized, you can't re-finalize a "
                        "non-draft invoice.",
                        "invoice_not_editable",
                    )
                invoice["status"] = "open"
                invoice["number"] = f"FAKE-{invoice_id[-4:]}"
                invoice["status_transitions"]["finalized_at"] = now
                return 200, invoice
            case "POST", ["v1", "invoiceitems"]:
                invoice = self.invoices.get(params.get("invoice", "")) or {"status": "none"}
                if invoice["status"] != "draft":
                    return 400, _error(
                        "invalid_request_error",
                        "The invoice is not a draft.",
                        "invoice_not_editable",
                    )
                item = fixture(
                    "invoiceitem",
                    id=self.new_id("ii"),
                    amount=int(params["amount"]),
                    currency=params["currency"],
                    customer=params["customer"],
                    description=params.get("description"),
                    invoice=invoice["id"],
                    metadata=params.get("metadata", {}),
                    period={k: int(v) for k, v in params.get("period", {}).items()},
                    date=now,
                    parent=None,
                )
                self.invoice_items[item["id"]] = item
                line = fixture(
                    "line_item",
                    id=self.new_id("il"),
                    amount=item["amount"],
                    currency=item["currency"],
                    description=item["description"],
                    invoice=invoice["id"],
                    metadata=item["metadata"],
                    period=item["period"],
                )
                invoice["lines"]["data"].append(line)
                _set_totals(invoice)
                return 200, item
            case "GET", ["v1", "account"]:
                # The platform account dj-stripe files webhook events under.
                return 200, fixture("account", id="acct_fake0000platform", livemode=False)
            case "GET", ["v1", "events", event_id]:
                if event_id not in self.events:
                    return _missing("event", event_id)
                return 200, self.events[event_id]
        return 404, _error("invalid_request_error", f"Unrecognized request URL ({method}: {path}).")

    def pay(self, invoice_id: str) -> dict[str, Any]:
        """Stripe collects the invoice: it becomes paid; returns it (for an invoice.paid event)."""
        invoice = self.invoices[invoice_id]
        invoice["status"] = "paid"
        invoice["amount_paid"] = invoice["amount_due"]
        invoice["amount_remaining"] = 0
        invoice["status_transitions"]["paid_at"] = int(time.time())
        return invoice

    def _authorised(self, request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        token = auth.removeprefix("Bearer ").strip()
        if request.path == "/v2/billing/meter_event_stream":
            return self.sessions.get(token, 0) > time.time()
        return bool(self.secret_key) and token == self.secret_key

    def _refuse(self, event: dict[str, Any]) -> str:
        if not any(m["event_name"] == event["event_name"] for m in self.meters.values()):
            return f"No active meter was found for event_name {event['event_name']}."
        if event["payload"].get("stripe_customer_id") not in self.customers:
            return "No such customer."
        if event["timestamp"] < time.time() - 35 * 86400:
            return "Timestamp must be within the past 35 calendar days."
        return ""

    def _summaries(self, meter_id: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        meter = self.meters.get(meter_id)
        if meter is None:
            return _missing("billing.meter", meter_id)
        start, end = int(query["start_time"]), int(query["end_time"])
        total = sum(
            (
                Decimal(e["payload"]["value"])
                for e in self.meter_events.values()
                if e["event_name"] == meter["event_name"]
                and e["payload"]["stripe_customer_id"] == query["customer"]
                and start <= e["timestamp"] < end
            ),
            Decimal(0),
        )
        summary = fixture(
            "billing.meter_event_summary",
            id=self.new_id("mtrusg"),
            meter=meter_id,
            start_time=start,
            end_time=end,
            livemode=False,
            aggregated_value=float(total),
        )
        return 200, {
            "object": "list",
            "data": [summary],
            "has_more": False,
            "url": f"/v1/billing/meters/{meter_id}/event_summaries",
        }

    # --- plumbing -------------------------------------------------------------------------------

    def serve(self, raw: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(raw.path)
        length = int(raw.headers.get("Content-Length") or 0)
        body = raw.rfile.read(length).decode() if length else ""
        headers = {k.lower(): v for k, v in raw.headers.items()}
        if split.path.startswith("/v2/"):
            params = json.loads(body) if body else {}
        else:
            params = parse_form(body)
        request = Request(method, split.path, dict(parse_qsl(split.query)), params, headers)
        with self.lock:
            self.requests.append(request)
            failure = self._failure_for(request, body)
        if failure is not None and not failure.apply:
            self._fail(raw, failure)
            return
        key = headers.get("idempotency-key")
        with self.lock:
            if key and (request.path, key) in self._idempotent:
                status, answer = self._idempotent[(request.path, key)]
            else:
                try:
                    status, answer = self.handle(request)
                except Exception as exc:  # a bug of the fake: say so to the caller
                    self.crashes.append(repr(exc))
                    status, answer = 500, _error("api_error", f"Fake crashed: {exc!r}")
                if key and status < 500:
                    self._idempotent[(request.path, key)] = (status, copy.deepcopy(answer))
        if failure is not None:
            self._fail(raw, failure)
            return
        _send(raw, status, answer, idempotent_replayed=False)

    def _failure_for(self, request: Request, body: str) -> Failure | None:
        if self.outage is not None:
            return Failure(status=self.outage)
        for index, failure in enumerate(self.failures):
            if request.path.startswith(failure.path) and failure.body_contains in body:
                return self.failures.pop(index)
        return None

    def _fail(self, raw: BaseHTTPRequestHandler, failure: Failure) -> None:
        if failure.delay:
            time.sleep(failure.delay)
        if failure.status == 0:
            raw.close_connection = True
            raw.connection.close()
            return
        kind = {429: "rate_limit_error", 409: "idempotency_error"}.get(failure.status, "api_error")
        if failure.status == 429 and raw.path.startswith("/v2/"):
            kind = "rate_limit"
        body = failure.body or _error(kind, f"Fake failure {failure.status}.")
        _send(raw, failure.status, body, idempotent_replayed=False)


def _send(
    raw: BaseHTTPRequestHandler, status: int, answer: dict[str, Any], *, idempotent_replayed: bool
) -> None:
    data = json.dumps(answer).encode()
    raw.send_response(status)
    raw.send_header("Content-Type", "application/json")
    raw.send_header("Content-Length", str(len(data)))
    raw.send_header("Request-Id", f"req_fake{time.monotonic_ns()}")
    raw.end_headers()
    raw.wfile.write(data)


def _error(kind: str, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code:
        error["code"] = code
    return {"error": error}


def _missing(kind: str, object_id: str) -> tuple[int, dict[str, Any]]:
    return 404, _error(
        "invalid_request_error", f"No such {kind}: '{object_id}'", "resource_missing"
    )


def _iso(unix: int) -> str:
    return (
        datetime.fromtimestamp(unix, tz=__import__("datetime").UTC)
        .isoformat()
        .replace("+00:00", "Z")
    )


def _set_totals(invoice: dict[str, Any]) -> None:
    total = sum(line["amount"] for line in invoice["lines"]["data"])
    for name in ("amount_due", "amount_remaining", "subtotal", "total", "subtotal_excluding_tax"):
        invoice[name] = total
    invoice["total_excluding_tax"] = total
    invoice["amount_paid"] = 0


def start(port: int) -> tuple[FakeStripe, ThreadingHTTPServer]:
    fake = FakeStripe(port=port)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            fake.serve(self, "GET")

        def do_POST(self) -> None:
            fake.serve(self, "POST")

        def do_DELETE(self) -> None:
            fake.serve(self, "DELETE")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return fake, server
