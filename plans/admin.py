"""Staff manage plans, prices (as versions), subscriptions and overrides; preview a price."""

from __future__ import annotations

import json
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html

from plans.forms import (
    CreditGrantForm,
    PricePreviewForm,
    PriceVersionForm,
    SubscriptionForm,
    clean_price_spec,
)
from plans.models import CreditGrant, CreditLedgerEntry, Plan, Price, PriceVersion, Subscription
from plans.selectors import period_cost, subscription_period, subscription_previous_period
from plans.services import price_set


class PriceInline(admin.TabularInline[Price, Plan]):
    model = Price
    fk_name = "plan"
    extra = 0
    fields = ["meter", "description", "versions_link"]
    readonly_fields = ["versions_link"]

    @admin.display(description="Spec")
    def versions_link(self, price: Price) -> str:
        if not price.pk:
            return "Save, then add the spec on the price's page."
        url = reverse("admin:plans_price_change", args=[price.pk])
        return format_html('<a href="{}">{} version(s)</a>', url, price.versions.count())


@admin.register(Plan)
class PlanAdmin(admin.ModelAdmin[Plan]):
    list_display = ["code", "name", "currency", "interval", "base_fee"]
    search_fields = ["code", "name"]
    inlines = [PriceInline]


class PriceVersionInline(admin.StackedInline[PriceVersion, Price]):
    """Versions are added, never edited: a new version applies from its effective instant."""

    model = PriceVersion
    form = PriceVersionForm
    extra = 1
    fields = ["spec", "effective_from", "note"]

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin[Price]):
    list_display = ["meter", "plan", "subscription", "description", "created_at"]
    list_filter = ["plan"]
    search_fields = ["meter__code", "plan__code", "subscription__organisation__slug"]
    inlines = [PriceVersionInline]

    class Media:
        js = ["plans/spec_check.js"]

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        # New versions go through the service: its defaults and its no-backdating rule.
        price: Price = form.instance
        # The admin's change message reads these; the service below does the saving.
        formset.new_objects, formset.changed_objects, formset.deleted_objects = [], [], []
        for version_form in formset.forms:
            data = getattr(version_form, "cleaned_data", None)
            if not data or data.get("DELETE") or version_form.instance.pk:
                continue
            try:
                version = price_set(
                    meter=price.meter,
                    plan=price.plan,
                    subscription=price.subscription,
                    spec=data["spec"],
                    effective_from=data.get("effective_from"),
                    note=data.get("note", ""),
                    created_by=request.user if request.user.is_authenticated else None,
                )
                formset.new_objects.append(version)
            except ValidationError as exc:
                messages.error(request, f"Version not added: {'; '.join(exc.messages)}")

    def get_urls(self) -> list[URLPattern]:
        check = path(
            "check-spec/",
            self.admin_site.admin_view(self.check_spec),
            name="plans_price_check_spec",
        )
        return [check, *super().get_urls()]

    def check_spec(self, request: HttpRequest) -> HttpResponse:
        """Validate a spec as staff type it: {"ok": true} or {"ok": false, "error": "..."}."""
        try:
            clean_price_spec(json.loads(request.POST.get("spec", "")))
        except json.JSONDecodeError as exc:
            return JsonResponse({"ok": False, "error": f"Not JSON: {exc.msg} (char {exc.pos})"})
        except ValidationError as exc:
            return JsonResponse({"ok": False, "error": exc.messages[0]})
        return JsonResponse({"ok": True})


class OverrideInline(admin.TabularInline[Price, Subscription]):
    model = Price
    fk_name = "subscription"
    extra = 0
    fields = ["meter", "description", "versions_link"]
    readonly_fields = ["versions_link"]
    verbose_name = "price override"
    verbose_name_plural = "price overrides (this customer only)"

    @admin.display(description="Spec")
    def versions_link(self, price: Price) -> str:
        return PriceInline.versions_link(self, price)  # type: ignore[arg-type]


@admin.register(Subscription)
class SubscriptionAdmin(admin.ModelAdmin[Subscription]):
    list_display = ["organisation", "plan", "status", "start", "end", "anchor", "preview_link"]
    list_filter = ["status", "plan"]
    search_fields = ["organisation__name", "organisation__slug"]
    inlines = [OverrideInline]
    form = SubscriptionForm
    readonly_fields = ["timezone"]

    @admin.display(description="Price preview")
    def preview_link(self, subscription: Subscription) -> str:
        url = reverse("admin:plans_subscription_preview", args=[subscription.pk])
        return format_html('<a href="{}">preview</a>', url)

    def get_urls(self) -> list[URLPattern]:
        preview = path(
            "<int:pk>/preview/",
            self.admin_site.admin_view(self.preview_view),
            name="plans_subscription_preview",
        )
        return [preview, *super().get_urls()]

    def preview_view(self, request: HttpRequest, pk: int) -> HttpResponse:
        """What the customer pays for the last closed period and the current one so far, under
        their price and under a candidate spec: the check before changing their tiers."""
        subscription = get_object_or_404(
            Subscription.objects.select_related("plan", "organisation"), pk=pk
        )
        if not self.has_view_permission(request, subscription):
            raise PermissionDenied
        now = timezone.now()
        form = PricePreviewForm(request.GET or None)
        candidates = {}
        if form.is_valid() and form.cleaned_data.get("parsed"):
            candidates = {form.cleaned_data["meter"].pk: form.cleaned_data["parsed"]}
        periods = [
            (
                "Last closed period",
                subscription_previous_period(subscription=subscription, at=now),
                None,
            ),
            ("Current period so far", subscription_period(subscription=subscription, at=now), now),
        ]
        rows = []
        for title, period, as_of in periods:
            current = period_cost(subscription=subscription, period=period, as_of=as_of)
            candidate = (
                period_cost(
                    subscription=subscription, period=period, as_of=as_of, candidates=candidates
                )
                if candidates
                else None
            )
            by_meter = {line.meter.pk: line for line in candidate.lines} if candidate else {}
            lines = [
                {
                    "current": line,
                    "candidate": by_meter.get(line.meter.pk),
                    "difference": by_meter[line.meter.pk].cost.amount - line.cost.amount
                    if line.meter.pk in by_meter
                    else None,
                }
                for line in current.lines
            ]
            rows.append(
                {
                    "title": title,
                    "period": period,
                    "current": current,
                    "candidate": candidate,
                    "lines": lines,
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": f"Price preview: {subscription}",
            "subscription": subscription,
            "opts": self.model._meta,
            "form": form,
            "rows": rows,
        }
        return TemplateResponse(request, "admin/plans/subscription/preview.html", context)


class CreditLedgerInline(admin.TabularInline[CreditLedgerEntry, CreditGrant]):
    model = CreditLedgerEntry
    extra = 0
    can_delete = False
    fields = ("at", "kind", "amount_minor", "reference")
    readonly_fields = ("at", "kind", "amount_minor", "reference")

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(CreditGrant)
class CreditGrantAdmin(admin.ModelAdmin[CreditGrant]):
    """Staff grant credit here; its use and expiry show in the ledger below it."""

    list_display = [
        "organisation",
        "amount_minor",
        "currency",
        "category",
        "priority",
        "effective_from",
        "expires_at",
        "description",
    ]
    list_filter = ["category", "currency"]
    search_fields = ["organisation__name", "organisation__slug", "description"]
    inlines = [CreditLedgerInline]
    form = CreditGrantForm

    def get_readonly_fields(
        self, request: HttpRequest, obj: CreditGrant | None = None
    ) -> list[str]:
        # A grant is fixed once made: its ledger explains every later movement.
        if obj is None:
            return []
        return [f.name for f in CreditGrant._meta.fields]

    def save_model(self, request: HttpRequest, obj: CreditGrant, form: Any, change: bool) -> None:
        if change:
            return
        from plans.services import credit_grant_create

        created = credit_grant_create(
            organisation=obj.organisation,
            amount_minor=obj.amount_minor,
            currency=obj.currency,
            category=obj.category,
            priority=obj.priority,
            effective_from=obj.effective_from,
            expires_at=obj.expires_at,
            description=obj.description,
            created_by=request.user if request.user.is_authenticated else None,
        )
        obj.pk = created.pk
