"""The customer portal: thin views over the selectors and services of the apps below.

Every page renders whole on a normal request and as its named partial on an HTMX request.
Every object is looked up within the user's current organisation: anything else is a 404.
"""

from __future__ import annotations

import csv
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.db.models.fields.json import KeyTransform
from django.http import Http404, HttpRequest, HttpResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.utils import timezone
from django.views.decorators.http import require_POST
from django_htmx.http import reswap, retarget

from accounts.models import APIKey, Organisation
from accounts.selectors import api_key_list
from accounts.services import api_key_create, api_key_revoke
from alerts.models import AlertFiring, AlertRule
from alerts.selectors import banners_active, firings_of, rule_statuses
from alerts.services import alert_firing_acknowledge, alert_rule_create, alert_rule_set_active
from alerts.services import alert_rule_delete as alert_rule_delete_service
from core.periods import Period
from invoices.documents import invoice_context, invoice_document_create
from invoices.models import Invoice
from invoices.selectors import invoice_get, invoice_list
from invoices.services import invoice_preview
from plans.pricing import included_units
from plans.selectors import (
    credit_balance,
    credit_ledger,
    period_cost,
    subscription_active,
    subscription_period,
)
from portal.forms import AlertRuleForm
from portal.tenancy import current_organisation, organisation_switch, organisations_of
from usage.models import Meter
from usage.selectors import Granularity, event_list, usage_series

# While a period is open its numbers change; HTMX polls this often.
POLL_SECONDS = 5
# "Stop polling": htmx stops a trigger that answers 286.
STOP_POLLING = 286
EVENTS_PER_PAGE = 25


def _page(
    request: HttpRequest,
    organisation: Organisation,
    template: str,
    partial: str,
    context: dict[str, Any],
) -> TemplateResponse:
    context = {**context, "organisation": organisation, "organisations": organisations_of(request)}
    if getattr(request, "htmx", False):
        return TemplateResponse(request, f"{template}#{partial}", context)
    return TemplateResponse(request, template, context)


@login_required
def dashboard(request: HttpRequest) -> HttpResponse:
    organisation = current_organisation(request)
    now = timezone.now()
    subscription = subscription_active(organisation=organisation, at=now)
    context: dict[str, Any] = {
        "now": now,
        "poll": POLL_SECONDS,
        "banners": banners_active(organisation=organisation),
    }
    if subscription is not None:
        period = subscription_period(subscription=subscription, at=now)
        cost = period_cost(subscription=subscription, period=period, as_of=now)
        context.update(
            subscription=subscription,
            period=period,
            cost=cost,
            currency=subscription.plan.currency,
            days_left=max((period.end - now).days, 0),
            meters=[{"line": line, "included": included_units(line.spec)} for line in cost.lines],
            credit=credit_balance(
                organisation=organisation, currency=subscription.plan.currency, at=now
            ),
        )
    response = _page(request, organisation, "portal/dashboard.html", "dashboard-numbers", context)
    if request.htmx and subscription is None:  # type: ignore[attr-defined]
        response.status_code = STOP_POLLING  # nothing will change
    return response


def _meter_or_404(code: str) -> Meter:
    meter = Meter.objects.filter(code=code).first()
    if meter is None:
        raise Http404("No such meter.")
    return meter


def _period_from(request: HttpRequest, default: Period) -> Period:
    """The date range asked for in ?start=YYYY-MM-DD&end=YYYY-MM-DD (end inclusive), else the
    current period."""
    try:
        start = datetime.combine(datetime.fromisoformat(request.GET["start"]).date(), time(0), UTC)
        end = datetime.combine(
            datetime.fromisoformat(request.GET["end"]).date(), time(0), UTC
        ) + timedelta(days=1)
        return Period(start, end)
    except (KeyError, ValueError):
        return default


def _requested_period(
    request: HttpRequest, organisation: Organisation, *, until_now: bool = False
) -> Period:
    """The range asked for, else the current billing period (to now with `until_now`), else the
    last 30 days for an organisation without a subscription."""
    now = timezone.now()
    subscription = subscription_active(organisation=organisation, at=now)
    if subscription is None:
        default = Period(now - timedelta(days=30), now)
    else:
        current = subscription_period(subscription=subscription, at=now)
        default = Period(current.start, now) if until_now else current
    return _period_from(request, default)


@login_required
def usage_detail(request: HttpRequest, code: str) -> HttpResponse:
    organisation = current_organisation(request)
    meter = _meter_or_404(code)
    period = _requested_period(request, organisation, until_now=True)
    events = event_list(organisation=organisation, meter=meter, period=period)
    prop, value = request.GET.get("property", "")[:64], request.GET.get("value", "")
    if prop:
        # Compared as JSON, like meter filters: the string "eu" matches "eu", not a number.
        events = events.alias(_prop=KeyTransform(prop, "properties")).filter(_prop=value)
    page = Paginator(events, EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    # Days in the organisation's zone, or hours (?by=hour) for a closer look.
    granularity: Granularity = "hour" if request.GET.get("by") == "hour" else "day"
    series = usage_series(
        organisation=organisation, meter=meter, period=period, granularity=granularity
    )
    label = "%d %b %H:%M" if granularity == "hour" else "%d %b"
    others = request.GET.copy()
    others.pop("by", None)
    others.pop("page", None)
    context = {
        "meter": meter,
        "period": period,
        "page": page,
        "series": series,
        "granularity": granularity,
        "others": others.urlencode(),
        "chart": {
            "labels": [
                bucket.start.astimezone(organisation.tzinfo).strftime(label) for bucket, _ in series
            ],
            "values": [float(value) for _, value in series],  # display only, never billed
        },
        "filters": request.GET.urlencode(),
        "prop": prop,
        "value": value,
    }
    return _page(request, organisation, "portal/usage_detail.html", "events-table", context)


@login_required
def usage_export(request: HttpRequest, code: str) -> StreamingHttpResponse:
    """The period's events as CSV, streamed."""
    organisation = current_organisation(request)
    meter = _meter_or_404(code)
    period = _requested_period(request, organisation)

    class Echo:
        def write(self, value: str) -> str:
            return value

    writer = csv.writer(Echo())

    def rows() -> Any:
        yield writer.writerow(["timestamp", "quantity", "idempotency_key", "properties"])
        for event in event_list(organisation=organisation, meter=meter, period=period).iterator():
            yield writer.writerow(
                [
                    event.timestamp.isoformat(),
                    event.quantity,
                    event.idempotency_key,
                    event.properties,
                ]
            )

    response = StreamingHttpResponse(rows(), content_type="text/csv")
    response["Content-Disposition"] = (
        f'attachment; filename="{organisation.slug}-{meter.code}-{period.start:%Y%m%d}.csv"'
    )
    return response


@login_required
def invoices_index(request: HttpRequest) -> HttpResponse:
    organisation = current_organisation(request)
    return _page(
        request,
        organisation,
        "portal/invoices.html",
        "invoice-list",
        {"invoices": invoice_list(organisation=organisation)},
    )


def _invoice_or_404(request: HttpRequest, pk: int) -> Invoice:
    try:
        return invoice_get(organisation=current_organisation(request), pk=pk)
    except Invoice.DoesNotExist:
        raise Http404("No such invoice.") from None


@login_required
def invoice_detail(request: HttpRequest, pk: int) -> HttpResponse:
    invoice = _invoice_or_404(request, pk)
    return _page(
        request,
        invoice.organisation,
        "portal/invoice_detail.html",
        "invoice-body",
        {"invoice": invoice, "document": invoice_context(invoice)},
    )


@login_required
def invoice_pdf(request: HttpRequest, pk: int) -> HttpResponse:
    invoice = _invoice_or_404(request, pk)
    document = invoice_document_create(invoice=invoice)
    response = HttpResponse(bytes(document.pdf), content_type="application/pdf")
    response["Content-Disposition"] = f'attachment; filename="{invoice.number}.pdf"'
    return response


@login_required
def invoice_upcoming(request: HttpRequest) -> HttpResponse:
    organisation = current_organisation(request)
    now = timezone.now()
    subscription = subscription_active(organisation=organisation, at=now)
    if subscription is None:
        raise Http404("No subscription.")
    draft = invoice_preview(subscription=subscription, at=now)
    return _page(
        request,
        organisation,
        "portal/invoice_detail.html",
        "invoice-body",
        {"invoice": draft, "document": invoice_context(draft), "upcoming": True},
    )


@login_required
def credits_index(request: HttpRequest) -> HttpResponse:
    organisation = current_organisation(request)
    now = timezone.now()
    return _page(
        request,
        organisation,
        "portal/credits.html",
        "credit-ledger",
        {
            "balance": credit_balance(
                organisation=organisation, currency=organisation.currency, at=now
            ),
            "ledger": credit_ledger(organisation=organisation)[:200],
        },
    )


def _api_keys_page(
    request: HttpRequest, organisation: Organisation, **extra: Any
) -> TemplateResponse:
    context = {"api_keys": api_key_list(organisation=organisation), **extra}
    return _page(request, organisation, "portal/api_keys.html", "api-key-list", context)


@login_required
def api_keys_index(request: HttpRequest) -> HttpResponse:
    return _api_keys_page(request, current_organisation(request))


@require_POST
@login_required
def api_key_new(request: HttpRequest) -> HttpResponse:
    organisation = current_organisation(request)
    name = (request.POST.get("name") or "").strip()[:100] or "portal key"
    issued = api_key_create(organisation=organisation, name=name, created_by=request.user)  # type: ignore[arg-type]
    return _api_keys_page(request, organisation, new_secret=issued.secret)


@require_POST
@login_required
def api_key_revoke_view(request: HttpRequest, pk: int) -> HttpResponse:
    organisation = current_organisation(request)
    api_key = APIKey.objects.filter(organisation=organisation, pk=pk).first()
    if api_key is None:
        raise Http404("No such key.")
    api_key_revoke(api_key=api_key)
    return _api_keys_page(request, organisation)


# --- Alerts ---------------------------------------------------------------------------------


def _alerts_page(
    request: HttpRequest,
    organisation: Organisation,
    form: AlertRuleForm | None = None,
    **extra: Any,
) -> TemplateResponse:
    now = timezone.now()
    context = {
        "statuses": rule_statuses(organisation=organisation, as_of=now),
        "firings": firings_of(organisation=organisation, limit=20),
        "form": form or AlertRuleForm(initial={"show_banner": True}),
        **extra,
    }
    return _page(request, organisation, "portal/alerts.html", "alert-rules", context)


def _rule_or_404(organisation: Organisation, pk: int) -> AlertRule:
    rule = AlertRule.objects.filter(organisation=organisation, pk=pk).first()
    if rule is None:
        raise Http404("No such alert rule.")
    return rule


@login_required
def alerts_index(request: HttpRequest) -> HttpResponse:
    return _alerts_page(request, current_organisation(request))


@require_POST
@login_required
def alert_rule_new(request: HttpRequest) -> HttpResponse:
    organisation = current_organisation(request)
    form = AlertRuleForm(request.POST)
    if not form.is_valid():
        response = _alerts_page(request, organisation, form=form)
        if request.htmx:  # type: ignore[attr-defined]
            # The form, not the list, shows the errors (htmx swaps only 2xx answers).
            response.template_name = "portal/alerts.html#alert-rule-form"
            return reswap(retarget(response, "#alert-rule-form"), "outerHTML")
        return response
    data = form.cleaned_data
    rule = alert_rule_create(
        organisation=organisation,
        metric=data["metric"],
        meter=data["meter"],
        name=data["name"],
        thresholds=data["thresholds"],
        email_to=data["email_to"],
        webhook_url=data["webhook_url"],
        show_banner=data["show_banner"],
    )
    return _alerts_page(request, organisation, created=rule)


@require_POST
@login_required
def alert_rule_delete(request: HttpRequest, pk: int) -> HttpResponse:
    organisation = current_organisation(request)
    alert_rule_delete_service(rule=_rule_or_404(organisation, pk))
    return _alerts_page(request, organisation)


@require_POST
@login_required
def alert_rule_pause(request: HttpRequest, pk: int) -> HttpResponse:
    organisation = current_organisation(request)
    rule = _rule_or_404(organisation, pk)
    alert_rule_set_active(rule=rule, active=not rule.is_active)
    return _alerts_page(request, organisation)


@require_POST
@login_required
def alert_acknowledge(request: HttpRequest, pk: int) -> HttpResponse:
    organisation = current_organisation(request)
    firing = AlertFiring.objects.filter(organisation=organisation, pk=pk).first()
    if firing is None:
        raise Http404("No such alert.")
    alert_firing_acknowledge(firing=firing)
    if request.htmx:  # type: ignore[attr-defined]
        return TemplateResponse(
            request,
            "portal/dashboard.html#alert-banners",
            {"banners": banners_active(organisation=organisation)},
        )
    return redirect("portal:dashboard")


@require_POST
@login_required
def switch_organisation(request: HttpRequest) -> HttpResponse:
    try:
        organisation_id = int(request.POST.get("organisation", ""))
    except ValueError:
        raise Http404("No such organisation.") from None
    organisation_switch(request, organisation_id)
    return redirect("portal:dashboard")
