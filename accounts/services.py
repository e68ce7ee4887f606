"""Writes for organisations, memberships and API keys."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import Q
from django.utils import timezone
from django.utils.text import slugify

from accounts.models import APIKey, Membership, Organisation

API_KEY_PREFIX = "ml_"
# digest -> (key with its organisation, when it was read). A few seconds of caching saves the
# lookup on most requests (a third of a single-event request's CPU); the price is that a revoked
# key keeps working in other processes for up to API_KEY_CACHE_SECONDS.
_KEY_CACHE: dict[str, tuple[APIKey, float]] = {}
_KEY_CACHE_LIMIT = 10_000


def api_key_cache_clear() -> None:
    _KEY_CACHE.clear()


@dataclass(frozen=True)
class IssuedAPIKey:
    """A freshly created key: the stored row and the secret, which is never shown again."""

    api_key: APIKey
    secret: str


def organisation_create(
    *,
    name: str,
    slug: str | None = None,
    currency: str = "USD",
    timezone_name: str = "UTC",
    billing_email: str = "",
) -> Organisation:
    organisation = Organisation(
        name=name,
        slug=slug or slugify(name),
        currency=currency.upper(),
        timezone=timezone_name,
        billing_email=billing_email,
    )
    organisation.full_clean()
    organisation.save()
    return organisation


def membership_add(
    *, organisation: Organisation, user: User, role: str = Membership.Role.MEMBER
) -> Membership:
    membership, _ = Membership.objects.update_or_create(
        organisation=organisation, user=user, defaults={"role": role}
    )
    return membership


def api_key_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def api_key_create(
    *, organisation: Organisation, name: str, created_by: User | None = None
) -> IssuedAPIKey:
    """Create a key for `organisation` and return it with its secret, shown this once only."""
    prefix = API_KEY_PREFIX + secrets.token_hex(4)
    secret = f"{prefix}_{secrets.token_urlsafe(32)}"
    api_key = APIKey(
        organisation=organisation,
        name=name,
        prefix=prefix,
        digest=api_key_digest(secret),
        created_by=created_by,
    )
    api_key.full_clean()
    api_key.save()
    return IssuedAPIKey(api_key=api_key, secret=secret)


def api_key_revoke(*, api_key: APIKey, at: datetime | None = None) -> APIKey:
    """Revoke a key: at once in this process, within API_KEY_CACHE_SECONDS in every other."""
    _KEY_CACHE.pop(api_key.digest, None)
    if api_key.revoked_at is None:
        api_key.revoked_at = at or timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


def api_key_authenticate(*, secret: str, now: datetime | None = None) -> APIKey | None:
    """Return the active key matching `secret` (with its organisation), or None.

    `last_used_at` is refreshed at most once per API_KEY_LAST_USED_INTERVAL, so a busy key costs
    one read per request and one write per interval, not one write per request.
    """
    if not secret.startswith(API_KEY_PREFIX) or len(secret) > 200:
        return None
    digest = api_key_digest(secret)
    cached = _KEY_CACHE.get(digest)
    if cached is not None and time.monotonic() - cached[1] < settings.API_KEY_CACHE_SECONDS:
        api_key: APIKey | None = cached[0]
    else:
        api_key = (
            APIKey.objects.select_related("organisation")
            .filter(digest=digest, revoked_at__isnull=True)
            .first()
        )
        if api_key is not None and settings.API_KEY_CACHE_SECONDS > 0:
            if len(_KEY_CACHE) >= _KEY_CACHE_LIMIT:
                _KEY_CACHE.clear()
            _KEY_CACHE[digest] = (api_key, time.monotonic())
    # The digest is looked up by an index; compare again in constant time for good measure.
    if api_key is None or not hmac.compare_digest(api_key.digest, digest):
        return None
    now = now or timezone.now()
    stale_before = now - settings.API_KEY_LAST_USED_INTERVAL
    if api_key.last_used_at is None or api_key.last_used_at < stale_before:
        # Conditional update: of many concurrent requests, at most one writes per interval.
        APIKey.objects.filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lt=stale_before), pk=api_key.pk
        ).update(last_used_at=now)
        api_key.last_used_at = now
    return api_key
