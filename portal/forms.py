"""The portal's login form, with throttling of repeated failures."""

from __future__ import annotations

import hashlib
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache


def _keys(request: Any, username: str) -> list[str]:
    address = (request.META.get("REMOTE_ADDR") or "unknown") if request else "unknown"
    return [
        "login-failures:user:" + hashlib.sha256(username.lower().encode()).hexdigest(),
        "login-failures:addr:" + address,
    ]


class ThrottledAuthenticationForm(AuthenticationForm):
    """Refuse further attempts after LOGIN_FAILURE_LIMIT failures for one username or one
    address within LOGIN_FAILURE_WINDOW, even with the right password."""

    def clean(self) -> dict[str, Any]:
        username = self.data.get("username", "")
        keys = _keys(self.request, username)
        if any((cache.get(key) or 0) >= settings.LOGIN_FAILURE_LIMIT for key in keys):
            raise forms.ValidationError(
                "Too many failed attempts. Wait a few minutes and try again.", code="throttled"
            )
        try:
            return super().clean()
        except forms.ValidationError:
            window = int(settings.LOGIN_FAILURE_WINDOW.total_seconds())
            for key in keys:
                cache.add(key, 0, window)
                cache.incr(key)
            raise
