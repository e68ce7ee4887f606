"""Forms that take a price spec as one JSON document and name the field that is wrong."""

from __future__ import annotations

from typing import Any

from django import forms

from plans.models import CreditGrant, PriceVersion, Subscription
from plans.pricing import PriceSpec, PriceSpecError, parse_price_spec
from usage.models import Meter

SPEC_HELP = (
    'One JSON document, e.g. {"model": "graduated", "tiers": [{"up_to": "10000", '
    '"unit_price": "0"}, {"up_to": null, "unit_price": "0.001"}]}. Models: standard, package, '
    "graduated, volume, percentage, graduated_percentage; any may add discount_percent, "
    "minimum_amount, maximum_amount. Money and quantities are decimal strings."
)


def clean_price_spec(document: Any) -> PriceSpec:
    try:
        return parse_price_spec(document)
    except PriceSpecError as exc:
        raise forms.ValidationError(f"{exc.field}: {exc.message}", code="invalid_price") from exc


class PriceVersionForm(forms.ModelForm[PriceVersion]):
    spec = forms.JSONField(
        help_text=SPEC_HELP, widget=forms.Textarea(attrs={"rows": 6, "cols": 80})
    )

    class Meta:
        model = PriceVersion
        fields = ["spec", "effective_from", "note"]

    def clean_spec(self) -> Any:
        clean_price_spec(self.cleaned_data["spec"])
        return self.cleaned_data["spec"]


class SubscriptionForm(forms.ModelForm[Subscription]):
    """Subscriptions made in the admin get the checks `subscription_create` makes."""

    anchor = forms.DateTimeField(
        required=False, help_text="Periods step from this instant; empty: the start."
    )

    class Meta:
        model = Subscription
        fields = ["organisation", "plan", "start", "anchor", "end", "status"]

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        organisation, plan = data.get("organisation"), data.get("plan")
        if organisation and plan and plan.currency != organisation.currency:
            raise forms.ValidationError(
                f"The plan bills in {plan.currency}; {organisation} pays in "
                f"{organisation.currency}."
            )
        if not data.get("anchor") and data.get("start"):
            data["anchor"] = data["start"]
            self.instance.anchor = data["start"]
        if organisation and not self.instance.pk:
            # Copied once: a later change of the organisation's zone does not move periods.
            self.instance.timezone = organisation.timezone
        return data


class PricePreviewForm(forms.Form):
    """A candidate price for one meter, to compare with what the customer pays now."""

    meter = forms.ModelChoiceField(queryset=Meter.objects.all(), required=False)
    spec = forms.JSONField(
        required=False, help_text=SPEC_HELP, widget=forms.Textarea(attrs={"rows": 6, "cols": 80})
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("spec") not in (None, "") and not data.get("meter"):
            raise forms.ValidationError("Choose the meter the candidate price is for.")
        if data.get("spec") not in (None, ""):
            data["parsed"] = clean_price_spec(data["spec"])
        return data


class CreditGrantForm(forms.ModelForm[CreditGrant]):
    class Meta:
        model = CreditGrant
        fields = [
            "organisation",
            "amount_minor",
            "currency",
            "category",
            "priority",
            "effective_from",
            "expires_at",
            "description",
        ]
        help_texts = {"amount_minor": "In minor units: cents for USD, yen for JPY."}

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        organisation, currency = data.get("organisation"), data.get("currency")
        if organisation and currency and currency.upper() != organisation.currency:
            raise forms.ValidationError(
                f"{organisation} is billed in {organisation.currency}; a grant in {currency} "
                "could never be used."
            )
        return data
