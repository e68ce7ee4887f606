import io
from decimal import Decimal

import pytest
from django.core.management import call_command

from accounts.models import Organisation
from accounts.services import api_key_authenticate
from invoices.models import Invoice
from plans.models import Subscription
from usage.models import Meter, UsageEvent


def run(*args):
    out = io.StringIO()
    call_command(*args, stdout=out, stderr=io.StringIO())
    return out.getvalue(), ""


@pytest.mark.django_db
def test_seed_demo_is_rerunnable_and_prints_a_working_key():
    out, _ = run("seed_demo", "--days", "3", "--admin-password", "demo-password")
    assert set(Organisation.objects.values_list("slug", flat=True)) == {"acme", "globex", "initech"}
    assert set(Meter.objects.values_list("aggregation", flat=True)) == {
        "count",
        "sum",
        "weighted_sum",
        "latest",
        "unique_count",
    }
    count = UsageEvent.objects.count()
    assert count > 1000
    secret = next(line.split(": ")[-1] for line in out.splitlines() if "API key" in line)
    assert api_key_authenticate(secret=secret).organisation.slug == "acme"
    run("seed_demo", "--days", "3", "--admin-password", "demo-password")
    assert UsageEvent.objects.count() - count < 200  # only the events of the last minutes, if any
    assert UsageEvent.objects.filter(quantity__lt=Decimal(0)).count() == 0
    # Every organisation is subscribed and last month is invoiced, once.
    assert Subscription.objects.count() == 3
    invoices = Invoice.objects.count()
    assert invoices >= 3
    assert Invoice.objects.filter(organisation__slug="acme", credits_minor__gt=0).exists()
    run("seed_demo", "--days", "3", "--admin-password", "demo-password")
    assert Invoice.objects.count() == invoices
