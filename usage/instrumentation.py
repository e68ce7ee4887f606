"""Metering from inside the product: `record()`, the `@metered` decorator and a middleware.

For when the billing app runs in the same Django project as the product. All three go through
`usage.services.events_ingest`, so they validate and deduplicate exactly as the HTTP API does.
"""

from __future__ import annotations

import functools
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any, ParamSpec, TypeVar

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.utils.module_loading import import_string

from accounts.models import Organisation
from usage.models import UsageEvent
from usage.services import EventRejected, EventResult, event_record

logger = logging.getLogger("meterline.usage")

P = ParamSpec("P")
R = TypeVar("R")
OrganisationRef = Organisation | str


def _organisation(ref: OrganisationRef) -> Organisation:
    return ref if isinstance(ref, Organisation) else Organisation.objects.get(slug=ref)


def record(
    organisation: OrganisationRef,
    event_name: str,
    *,
    idempotency_key: str,
    quantity: Decimal | int | str | None = None,
    properties: Mapping[str, Any] | None = None,
    timestamp: datetime | None = None,
) -> EventResult:
    """Record one usage event for `organisation` (an Organisation or its slug).

    Returns the result (`accepted` or `duplicate`); raises EventRejected with the API's code.
    """
    return event_record(
        organisation=_organisation(organisation),
        event_name=event_name,
        idempotency_key=idempotency_key,
        quantity=quantity,
        properties=properties,
        timestamp=timestamp,
    )


def metered(
    event_name: str,
    *,
    organisation: Callable[..., OrganisationRef],
    quantity: Callable[[Any], Decimal | int | str] | None = None,
    properties: Callable[[Any], Mapping[str, Any]] | None = None,
    idempotency_key: Callable[..., str] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Meter each successful call of the decorated function as one event.

    `organisation` and `idempotency_key` receive the call's arguments; `quantity` and
    `properties` receive its result (e.g. the tokens of an AI call). A call that raises records
    nothing. A rejected event is logged, never raised: the caller's result is already made.

        @metered("ai_tokens", organisation=lambda org, prompt: org,
                 quantity=lambda reply: reply.usage.total_tokens)
        def complete(org, prompt): ...
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            result = function(*args, **kwargs)
            key = idempotency_key(*args, **kwargs) if idempotency_key else uuid.uuid4().hex
            try:
                event_record(
                    organisation=_organisation(organisation(*args, **kwargs)),
                    event_name=event_name,
                    idempotency_key=key,
                    quantity=quantity(result) if quantity else None,
                    properties=properties(result) if properties else None,
                )
            except EventRejected as rejection:
                logger.error("Metering %s failed: %s", function.__qualname__, rejection)
            return result

        return wrapper

    return decorate


@functools.cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


class UsageMeteringMiddleware:
    """Record one event per request to a metered route.

    settings.METERLINE_METERED_ROUTES lists routes:
    `{"path": r"^/api/", "event_name": "api_calls", "methods": ["GET", "POST"]}` (methods
    optional). The organisation comes from `request.organisation`, or from the callable named by
    METERLINE_ORGANISATION_RESOLVER (request -> Organisation, slug or None). The idempotency key
    is the request id header (METERLINE_REQUEST_ID_HEADER), so a retried request with the same id
    is counted once; without the header, every request is its own event. Responses of 500 and
    above are not metered: the customer got nothing.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        route = self._route(request)
        if route is not None and response.status_code < 500:
            self._record(request, response, route)
        return response

    def _route(self, request: HttpRequest) -> Mapping[str, Any] | None:
        routes: list[dict[str, Any]] = settings.METERLINE_METERED_ROUTES
        for route in routes:
            methods = route.get("methods") or ()
            if methods and request.method not in methods:
                continue
            if _compiled(str(route["path"])).search(request.path):
                return route
        return None

    def _record(
        self, request: HttpRequest, response: HttpResponse, route: Mapping[str, Any]
    ) -> None:
        organisation = self._organisation(request)
        if organisation is None:
            return
        request_id = request.headers.get(settings.METERLINE_REQUEST_ID_HEADER)
        key = f"request:{request_id}" if request_id else f"request:{uuid.uuid4().hex}"
        try:
            event_record(
                organisation=organisation,
                event_name=str(route["event_name"]),
                idempotency_key=key[:255],
                properties={
                    "method": request.method,
                    "path": request.path[:200],
                    "status": response.status_code,
                },
                source=UsageEvent.Source.RECORD,
            )
        except EventRejected as rejection:
            logger.error("Metering %s %s failed: %s", request.method, request.path, rejection)

    def _organisation(self, request: HttpRequest) -> Organisation | None:
        resolver_path = settings.METERLINE_ORGANISATION_RESOLVER
        if resolver_path:
            ref = import_string(resolver_path)(request)
        else:
            ref = getattr(request, "organisation", None)
        if ref is None:
            return None
        return _organisation(ref)
