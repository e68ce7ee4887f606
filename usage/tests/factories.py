"""Test data for usage: meters created through the service, events through ingestion."""

from __future__ import annotations

import itertools
from typing import Any

from usage.models import Meter
from usage.services import meter_create

_sequence = itertools.count(1)


def make_meter(aggregation: str = "count", code: str | None = None, **spec: Any) -> Meter:
    document: dict[str, Any] = {"aggregation": aggregation, **spec}
    return meter_create(code=code or f"meter_{next(_sequence)}", spec=document)
