"""The HTTP API root: `/api/v1/`, its authentication, error envelope and OpenAPI document."""

from __future__ import annotations

from django.http import Http404, HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, ValidationError

from accounts.authentication import ApiKeyAuth
from core.errors import ApiError
from plans.api import router as plans_router
from usage.api import router as usage_router

api = NinjaAPI(
    title="Meterline API",
    version="1",
    description=(
        "Usage events in, usage out. Authenticate with `Authorization: Bearer <API key>`; a key "
        'acts only for its organisation. Errors are `{"error": {"code", "message"}}`.'
    ),
    auth=ApiKeyAuth(),
    urls_namespace="api",
)
api.add_router("/", usage_router)
api.add_router("/", plans_router)


def _error(
    request: HttpRequest, status: int, code: str, message: str, **extra: object
) -> HttpResponse:
    body: dict[str, object] = {"code": code, "message": message, **extra}
    return api.create_response(request, {"error": body}, status=status)


@api.exception_handler(ApiError)
def api_error(request: HttpRequest, exc: ApiError) -> HttpResponse:
    return _error(request, exc.status, exc.code, exc.message)


@api.exception_handler(AuthenticationError)
def unauthenticated(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    response = _error(
        request,
        401,
        "unauthenticated",
        "Send a valid, unrevoked API key as `Authorization: Bearer <key>`.",
    )
    response["WWW-Authenticate"] = "Bearer"
    return response


@api.exception_handler(ValidationError)
def invalid_request(request: HttpRequest, exc: ValidationError) -> HttpResponse:
    return _error(
        request, 422, "invalid_request", "The request's parameters are invalid.", details=exc.errors
    )


@api.exception_handler(Http404)
def not_found(request: HttpRequest, exc: Http404) -> HttpResponse:
    return _error(request, 404, "not_found", "Not found.")
