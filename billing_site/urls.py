from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from billing_site.api import api

urlpatterns = [
    path("", RedirectView.as_view(pattern_name="portal:dashboard", permanent=False)),
    path("portal/", include("portal.urls")),
    path("admin/", admin.site.urls),
    path("api/v1/", api.urls),
    # Stripe's webhooks: dj-stripe checks the signature, mirrors the object, then our handlers run.
    path("stripe/", include("djstripe.urls", namespace="djstripe")),
]
