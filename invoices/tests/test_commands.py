import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command

from accounts.tests.factories import make_organisation
from invoices.models import Invoice
from plans.tests.factories import make_plan, make_subscription

ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture
def customers(db):
    plan = make_plan(base_fee=Decimal("12.50"))
    acme = make_organisation(slug="acme")
    make_subscription(acme, plan, ANCHOR)
    make_subscription(make_organisation(slug="globex"), plan, ANCHOR)
    return acme


def test_close_periods_dry_run_stores_nothing(customers):
    out = run("close_periods", "--as-of", "2026-03-01T02:00:00Z", "--dry-run")
    assert "4 period(s) due" in out
    assert "would invoice acme" in out
    assert not Invoice.objects.exists()


def test_close_periods_for_one_organisation_then_all(customers):
    out = run("close_periods", "--as-of", "2026-02-01T01:00:00+00:00", "--organisation", "acme")
    assert out.startswith("closed 1 period(s), 0 already closed")
    assert "1250 USD" in out
    assert Invoice.objects.get().organisation == customers
    out = run("close_periods", "--as-of", "2026-02-01T01:00:00Z")
    assert out.startswith("closed 1 period(s)")
    assert run("close_periods", "--as-of", "2026-02-01T01:00:00Z").startswith("closed 0 period(s)")


@pytest.mark.parametrize(
    "args",
    [("--as-of", "yesterday"), ("--as-of", "2026-02-01T01:00:00"), ("--organisation", "nobody")],
)
def test_close_periods_refuses_bad_arguments(customers, args):
    with pytest.raises(CommandError):
        run("close_periods", *args)


def test_scheduled_close_uses_the_intended_time_not_the_clock(customers):
    from invoices.tasks import close_due_periods

    # Intended for 00:30, run late at whatever time it is now: the grace window is still open
    # at the intended time, so nothing closes.
    assert close_due_periods(intended_date="2026-02-01T00:30:00+00:00").startswith("closed 0")
    assert close_due_periods(intended_date="2026-02-01T01:00:00+00:00").startswith("closed 2")
    # Events received up to two minutes (BILLING_CUTOFF_SETTLE) before the intended time count.
    assert {i.cutoff for i in Invoice.objects.all()} == {datetime(2026, 2, 1, 0, 58, tzinfo=UTC)}
