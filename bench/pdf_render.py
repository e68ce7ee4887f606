"""Warm render time of a one-page invoice PDF (WeasyPrint), in one process, without a database.

    .venv/bin/python bench/pdf_render.py            # 1 warm-up render, then the median of 20
    .venv/bin/python bench/pdf_render.py --runs 50

It builds an unsaved six-line USD invoice (base fee, graduated, discounted, committed, late
adjustment, credit; breakdowns from the real pricing engine), renders it once to warm up (fonts,
CSS parsing caches), then times `invoice_render_pdf` end to end (context, template, WeasyPrint)
`--runs` times and prints the machine, the median, the spread, and the time of the HTML step
alone. It checks the PDF has exactly one page when pypdf is installed.
"""

from __future__ import annotations

import argparse
import ctypes.util
import io
import logging
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timedelta
from decimal import Decimal
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "billing_site.settings")

import django  # noqa: E402

django.setup()
# WeasyPrint logs seven INFO "Step n" lines per render; the figure is for a quiet logger.
logging.getLogger("weasyprint.progress").setLevel(logging.WARNING)

from accounts.models import Organisation  # noqa: E402
from core.money import to_minor_units  # noqa: E402
from invoices.documents import invoice_render_html, invoice_render_pdf  # noqa: E402
from invoices.models import Invoice, InvoiceLine  # noqa: E402
from plans.pricing import quote_document  # noqa: E402

TIERS = {
    "model": "graduated",
    "tiers": [
        {"up_to": "1000000", "unit_price": "0"},
        {"up_to": "5000000", "unit_price": "0.00002"},
        {"up_to": None, "unit_price": "0.00001", "flat_fee": "10"},
    ],
}


def _usage(position: int, description: str, spec: dict[str, Any], quantity: str, unit: str):
    quote = quote_document(spec, Decimal(quantity))
    return InvoiceLine(
        position=position,
        kind=InvoiceLine.Kind.USAGE,
        description=description,
        quantity=Decimal(quantity),
        unit=unit,
        amount_exact=quote.amount,
        amount_minor=to_minor_units(quote.amount, "USD"),
        breakdown=quote.to_json(),
    )


def sample_invoice() -> SimpleNamespace:
    zone = ZoneInfo("Europe/Berlin")
    start, end = datetime(2026, 10, 1, tzinfo=zone), datetime(2026, 11, 1, tzinfo=zone)
    late = quote_document(TIERS, Decimal(5_100_000))
    lines = [
        InvoiceLine(
            position=1,
            kind=InvoiceLine.Kind.BASE_FEE,
            description="Growth plan, monthly fee",
            quantity=Decimal(1),
            amount_exact=Decimal(49),
            amount_minor=4900,
        ),
        _usage(2, "API requests", TIERS, "6250000", "requests"),
        _usage(
            3,
            "Object storage",
            {"model": "standard", "unit_price": "0.023", "discount_percent": "10"},
            "1234.5678",
            "GB-months",
        ),
        _usage(
            4,
            "AI tokens",
            {"model": "standard", "unit_price": "0.00002", "minimum_amount": "50"},
            "1000000",
            "tokens",
        ),
        InvoiceLine(
            position=5,
            kind=InvoiceLine.Kind.ADJUSTMENT,
            description="API requests, late usage for September",
            usage_start=datetime(2026, 9, 1, tzinfo=zone),
            usage_end=start,
            quantity=Decimal(100_000),
            unit="requests",
            amount_exact=Decimal(11),
            amount_minor=1100,
            breakdown={"rerated": late.to_json(), "billed": "80"},
        ),
        InvoiceLine(
            position=6,
            kind=InvoiceLine.Kind.CREDIT,
            description="Promotional credit",
            amount_exact=Decimal(-20),
            amount_minor=-2000,
        ),
    ]
    subtotal = sum(line.amount_minor for line in lines if line.kind != InvoiceLine.Kind.CREDIT)
    return SimpleNamespace(
        organisation=Organisation(
            name="Acme Rockets GmbH",
            timezone="Europe/Berlin",
            currency="USD",
            billing_email="accounts@acme.test",
        ),
        number="INV-2026-000001",
        status=Invoice.Status.FINALIZED,
        period_start=start,
        period_end=end,
        currency="USD",
        issued_at=end + timedelta(hours=2),
        due_at=end + timedelta(days=14, hours=2),
        subtotal_minor=subtotal,
        credits_minor=2000,
        total_minor=subtotal - 2000,
        lines=lines,
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _pages(pdf: bytes) -> int | None:
    try:
        from pypdf import PdfReader
    except ImportError:
        return None
    return len(PdfReader(io.BytesIO(pdf)).pages)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="timed renders (default 20)")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 1000))

    from weasyprint.text.ffi import pango

    print("machine")
    print(f"  cpu       {_cpu_model()}, {os.cpu_count()} logical cores")
    print(f"  load avg  {os.getloadavg()[0]:.2f} (1 min)")
    print(f"  os        {platform.system()} {platform.release()}")
    print(f"  python    {platform.python_version()}")
    packages = f"weasyprint {_package('weasyprint')}, pydyf {_package('pydyf')}"
    print(f"  packages  {packages}, pango {pango.pango_version()}")
    subsetter = ctypes.util.find_library("harfbuzz-subset") or "MISSING (expect ~5x slower)"
    print(f"  harfbuzz-subset {subsetter}")

    invoice = sample_invoice()
    warm = invoice_render_pdf(invoice)  # warm-up: font discovery, CSS caches
    pages = _pages(warm)
    if pages is not None and pages != 1:
        print(f"expected a one-page invoice, got {pages} pages", file=sys.stderr)
        return 1

    pdf_ms: list[float] = []
    for _ in range(runs):
        began = time.perf_counter()
        pdf = invoice_render_pdf(invoice)
        pdf_ms.append((time.perf_counter() - began) * 1000)
    html_ms: list[float] = []
    for _ in range(runs):
        began = time.perf_counter()
        invoice_render_html(invoice)
        html_ms.append((time.perf_counter() - began) * 1000)

    print(f"one-page invoice PDF ({len(pdf):,} bytes, {pages or '?'} page), {runs} warm runs")
    print(
        f"  pdf   median {statistics.median(pdf_ms):.1f} ms"
        f"  (min {min(pdf_ms):.1f}, max {max(pdf_ms):.1f})"
    )
    print(f"  html  median {statistics.median(html_ms):.2f} ms  (context + template only)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
