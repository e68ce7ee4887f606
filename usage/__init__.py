"""Meters and usage events. `usage.record(...)` records one event in-process."""

from typing import Any


def record(*args: Any, **kwargs: Any) -> Any:
    """Record one usage event in-process; see usage.instrumentation.record."""
    # Imported on call: this package is imported before Django's app registry is ready.
    from usage.instrumentation import record as _record

    return _record(*args, **kwargs)
