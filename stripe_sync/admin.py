"""Staff see every link to Stripe, and what is pending, parked or too old in the outbox."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from stripe_sync.models import (
    OutboxEvent,
    PeriodSummaryEvent,
    StripeCustomer,
    StripeInvoice,
    StripeMeter,
)
from stripe_sync.services import outbox_requeue


@admin.register(StripeCustomer)
class StripeCustomerAdmin(admin.ModelAdmin[StripeCustomer]):
    list_display = ["organisation", "stripe_id", "email", "updated_at"]
    search_fields = ["organisation__name", "stripe_id", "email"]
    readonly_fields = ["email", "name", "created_at", "updated_at"]


@admin.register(StripeMeter)
class StripeMeterAdmin(admin.ModelAdmin[StripeMeter]):
    list_display = ["meter", "mode", "event_name", "stripe_id", "provisioned_at"]
    fields = ["meter", "mode", "event_name", "stripe_id", "provisioned_at"]
    # The event name is set once from the meter's code; the schedule provisions the meter.
    readonly_fields = ["event_name", "stripe_id", "provisioned_at"]


class _DeliveryAdmin(admin.ModelAdmin[Any]):
    list_filter = ["state"]
    search_fields = ["last_error"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(OutboxEvent)
class OutboxEventAdmin(_DeliveryAdmin):
    list_display = [
        "identifier",
        "organisation",
        "meter",
        "quantity",
        "timestamp",
        "state",
        "attempts",
        "next_attempt_at",
        "last_error",
    ]
    actions = ["requeue"]

    @admin.action(description="Send the selected parked events again")
    def requeue(self, request: HttpRequest, queryset: QuerySet[OutboxEvent]) -> None:
        count = outbox_requeue(ids=queryset.values_list("id", flat=True))
        self.message_user(request, f"{count} event(s) back in the outbox.", messages.SUCCESS)


@admin.register(PeriodSummaryEvent)
class PeriodSummaryEventAdmin(_DeliveryAdmin):
    list_display = [
        "identifier",
        "organisation",
        "meter",
        "value",
        "timestamp",
        "state",
        "attempts",
        "last_error",
    ]


@admin.register(StripeInvoice)
class StripeInvoiceAdmin(admin.ModelAdmin[StripeInvoice]):
    list_display = [
        "invoice",
        "stripe_id",
        "stripe_status",
        "finalized_at",
        "paid_at",
        "payment_failures",
        "last_error",
    ]
    search_fields = ["stripe_id", "invoice__number"]

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False
