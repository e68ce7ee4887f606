"""Staff define meters (with their spec as one JSON document) and search events."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from usage.aggregation import MeterSpec, SpecError
from usage.models import Meter, UsageEvent
from usage.selectors import meter_cache_clear


class MeterForm(forms.ModelForm[Meter]):
    spec = forms.JSONField(
        help_text='The meter spec, as in the API and CLI: {"aggregation": "sum", '
        '"property": "tokens", "filters": {"region": ["eu", "us"]}}. Aggregations: count, sum, '
        "max, unique_count, latest, weighted_sum."
    )

    class Meta:
        model = Meter
        fields = ["code", "name", "unit", "description"]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["spec"].initial = self.instance.spec.to_json()

    def clean_spec(self) -> MeterSpec:
        try:
            spec = MeterSpec.from_json(self.cleaned_data["spec"])
        except SpecError as exc:
            raise forms.ValidationError(str(exc)) from exc
        # Set before the model's own validation (which runs after the form's clean methods).
        self.instance.aggregation = spec.aggregation.value
        self.instance.property_name = spec.property or ""
        self.instance.filters = {name: list(values) for name, values in spec.filters.items()}
        return spec

    def save(self, commit: bool = True) -> Meter:
        meter = super().save(commit)
        meter_cache_clear()
        return meter


@admin.register(Meter)
class MeterAdmin(admin.ModelAdmin[Meter]):
    form = MeterForm
    list_display = ["code", "name", "aggregation", "property_name", "unit", "created_at"]
    search_fields = ["code", "name"]

    def get_readonly_fields(self, request: HttpRequest, obj: Meter | None = None) -> list[str]:
        # Once events reference a meter, changing its code would orphan what clients send.
        return ["code"] if obj is not None else []

    def get_form(
        self, request: HttpRequest, obj: Meter | None = None, change: bool = False, **kwargs: Any
    ) -> type[forms.ModelForm[Meter]]:
        form = super().get_form(request, obj, change, **kwargs)
        if obj is not None and UsageEvent.objects.filter(meter=obj).exists():
            # Events were stored under this definition; a new definition is a new meter.
            form.base_fields["spec"].disabled = True
            form.base_fields[
                "spec"
            ].help_text = (
                "Fixed: events were recorded under this spec. Create a new meter to change it."
            )
        return form


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin[UsageEvent]):
    """Events are append-only: staff can search and read them, never edit them."""

    list_display = ["timestamp", "organisation", "meter", "quantity", "idempotency_key", "source"]
    list_filter = ["meter", "source"]
    search_fields = ["=idempotency_key", "organisation__slug"]
    list_select_related = ["organisation", "meter"]
    show_full_result_count = False
    ordering = ["-timestamp", "-id"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: UsageEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageEvent | None = None) -> bool:
        return False
