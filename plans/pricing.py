"""The rating engine: a price spec and a quantity in, an exact amount and its breakdown out.

Pure functions over Decimal; no ORM, no settings, no rounding (an invoice line is rounded once,
later, to its currency's minor unit). The breakdown is what invoices and the portal show as "how
this was computed": every tier slice, the free units used, the discount and the commitment.

Every price is one JSON document; money and quantities are decimal strings:

    {"model": "standard", "unit_price": "0.002"}
    {"model": "package", "package_size": "100", "package_price": "5", "free_units": "100",
     "rounding": "up"}
    {"model": "graduated", "tiers": [{"up_to": "10000", "unit_price": "0", "flat_fee": "0"},
                                     {"up_to": null, "unit_price": "0.0005"}]}
    {"model": "volume", "tiers": [...]}
    {"model": "percentage", "rate_percent": "2.9", "fixed_fee_per_event": "0.30",
     "free_events": 0, "free_amount": "0", "min_per_event": null, "max_per_event": null}
    {"model": "graduated_percentage", "tiers": [{"up_to": "1000", "rate_percent": "1",
                                                 "flat_fee": "200"}, ...]}

Any model may add "discount_percent" (taken off the usage amount), "minimum_amount" (a
commitment: a separate true-up raises the charge to it) and "maximum_amount" (a cap).

Tiers: tier i covers quantities in (up_to[i-1], up_to[i]]; the first starts at 0 and contains 0;
only the last has "up_to": null; bounds strictly increase. The first tier's flat fee is charged
even at zero usage (as Stripe, Lago and OpenMeter do); a later tier's when usage enters it.
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

# Enough digits that no product or sum of our quantities (up to 10^15, 6 places) and unit prices
# (12 places) is ever rounded inside the engine.
_CONTEXT = decimal.Context(prec=80, rounding=decimal.ROUND_HALF_EVEN, traps=[InvalidOperation])
PRICE_PLACES = 12
QUANTITY_PLACES = 6
HUNDRED = Decimal(100)
ZERO = Decimal(0)


class PricingModel(StrEnum):
    STANDARD = "standard"
    PACKAGE = "package"
    GRADUATED = "graduated"
    VOLUME = "volume"
    PERCENTAGE = "percentage"
    GRADUATED_PERCENTAGE = "graduated_percentage"


# Models whose amount depends on each event's value, not only on the period's total.
EVENT_MODELS = frozenset({PricingModel.PERCENTAGE})


class PriceSpecError(ValueError):
    """A price spec that breaks a rule; `field` names the offending field ("tiers[1].up_to")."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class QuoteError(ValueError):
    """A quantity or event values the engine cannot price."""


# --- The spec ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tier:
    up_to: Decimal | None
    unit_price: Decimal = ZERO  # per unit, or for graduated_percentage the rate as a fraction
    flat_fee: Decimal = ZERO


@dataclass(frozen=True, slots=True)
class PriceSpec:
    """A parsed, valid price. Build it with `parse_price_spec`; `document` is the original."""

    model: PricingModel
    document: Mapping[str, Any]
    unit_price: Decimal = ZERO
    package_size: Decimal = Decimal(1)
    package_price: Decimal = ZERO
    free_units: Decimal = ZERO
    round_up: bool = True
    tiers: tuple[Tier, ...] = ()
    rate: Decimal = ZERO  # percentage models: rate_percent / 100
    fixed_fee_per_event: Decimal = ZERO
    free_events: int = 0
    free_amount: Decimal = ZERO
    min_per_event: Decimal | None = None
    max_per_event: Decimal | None = None
    discount: Decimal = ZERO  # a fraction: discount_percent / 100
    minimum_amount: Decimal | None = None
    maximum_amount: Decimal | None = None

    @property
    def needs_events(self) -> bool:
        return self.model in EVENT_MODELS


_COMMON_KEYS = {"model", "discount_percent", "minimum_amount", "maximum_amount"}
_MODEL_KEYS: dict[PricingModel, set[str]] = {
    PricingModel.STANDARD: {"unit_price"},
    PricingModel.PACKAGE: {"package_size", "package_price", "free_units", "rounding"},
    PricingModel.GRADUATED: {"tiers"},
    PricingModel.VOLUME: {"tiers"},
    PricingModel.PERCENTAGE: {
        "rate_percent",
        "fixed_fee_per_event",
        "free_events",
        "free_amount",
        "min_per_event",
        "max_per_event",
    },
    PricingModel.GRADUATED_PERCENTAGE: {"tiers"},
}


def _decimal(
    value: object,
    name: str,
    *,
    places: int = PRICE_PLACES,
    positive: bool = False,
) -> Decimal:
    """Read a non-negative decimal from a string or an integer (floats are not exact: refused)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise PriceSpecError(name, 'must be a decimal string such as "0.002".')
    try:
        number = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise PriceSpecError(name, f"{value!r} is not a decimal number.") from None
    if not number.is_finite():
        raise PriceSpecError(name, "must be finite.")
    if number < 0:
        raise PriceSpecError(name, "must not be negative.")
    if positive and number == 0:
        raise PriceSpecError(name, "must be greater than zero.")
    if number >= Decimal(10) ** 15:
        raise PriceSpecError(name, "is absurdly large.")
    if number != number.quantize(Decimal(1).scaleb(-places), context=_CONTEXT):
        raise PriceSpecError(name, f"has more than {places} decimal places.")
    return number


def _or_zero(value: object) -> object:
    """Read an absent (null) amount as zero; anything else is validated as given."""
    return "0" if value is None else value


def _optional_decimal(document: Mapping[str, Any], key: str, **kwargs: Any) -> Decimal | None:
    value = document.get(key)
    return None if value is None else _decimal(value, key, **kwargs)


def _tiers(document: Mapping[str, Any], *, percentage: bool) -> tuple[Tier, ...]:
    raw = document.get("tiers")
    if not isinstance(raw, list) or not raw:
        raise PriceSpecError("tiers", "must be a non-empty list of tiers.")
    price_key = "rate_percent" if percentage else "unit_price"
    tiers: list[Tier] = []
    previous: Decimal = ZERO
    for index, tier in enumerate(raw):
        where = f"tiers[{index}]"
        if not isinstance(tier, Mapping):
            raise PriceSpecError(where, "must be an object.")
        unknown = set(tier) - {"up_to", price_key, "flat_fee"}
        if unknown:
            raise PriceSpecError(
                f"{where}.{sorted(unknown)[0]}",
                f"unknown key; a tier has up_to, {price_key} and flat_fee.",
            )
        last = index == len(raw) - 1
        up_to: Decimal | None
        if tier.get("up_to") is None:
            if not last:
                raise PriceSpecError(
                    f"{where}.up_to", "only the last tier may be unbounded (null)."
                )
            up_to = None
        else:
            if last:
                raise PriceSpecError(f"{where}.up_to", "the last tier must be unbounded (null).")
            up_to = _decimal(tier["up_to"], f"{where}.up_to", places=QUANTITY_PLACES)
            if up_to <= previous:
                raise PriceSpecError(
                    f"{where}.up_to",
                    "bounds must strictly increase, from above 0"
                    + (f" (the previous tier ends at {previous})." if index else "."),
                )
            previous = up_to
        if price_key not in tier:
            raise PriceSpecError(f"{where}.{price_key}", "is required.")
        price = _decimal(tier[price_key], f"{where}.{price_key}")
        if percentage:
            if price > HUNDRED:
                raise PriceSpecError(f"{where}.{price_key}", "must be at most 100.")
            price = price / HUNDRED
        flat_fee = _decimal(_or_zero(tier.get("flat_fee")), f"{where}.flat_fee")
        tiers.append(Tier(up_to=up_to, unit_price=price, flat_fee=flat_fee))
    return tuple(tiers)


def parse_price_spec(document: object) -> PriceSpec:
    """Validate a price document; raise PriceSpecError naming the field that is wrong."""
    if not isinstance(document, Mapping):
        raise PriceSpecError("price", "must be a JSON object.")
    try:
        model = PricingModel(str(document.get("model")))
    except ValueError:
        choices = ", ".join(m.value for m in PricingModel)
        raise PriceSpecError("model", f"must be one of: {choices}.") from None
    unknown = set(document) - _COMMON_KEYS - _MODEL_KEYS[model]
    if unknown:
        raise PriceSpecError(sorted(unknown)[0], f"is not a field of a {model} price.")

    common: dict[str, Any] = {}
    discount = _optional_decimal(document, "discount_percent")
    if discount is not None:
        if discount > HUNDRED:
            raise PriceSpecError("discount_percent", "must be at most 100.")
        common["discount"] = discount / HUNDRED
    common["minimum_amount"] = _optional_decimal(document, "minimum_amount")
    common["maximum_amount"] = _optional_decimal(document, "maximum_amount")
    if (
        common["minimum_amount"] is not None
        and common["maximum_amount"] is not None
        and common["minimum_amount"] > common["maximum_amount"]
    ):
        raise PriceSpecError("maximum_amount", "must not be below minimum_amount.")

    match model:
        case PricingModel.STANDARD:
            if "unit_price" not in document:
                raise PriceSpecError("unit_price", "is required.")
            return PriceSpec(
                model, document, unit_price=_decimal(document["unit_price"], "unit_price"), **common
            )
        case PricingModel.PACKAGE:
            for key in ("package_size", "package_price"):
                if key not in document:
                    raise PriceSpecError(key, "is required.")
            rounding = document.get("rounding", "up")
            if rounding not in ("up", "down"):
                raise PriceSpecError("rounding", 'must be "up" or "down".')
            return PriceSpec(
                model,
                document,
                package_size=_decimal(
                    document["package_size"], "package_size", places=QUANTITY_PLACES, positive=True
                ),
                package_price=_decimal(document["package_price"], "package_price"),
                free_units=_decimal(
                    document.get("free_units", "0"), "free_units", places=QUANTITY_PLACES
                ),
                round_up=rounding == "up",
                **common,
            )
        case PricingModel.GRADUATED | PricingModel.VOLUME:
            return PriceSpec(model, document, tiers=_tiers(document, percentage=False), **common)
        case PricingModel.GRADUATED_PERCENTAGE:
            return PriceSpec(model, document, tiers=_tiers(document, percentage=True), **common)
        case PricingModel.PERCENTAGE:
            if "rate_percent" not in document:
                raise PriceSpecError("rate_percent", "is required.")
            rate_percent = _decimal(document["rate_percent"], "rate_percent")
            if rate_percent > HUNDRED:
                raise PriceSpecError("rate_percent", "must be at most 100.")
            free_events = document.get("free_events")
            free_events = 0 if free_events is None else free_events
            if isinstance(free_events, bool) or not isinstance(free_events, int) or free_events < 0:
                raise PriceSpecError("free_events", "must be a whole number, 0 or more.")
            minimum = _optional_decimal(document, "min_per_event")
            maximum = _optional_decimal(document, "max_per_event")
            if minimum is not None and maximum is not None and minimum > maximum:
                raise PriceSpecError("max_per_event", "must not be below min_per_event.")
            return PriceSpec(
                model,
                document,
                rate=rate_percent / HUNDRED,
                fixed_fee_per_event=_decimal(
                    _or_zero(document.get("fixed_fee_per_event")), "fixed_fee_per_event"
                ),
                free_events=free_events,
                free_amount=_decimal(_or_zero(document.get("free_amount")), "free_amount"),
                min_per_event=minimum,
                max_per_event=maximum,
                **common,
            )
    raise AssertionError(model)  # pragma: no cover


# --- The result ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Slice:
    """One line of "how this was computed": a tier slice, packages, or a group of events."""

    description: str
    units: Decimal
    unit_price: Decimal
    flat_fee: Decimal
    amount: Decimal
    tier: int | None = None  # 1-based tier number, when the slice is a tier

    def to_json(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "tier": self.tier,
            "units": _text(self.units),
            "unit_price": _text(self.unit_price),
            "flat_fee": _text(self.flat_fee),
            "amount": _text(self.amount),
        }


@dataclass(frozen=True, slots=True)
class Quote:
    """The exact charge for one price over one period, and how it was reached.

    amount = usage_amount - discount + true_up - cap; usage_amount = sum of the slices.
    """

    model: PricingModel
    quantity: Decimal
    slices: tuple[Slice, ...]
    usage_amount: Decimal
    free_units: Decimal = ZERO
    free_events: int = 0
    discount: Decimal = ZERO
    true_up: Decimal = ZERO  # raised to minimum_amount
    cap: Decimal = ZERO  # taken off to stay within maximum_amount
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def amount(self) -> Decimal:
        # In the engine's wide context: the caller's default 28 digits would round it.
        with decimal.localcontext(_CONTEXT):
            return self.usage_amount - self.discount + self.true_up - self.cap

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model.value,
            "quantity": _text(self.quantity),
            "amount": _text(self.amount),
            "usage_amount": _text(self.usage_amount),
            "free_units": _text(self.free_units),
            "free_events": self.free_events,
            "discount": _text(self.discount),
            "minimum_true_up": _text(self.true_up),
            "maximum_cap": _text(self.cap),
            "slices": [s.to_json() for s in self.slices],
            "notes": list(self.notes),
        }

    def explain(self) -> list[str]:
        """Return the breakdown as lines of text, for the CLI and plain-text emails."""
        lines = [f"{self.model.value} price, quantity {_text(self.quantity)}"]
        if self.free_units:
            lines.append(f"  free units used: {_text(self.free_units)}")
        if self.free_events:
            lines.append(f"  free events: {self.free_events}")
        for s in self.slices:
            fee = f" + flat fee {_text(s.flat_fee)}" if s.flat_fee else ""
            lines.append(
                f"  {s.description}: {_text(s.units)} x {_text(s.unit_price)}{fee}"
                f" = {_text(s.amount)}"
            )
        lines.append(f"  usage amount: {_text(self.usage_amount)}")
        if self.discount:
            lines.append(f"  discount: -{_text(self.discount)}")
        if self.true_up:
            lines.append(f"  minimum commitment true-up: +{_text(self.true_up)}")
        if self.cap:
            lines.append(f"  maximum cap: -{_text(self.cap)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        lines.append(f"  amount: {_text(self.amount)}")
        return lines


def _text(value: Decimal) -> str:
    """Plain decimal text: no exponent, no trailing zeros ("0.0005", "1200")."""
    return format(value.normalize(_CONTEXT), "f") if value else "0"


# --- Rating --------------------------------------------------------------------------------------


def quote(spec: PriceSpec, quantity: Decimal, events: Sequence[Decimal] | None = None) -> Quote:
    """Price `quantity` (and, for percentage prices, each event's value, in time order)."""
    with decimal.localcontext(_CONTEXT):
        if not quantity.is_finite() or quantity < 0:
            raise QuoteError("quantity must be a finite number, not negative.")
        match spec.model:
            case PricingModel.STANDARD:
                amount = quantity * spec.unit_price
                base = Quote(
                    spec.model,
                    quantity,
                    (Slice("units", quantity, spec.unit_price, ZERO, amount),),
                    amount,
                )
            case PricingModel.PACKAGE:
                base = _package(spec, quantity)
            case PricingModel.GRADUATED | PricingModel.GRADUATED_PERCENTAGE:
                base = _graduated(spec, quantity)
            case PricingModel.VOLUME:
                base = _volume(spec, quantity)
            case PricingModel.PERCENTAGE:
                if events is None:
                    raise QuoteError("a percentage price needs the value of each event.")
                base = _percentage(spec, list(events))
        return _adjust(spec, base)


def _package(spec: PriceSpec, quantity: Decimal) -> Quote:
    free = min(quantity, spec.free_units)
    billable = quantity - free
    ratio = billable / spec.package_size
    packages = ratio.to_integral_value(
        rounding=decimal.ROUND_CEILING if spec.round_up else decimal.ROUND_FLOOR
    )
    amount = packages * spec.package_price
    slices = (
        Slice(
            f"{_text(packages)} package(s) of {_text(spec.package_size)}",
            packages,
            spec.package_price,
            ZERO,
            amount,
        ),
    )
    return Quote(spec.model, quantity, slices, amount, free_units=free)


def _graduated(spec: PriceSpec, quantity: Decimal) -> Quote:
    slices: list[Slice] = []
    lower = ZERO
    for number, tier in enumerate(spec.tiers, start=1):
        # The first tier is always reached (its flat fee is due at zero usage); a later tier
        # once usage passes its lower bound.
        if number > 1 and quantity <= lower:
            break
        upper = quantity if tier.up_to is None else min(quantity, tier.up_to)
        units = max(upper - lower, ZERO)
        slices.append(
            Slice(
                _tier_label(number, lower, tier.up_to),
                units,
                tier.unit_price,
                tier.flat_fee,
                units * tier.unit_price + tier.flat_fee,
                tier=number,
            )
        )
        if tier.up_to is None:
            break
        lower = tier.up_to
    return Quote(spec.model, quantity, tuple(slices), sum((s.amount for s in slices), ZERO))


def _volume(spec: PriceSpec, quantity: Decimal) -> Quote:
    lower = ZERO
    for number, tier in enumerate(spec.tiers, start=1):
        if tier.up_to is None or quantity <= tier.up_to:
            amount = quantity * tier.unit_price + tier.flat_fee
            label = f"all units at {_tier_label(number, lower, tier.up_to)}"
            slices = (Slice(label, quantity, tier.unit_price, tier.flat_fee, amount, tier=number),)
            return Quote(spec.model, quantity, slices, amount)
        lower = tier.up_to
    raise AssertionError("the last tier is unbounded")  # pragma: no cover


def _tier_label(number: int, lower: Decimal, up_to: Decimal | None) -> str:
    if up_to is None:
        return f"tier {number} (above {_text(lower)})"
    if number == 1:
        return f"tier {number} (0 to {_text(up_to)})"
    return f"tier {number} ({_text(lower)} to {_text(up_to)})"


def _percentage(spec: PriceSpec, values: list[Decimal]) -> Quote:
    """Charge each event rate x value + fixed fee, after the free allowance, clamped.

    The free allowance is the first `free_events` events and the first `free_amount` of summed
    value, whichever runs out first (a limit of 0 is no limit of that kind; with neither, nothing
    is free). The event that crosses `free_amount` pays the fee and the rate on the part above.
    """
    if any(not v.is_finite() or v < 0 for v in values):
        raise QuoteError("event values must be finite numbers, not negative.")
    by_events, by_amount = spec.free_events > 0, spec.free_amount > 0
    free_active = by_events or by_amount
    wholly_free, free_sum = 0, ZERO
    paid_events, paid_value, paid_amount, clamped = 0, ZERO, ZERO, 0
    for value in values:
        if free_active and by_events and wholly_free >= spec.free_events:
            free_active = False
        chargeable = value
        if free_active:
            remaining = spec.free_amount - free_sum
            if not by_amount or value <= remaining:
                wholly_free += 1
                free_sum += value
                continue
            # This event crosses free_amount: it pays on the part above, and the allowance ends.
            free_sum = spec.free_amount
            free_active = False
            chargeable = value - remaining
        charge = chargeable * spec.rate + spec.fixed_fee_per_event
        bounded = _clamp(charge, spec.min_per_event, spec.max_per_event)
        clamped += bounded != charge
        paid_events += 1
        paid_value += chargeable
        paid_amount += bounded
    slices = (
        Slice(
            f"{paid_events} event(s): {_text(spec.rate * HUNDRED)}% of {_text(paid_value)}"
            f" + {_text(spec.fixed_fee_per_event)} per event",
            paid_value,
            spec.rate,
            spec.fixed_fee_per_event * paid_events,
            paid_amount,
        ),
    )
    notes = (f"{clamped} event charge(s) clamped to the per-event bounds",) if clamped else ()
    return Quote(
        spec.model,
        sum(values, ZERO),
        slices,
        paid_amount,
        free_units=free_sum,
        free_events=wholly_free,
        notes=notes,
    )


def _clamp(value: Decimal, low: Decimal | None, high: Decimal | None) -> Decimal:
    if low is not None and value < low:
        return low
    if high is not None and value > high:
        return high
    return value


def _adjust(spec: PriceSpec, base: Quote) -> Quote:
    """Apply the discount, then the minimum commitment (true-up) or the maximum (cap)."""
    discount = base.usage_amount * spec.discount
    net = base.usage_amount - discount
    true_up = ZERO
    cap = ZERO
    if spec.minimum_amount is not None and net < spec.minimum_amount:
        true_up = spec.minimum_amount - net
    if spec.maximum_amount is not None and net > spec.maximum_amount:
        cap = net - spec.maximum_amount
    return Quote(
        base.model,
        base.quantity,
        base.slices,
        base.usage_amount,
        free_units=base.free_units,
        free_events=base.free_events,
        discount=discount,
        true_up=true_up,
        cap=cap,
        notes=base.notes,
    )


def scale(spec: PriceSpec, base: Quote, factor: Decimal) -> Quote:
    """Project a quote by a run-rate `factor`: slices scaled, discount and commitments re-applied.

    For prices charged per event, where re-pricing a projected total is impossible.
    """
    with decimal.localcontext(_CONTEXT):
        slices = tuple(
            Slice(
                f"{s.description} (projected)",
                s.units * factor,
                s.unit_price,
                s.flat_fee,
                s.amount * factor,
                s.tier,
            )
            for s in base.slices
        )
        projected = Quote(
            base.model,
            base.quantity * factor,
            slices,
            base.usage_amount * factor,
            free_units=base.free_units,
            free_events=base.free_events,
            notes=base.notes,
        )
        return _adjust(spec, projected)


def exact_sum(amounts: Iterable[Decimal]) -> Decimal:
    """Add amounts without rounding (the default context keeps only 28 digits)."""
    with decimal.localcontext(_CONTEXT):
        return sum(amounts, ZERO)


def quote_document(
    document: object, quantity: Decimal, events: Iterable[Decimal] | None = None
) -> Quote:
    """Parse and price in one call (the CLI and the API)."""
    return quote(parse_price_spec(document), quantity, None if events is None else list(events))


def included_units(spec: PriceSpec) -> Decimal | None:
    """The units a price includes for free, if it has such an allowance: a package price's free
    units, or a graduated/volume first tier that costs nothing. For "x of y included" bars."""
    if spec.model == PricingModel.PACKAGE and spec.free_units:
        return spec.free_units
    if spec.model in (PricingModel.GRADUATED, PricingModel.VOLUME) and spec.tiers:
        first = spec.tiers[0]
        if first.up_to is not None and not first.unit_price and not first.flat_fee:
            return first.up_to
    return None
