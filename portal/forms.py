"""The portal's forms: login (with throttling of repeated failures) and alert rules."""

from __future__ import annotations

import hashlib
from decimal import Decimal, InvalidOperation
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth.forms import AuthenticationForm
from django.core.cache import cache
from django.core.validators import validate_email

from alerts.models import AlertRule, AlertThreshold
from usage.models import Meter


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


class AlertRuleForm(forms.Form):
    """A customer's alert rule: what to watch, the thresholds ("50%, 80%, 10000"), channels."""

    metric = forms.ChoiceField(choices=AlertRule.Metric.choices)
    meter = forms.ModelChoiceField(
        queryset=Meter.objects.all(),
        required=False,
        to_field_name="code",
        empty_label="Whole invoice (cost rules)",
    )
    name = forms.CharField(max_length=200, required=False)
    thresholds = forms.CharField(
        max_length=500,
        help_text='Comma-separated: "80%" is a share of what the plan includes (free units, or '
        'the committed amount for cost), "10000" an absolute number of units or currency units.',
    )
    email_to = forms.CharField(max_length=1000, required=False, help_text="Comma-separated.")
    webhook_url = forms.URLField(max_length=500, required=False, assume_scheme="https")
    show_banner = forms.BooleanField(required=False, initial=True)

    def clean_thresholds(self) -> list[tuple[str, Decimal]]:
        parsed: list[tuple[str, Decimal]] = []
        for token in self.cleaned_data["thresholds"].replace(";", ",").split(","):
            text = token.strip().replace(" ", "")
            if not text:
                continue
            kind = (
                AlertThreshold.Kind.PERCENT if text.endswith("%") else AlertThreshold.Kind.ABSOLUTE
            )
            try:
                value = Decimal(text.rstrip("%").replace("_", ""))
            except InvalidOperation:
                raise forms.ValidationError(f"{token.strip()!r} is not a number.") from None
            if not value.is_finite() or value <= 0 or value >= Decimal("1e17"):
                raise forms.ValidationError(f"{token.strip()!r}: thresholds are positive numbers.")
            if value.as_tuple().exponent < -6:  # type: ignore[operator]
                raise forms.ValidationError(f"{token.strip()!r}: at most 6 decimal places.")
            parsed.append((kind, value))
        if not parsed:
            raise forms.ValidationError("Give at least one threshold.")
        if len(parsed) > 10:
            raise forms.ValidationError("At most 10 thresholds per rule.")
        return parsed

    def clean_email_to(self) -> list[str]:
        addresses = [a.strip() for a in self.cleaned_data["email_to"].split(",") if a.strip()]
        for address in addresses:
            validate_email(address)
        return addresses

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("metric") == AlertRule.Metric.USAGE and not cleaned.get("meter"):
            self.add_error("meter", "A usage rule watches one meter.")
        channels = (
            cleaned.get("email_to") or cleaned.get("webhook_url") or cleaned.get("show_banner")
        )
        if "email_to" in cleaned and not channels:
            raise forms.ValidationError("Choose at least one channel: email, webhook or banner.")
        return cleaned
