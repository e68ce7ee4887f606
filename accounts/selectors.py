"""Reads for organisations and API keys."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.models import APIKey, Organisation


def organisation_get(*, slug: str) -> Organisation:
    return Organisation.objects.get(slug=slug)


def api_key_list(*, organisation: Organisation) -> QuerySet[APIKey]:
    return APIKey.objects.filter(organisation=organisation).order_by("-created_at")
