"""Staff manage any organisation's rules (and plans' default rules) and see every notification."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from alerts.models import AlertDelivery, AlertFiring, AlertRule, AlertThreshold, DeliveryAttempt


class AlertThresholdInline(admin.TabularInline[AlertThreshold, AlertRule]):
    model = AlertThreshold
    extra = 1


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin[AlertRule]):
    list_display = ["__str__", "organisation", "plan", "metric", "meter", "is_active"]
    list_filter = ["metric", "is_active", "plan"]
    search_fields = ["name", "organisation__name", "organisation__slug"]
    autocomplete_fields = ["organisation"]
    raw_id_fields = ["copied_from"]
    readonly_fields = ["webhook_secret", "created_at"]
    inlines = [AlertThresholdInline]
    fieldsets = [
        (None, {"fields": ["organisation", "plan", "name", "metric", "meter", "is_active"]}),
        (
            "Channels",
            {
                "fields": ["email_to", "webhook_url", "webhook_secret", "show_banner"],
                "description": "A plan's default rule is copied to each new subscriber, emailing "
                "the organisation's billing address.",
            },
        ),
        ("History", {"fields": ["copied_from", "created_at"]}),
    ]


class DeliveryAttemptInline(admin.TabularInline[DeliveryAttempt, AlertDelivery]):
    model = DeliveryAttempt
    extra = 0
    can_delete = False
    readonly_fields = ["at", "ok", "status_code", "error", "duration_ms"]

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AlertDelivery)
class AlertDeliveryAdmin(admin.ModelAdmin[AlertDelivery]):
    list_display = ["firing", "channel", "target", "status", "attempts", "next_attempt_at"]
    list_filter = ["status", "channel"]
    readonly_fields = [f.name for f in AlertDelivery._meta.fields]
    inlines = [DeliveryAttemptInline]


class AlertDeliveryInline(admin.TabularInline[AlertDelivery, AlertFiring]):
    model = AlertDelivery
    extra = 0
    can_delete = False
    readonly_fields = ["channel", "target", "status", "attempts", "sent_at", "last_error"]
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AlertFiring)
class AlertFiringAdmin(admin.ModelAdmin[AlertFiring]):
    list_display = ["rule", "threshold", "organisation", "observed", "limit", "fired_at"]
    list_filter = ["fired_at"]
    search_fields = ["organisation__name", "organisation__slug"]
    readonly_fields = [f.name for f in AlertFiring._meta.fields]
    inlines = [AlertDeliveryInline]
