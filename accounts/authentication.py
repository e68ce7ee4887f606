"""Bearer API-key authentication for the HTTP API."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja.security import HttpBearer

from accounts.models import APIKey
from accounts.services import api_key_authenticate


class ApiKeyAuth(HttpBearer):
    """`Authorization: Bearer ml_…`; `request.auth` becomes the key, naming the organisation."""

    def authenticate(self, request: HttpRequest, token: str) -> APIKey | None:
        return api_key_authenticate(secret=token.strip())

    def __call__(self, request: HttpRequest) -> Any:
        # Ninja logs every malformed header in DEBUG; a wrong header is a 401, not a log line.
        header = request.headers.get(self.header, "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        return self.authenticate(request, token)
