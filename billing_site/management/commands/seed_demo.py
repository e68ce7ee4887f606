import math
import random
from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from accounts.models import Membership, Organisation
from accounts.services import api_key_create, membership_add, organisation_create
from alerts.models import AlertRule
from alerts.services import alert_rule_create, alerts_evaluate
from core.periods import add_months
from invoices.services import periods_close
from plans.models import CreditGrant, Plan, Subscription
from plans.services import credit_grant_create, plan_create, price_set, subscription_create
from usage.models import Meter, UsageEvent
from usage.services import events_ingest, meter_create

DEMO_METERS: list[dict[str, Any]] = [
    {"code": "api_calls", "name": "API calls", "unit": "call", "spec": {"aggregation": "count"}},
    {
        "code": "ai_tokens",
        "name": "AI tokens",
        "unit": "token",
        "spec": {"aggregation": "sum", "property": "tokens"},
    },
    {
        "code": "storage_gb",
        "name": "Storage",
        "unit": "GB-month",
        "spec": {"aggregation": "weighted_sum", "property": "gb"},
    },
    {
        "code": "seats",
        "name": "Seats",
        "unit": "seat",
        "spec": {"aggregation": "latest", "property": "seats"},
    },
    {
        "code": "active_users",
        "name": "Monthly active users",
        "unit": "user",
        "spec": {"aggregation": "unique_count", "property": "user_id"},
    },
]
# Per currency: (code suffix, base fee, API calls tiers, token price, GB-month price, seat price)
DEMO_PRICES: dict[str, dict[str, Any]] = {
    "USD": {"base_fee": "49", "scale": "1"},
    "EUR": {"base_fee": "45", "scale": "0.92"},
    "JPY": {"base_fee": "7500", "scale": "150"},
}


def demo_price_specs(scale: Decimal) -> dict[str, dict[str, Any]]:
    """The demo plan's prices, in a currency whose unit is `scale` US dollars' worth."""

    def money(usd: str) -> str:
        return format((Decimal(usd) * scale).normalize(), "f")

    return {
        "api_calls": {
            "model": "graduated",
            "tiers": [
                {"up_to": "5000", "unit_price": "0"},
                {"up_to": "50000", "unit_price": money("0.002")},
                {"up_to": None, "unit_price": money("0.001")},
            ],
        },
        "ai_tokens": {"model": "standard", "unit_price": money("0.000002")},
        "storage_gb": {
            "model": "package",
            "package_size": "10",
            "package_price": money("1.5"),
            "free_units": "50",
            "rounding": "up",
        },
        "seats": {
            "model": "volume",
            "tiers": [
                {"up_to": "10", "unit_price": money("12")},
                {"up_to": None, "unit_price": money("9")},
            ],
        },
    }


# (name, slug, currency, time zone, traffic scale)
DEMO_ORGANISATIONS = [
    ("Acme Robotics", "acme", "USD", "America/New_York", 1.0),
    ("Globex GmbH", "globex", "EUR", "Europe/Berlin", 0.5),
    ("Initech KK", "initech", "JPY", "Asia/Tokyo", 0.25),
]
ENDPOINTS = ["/v1/search", "/v1/items", "/v1/orders", "/v1/users"]
MODELS = ["small", "large"]


class Command(BaseCommand):
    help = (
        "Load demo data: organisations, meters and a month of events (re-runnable: events carry "
        "deterministic idempotency keys), an admin login, and a fresh API key for acme."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--days", type=int, default=60)
        parser.add_argument("--admin-password", default="admin")

    def handle(self, *args: object, **options: Any) -> None:
        if not settings.DEBUG and options["admin_password"] == "admin":  # noqa: S105
            raise CommandError("Refusing a demo admin/admin login with DEBUG off.")
        for meter in DEMO_METERS:
            if not Meter.objects.filter(code=meter["code"]).exists():
                meter_create(
                    code=meter["code"], spec=meter["spec"], name=meter["name"], unit=meter["unit"]
                )
        admin = self._admin(options["admin_password"])
        now = timezone.now()
        for name, slug, currency, tz, scale in DEMO_ORGANISATIONS:
            organisation = Organisation.objects.filter(slug=slug).first() or organisation_create(
                name=name,
                slug=slug,
                currency=currency,
                timezone_name=tz,
                billing_email=f"billing@{slug}.example",
            )
            membership_add(organisation=organisation, user=admin, role=Membership.Role.OWNER)
            events = list(demo_events(slug, scale, now, options["days"]))
            counts = {"accepted": 0, "duplicate": 0, "rejected": 0}
            for offset in range(0, len(events), 1000):
                for result in events_ingest(
                    organisation=organisation,
                    payloads=events[offset : offset + 1000],
                    source=UsageEvent.Source.IMPORT,
                    now=now,
                    allow_backdated=True,
                ):
                    counts[result.status] += 1
            self.stdout.write(
                f"{slug}: {counts['accepted']} events added, {counts['duplicate']} already there"
            )
        self._plans_and_subscriptions(now)
        acme = Organisation.objects.get(slug="acme")
        if not CreditGrant.objects.filter(organisation=acme).exists():
            credit_grant_create(
                organisation=acme,
                amount_minor=2500,
                currency="USD",
                category=CreditGrant.Category.PROMOTIONAL,
                effective_from=now - timedelta(days=days_back(now)),
                description="Welcome credit",
            )
        summary = periods_close(as_of=now)
        self.stdout.write(f"closed {summary.closed} billing period(s) into invoices")
        self._alert_rules(acme, now)
        issued = api_key_create(
            organisation=Organisation.objects.get(slug="acme"), name="demo key (seed_demo)"
        )
        self.stdout.write(
            "\nDemo ready.\n"
            "  URL:        http://127.0.0.1:8000/  (API docs: /api/v1/docs)\n"
            "  Admin:      http://127.0.0.1:8000/admin/  "
            f"login admin / {options['admin_password']}\n"
            f"  API key (acme, shown once): {issued.secret}\n"
            f'  Try: curl -H "Authorization: Bearer {issued.secret}" '
            '"http://127.0.0.1:8000/api/v1/meters"\n'
        )

    def _alert_rules(self, organisation: Organisation, now: datetime) -> None:
        """Two demo rules for acme (free API calls used; projected invoice), evaluated now."""
        if not AlertRule.objects.filter(organisation=organisation).exists():
            alert_rule_create(
                organisation=organisation,
                metric=AlertRule.Metric.USAGE,
                meter=Meter.objects.get(code="api_calls"),
                name="Free API calls",
                thresholds=[("percent", Decimal(50)), ("percent", Decimal(80))],
                email_to=[organisation.billing_email],
            )
            alert_rule_create(
                organisation=organisation,
                metric=AlertRule.Metric.PROJECTED_COST,
                name="Projected invoice",
                thresholds=[("absolute", Decimal(100)), ("absolute", Decimal(1000))],
            )
        evaluation = alerts_evaluate(as_of=now, organisation_ids=[organisation.pk])
        self.stdout.write(f"alerts: {evaluation}")

    def _plans_and_subscriptions(self, now: datetime) -> None:
        """A growth plan per currency; each organisation subscribed since last month's 1st."""
        meters = {meter.code: meter for meter in Meter.objects.all()}
        for _, slug, currency, _, _ in DEMO_ORGANISATIONS:
            plan = Plan.objects.filter(code=f"growth-{currency.lower()}").first()
            if plan is None:
                prices = DEMO_PRICES[currency]
                plan = plan_create(
                    code=f"growth-{currency.lower()}",
                    name=f"Growth ({currency})",
                    currency=currency,
                    base_fee=Decimal(prices["base_fee"]),
                )
                for code, spec in demo_price_specs(Decimal(prices["scale"])).items():
                    price_set(plan=plan, meter=meters[code], spec=spec)
            organisation = Organisation.objects.get(slug=slug)
            if not Subscription.objects.filter(organisation=organisation).exists():
                local_now = now.astimezone(organisation.tzinfo)
                anchor = datetime.combine(
                    add_months(local_now.date().replace(day=1), -1), time(0), organisation.tzinfo
                )
                subscription_create(organisation=organisation, plan=plan, start=anchor)
            self.stdout.write(f"{slug}: on plan {plan.code}")

    def _admin(self, password: str) -> Any:
        user_model = get_user_model()
        admin = user_model.objects.filter(username="admin").first()
        if admin is None:
            admin = user_model.objects.create_superuser("admin", "admin@example.com", password)
        return admin


def demo_events(slug: str, scale: float, now: datetime, days: int) -> list[dict[str, Any]]:
    """A month of plausible traffic, hour by hour, the same for the same hour on every run."""
    events: list[dict[str, Any]] = []
    first_hour = (now - timedelta(days=days)).replace(minute=0, second=0, microsecond=0)
    hours = int((now - first_hour).total_seconds() // 3600)
    for h in range(hours + 1):
        hour = first_hour + timedelta(hours=h)
        # Seeded by organisation and hour, so a re-run regenerates the same events and keys.
        rng = random.Random(f"{slug}:{hour.isoformat()}")  # noqa: S311 - demo data
        daylight = 0.3 + 0.7 * max(0.0, math.sin(math.pi * (hour.hour - 6) / 14))
        weekday = 1.0 if hour.weekday() < 5 else 0.4

        def at(minute_fraction: float, hour: datetime = hour) -> datetime | None:
            instant = hour + timedelta(seconds=int(minute_fraction * 3600))
            return instant if instant <= now else None

        for i in range(int(rng.gauss(40, 8) * daylight * weekday * scale)):
            if (ts := at(rng.random())) is not None:
                events.append(
                    _event(
                        "api_calls",
                        f"{hour:%Y%m%d%H}:call:{i}",
                        ts,
                        {"endpoint": rng.choice(ENDPOINTS), "region": rng.choice(["eu", "us"])},
                    )
                )
        for i in range(int(6 * daylight * weekday * scale) + 1):
            if (ts := at(rng.random())) is not None:
                tokens = int(rng.lognormvariate(7, 0.8))
                events.append(
                    _event(
                        "ai_tokens",
                        f"{hour:%Y%m%d%H}:ai:{i}",
                        ts,
                        {"tokens": tokens, "model": rng.choice(MODELS)},
                    )
                )
        for i in range(int(10 * daylight * scale) + 1):
            if (ts := at(rng.random())) is not None:
                user = f"user_{rng.randint(1, int(200 * scale) + 5)}"
                events.append(
                    _event("active_users", f"{hour:%Y%m%d%H}:mau:{i}", ts, {"user_id": user})
                )
        if hour.hour % 6 == 0 and (ts := at(0)) is not None:
            gb = round(100 * scale + 0.8 * scale * h / 6 + rng.uniform(-2, 2), 3)
            events.append(_event("storage_gb", f"{hour:%Y%m%d%H}:gb", ts, {"gb": str(gb)}))
        if hour.hour == 9 and (ts := at(0)) is not None:
            seats = int(20 * scale) + h // 120
            events.append(_event("seats", f"{hour:%Y%m%d%H}:seats", ts, {"seats": seats}))
    return events


def _event(meter: str, key: str, ts: datetime, properties: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_name": meter,
        "idempotency_key": f"demo:{key}",
        "timestamp": ts.isoformat(),
        "properties": properties,
    }


def days_back(now: datetime) -> int:
    """Days since the first of last month: the demo subscriptions' start."""
    first = add_months(now.date().replace(day=1), -1)
    return (now.date() - first).days
