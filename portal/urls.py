from django.contrib.auth import views as auth_views
from django.urls import path

from portal import views
from portal.forms import ThrottledAuthenticationForm

app_name = "portal"

urlpatterns = [
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="portal/login.html", authentication_form=ThrottledAuthenticationForm
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", views.dashboard, name="dashboard"),
    path("organisation/", views.switch_organisation, name="switch_organisation"),
    path("usage/<slug:code>/", views.usage_detail, name="usage_detail"),
    path("usage/<slug:code>/export.csv", views.usage_export, name="usage_export"),
    path("invoices/", views.invoices_index, name="invoices"),
    path("invoices/upcoming/", views.invoice_upcoming, name="invoice_upcoming"),
    path("invoices/<int:pk>/", views.invoice_detail, name="invoice_detail"),
    path("invoices/<int:pk>/pdf/", views.invoice_pdf, name="invoice_pdf"),
    path("credits/", views.credits_index, name="credits"),
    path("api-keys/", views.api_keys_index, name="api_keys"),
    path("api-keys/new/", views.api_key_new, name="api_key_new"),
    path("api-keys/<int:pk>/revoke/", views.api_key_revoke_view, name="api_key_revoke"),
    path("alerts/", views.alerts_index, name="alerts"),
    path("alerts/new/", views.alert_rule_new, name="alert_rule_new"),
    path("alerts/<int:pk>/delete/", views.alert_rule_delete, name="alert_rule_delete"),
    path("alerts/<int:pk>/pause/", views.alert_rule_pause, name="alert_rule_pause"),
    path("alerts/fired/<int:pk>/acknowledge/", views.alert_acknowledge, name="alert_acknowledge"),
]
