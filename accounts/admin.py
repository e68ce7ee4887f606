from django.contrib import admin

from accounts.models import APIKey, Membership, Organisation


class MembershipInline(admin.TabularInline[Membership, Organisation]):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Organisation)
class OrganisationAdmin(admin.ModelAdmin[Organisation]):
    list_display = ["name", "slug", "currency", "timezone", "billing_email", "created_at"]
    search_fields = ["name", "slug", "billing_email"]
    prepopulated_fields = {"slug": ["name"]}
    inlines = [MembershipInline]


@admin.register(APIKey)
class APIKeyAdmin(admin.ModelAdmin[APIKey]):
    """Keys are created with `create_api_key` or in the portal (the secret is shown once there)."""

    list_display = ["prefix", "name", "organisation", "created_at", "last_used_at", "revoked_at"]
    list_filter = ["organisation"]
    search_fields = ["prefix", "name", "organisation__name"]
    readonly_fields = ["prefix", "digest", "created_at", "created_by", "last_used_at"]
    actions = ["revoke"]

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):  # type: ignore[no-untyped-def]
        from accounts.services import api_key_revoke

        for api_key in queryset:
            api_key_revoke(api_key=api_key)
