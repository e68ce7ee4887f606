"""Argument types shared by the management commands (pure: argparse only)."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime


def iso_instant(text: str) -> datetime:
    """An `--as-of` value: ISO 8601 with a UTC offset ("2026-12-01T02:00:00Z"), as UTC."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 instant: {text!r}") from exc
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} needs a UTC offset, e.g. 2026-12-01T02:00:00Z")
    return value.astimezone(UTC)
