"""The one price parser: raw marketplace price text to a number and a currency, and its flag.

Used by data preparation (raw ``Products.csv`` prices), the gateway's catalogue loader and the
indexer's attribute loader (the prepared ``price`` column, or a hand-written attributes CSV).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DEFAULT_CURRENCY = "GBP"  # Gumtree UK: a bare number is pounds
CURRENCY_SYMBOLS = {"£": "GBP", "$": "USD", "€": "EUR"}
_PRICE_RE = re.compile(
    r"""^(?P<neg>-)?\s*
        (?P<pre>[£$€]|GBP|USD|EUR)?\s*
        (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*
        (?P<post>GBP|USD|EUR)?$""",
    re.VERBOSE | re.IGNORECASE,
)


@dataclass(frozen=True)
class ParsedPrice:
    """A raw price string turned into a number and an ISO currency code."""

    value: float | None  # None when unparseable
    currency: str  # "" when unparseable
    had_symbol: bool


def parse_price(raw: str | None, *, default_currency: str = DEFAULT_CURRENCY) -> ParsedPrice:
    """Parse "£1,900.00" -> 1900.0 GBP.  Text without digits, stray characters or a
    misplaced comma gives ``value=None`` (reported by the caller, never zeroed)."""
    text = (raw or "").strip().replace("\u00a0", " ")
    match = _PRICE_RE.match(text)
    if not match:
        return ParsedPrice(None, "", False)
    marker = match["pre"] or match["post"]
    currency = CURRENCY_SYMBOLS.get(marker, marker.upper()) if marker else default_currency
    value = float(match["num"].replace(",", ""))
    if match["neg"]:
        value = -value
    return ParsedPrice(value, currency, bool(marker))


def price_value(raw: str | float | None) -> float | None:
    """The number in a price cell, or None: "£1,250.00" -> 1250.0, "12" -> 12.0, "" / "free" -> None.

    Also takes what pandas writes for a float column ("1900.0", "1e+16"); never a NaN or infinity.
    """
    if raw is None:
        return None
    if isinstance(raw, float):
        return raw if math.isfinite(raw) else None
    parsed = parse_price(str(raw)).value
    if parsed is None:
        try:
            parsed = float(str(raw).strip())
        except ValueError:
            return None
    return parsed if math.isfinite(parsed) else None


def price_flag(value: float | None, *, absurd_price: float) -> str:
    """ "" for an ordinary price, else "unparseable", "zero" or "absurd" (negative or huge)."""
    if value is None or math.isnan(value):
        return "unparseable"
    if value == 0:
        return "zero"
    if value < 0 or value > absurd_price:
        return "absurd"
    return ""
