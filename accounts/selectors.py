"""Reads for organisations and API keys."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.models import APIKey, Organisation


def organisation_get(*, slug: str) -> Organisation:
    return Organisation.objects.get(slug=slug)


def organisation_or_error(slug: str) -> Organisation:
    """The organisation a command's `--organisation` names, or a CommandError saying so."""
    from django.core.management.base import CommandError

    try:
        return Organisation.objects.get(slug=slug)
    except Organisation.DoesNotExist as exc:
        raise CommandError(f"No organisation {slug!r}.") from exc


def api_key_list(*, organisation: Organisation) -> QuerySet[APIKey]:
    return APIKey.objects.filter(organisation=organisation).order_by("-created_at")
