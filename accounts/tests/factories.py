"""Test data for accounts: plain functions that go through the services."""

from __future__ import annotations

import itertools

from accounts.models import Organisation
from accounts.services import IssuedAPIKey, api_key_create, organisation_create

_sequence = itertools.count(1)


def make_organisation(**overrides: str) -> Organisation:
    n = next(_sequence)
    fields = {"name": f"Organisation {n}", "slug": f"org-{n}", **overrides}
    return organisation_create(**fields)


def make_api_key(organisation: Organisation | None = None, name: str = "test") -> IssuedAPIKey:
    return api_key_create(organisation=organisation or make_organisation(), name=name)
