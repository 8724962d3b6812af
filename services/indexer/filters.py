"""Attribute filters: validated conditions compiled to a boolean mask over slots.

The mask becomes a FAISS ``IDSelectorBitmap`` passed in the search parameters, so FAISS itself
skips non-matching vectors and returns k matches whenever k exist (no over-fetch-and-drop).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from services.indexer.attributes import AttributeTable
from services.indexer.errors import InvalidArgument

STRING_FIELDS = ("id", "listing_id", "category", "location")
NUMERIC_FIELDS = ("price",)
FIELDS = STRING_FIELDS + NUMERIC_FIELDS
STRING_OPS = ("equals", "any_of", "none_of")
NUMERIC_OPS = ("range",)


@dataclass(frozen=True)
class Condition:
    """One condition: ``field`` ``op`` ``values`` (string ops) or ``gte``/``lte`` (range).

    String comparisons are exact (case-sensitive). A range with a bound unset is open on that
    side; items without a price never match a range.
    """

    field: str
    op: str
    values: tuple[str, ...] = ()
    gte: float | None = None
    lte: float | None = None

    def __post_init__(self) -> None:
        if self.field not in FIELDS:
            raise InvalidArgument(f"unknown filter field {self.field!r}; known fields: {', '.join(FIELDS)}")
        allowed = STRING_OPS if self.field in STRING_FIELDS else NUMERIC_OPS
        if self.op not in allowed:
            raise InvalidArgument(
                f"filter on {self.field!r} cannot use {self.op or 'no operator'!r}; "
                f"use one of {', '.join(allowed)}"
            )
        if self.op == "equals" and len(self.values) != 1:
            raise InvalidArgument(f"filter {self.field} equals needs exactly one value")
        if self.op == "range":
            for bound in (self.gte, self.lte):
                if bound is not None and np.isnan(bound):
                    raise InvalidArgument(f"filter {self.field} range has a NaN bound")

    @classmethod
    def equals(cls, field: str, value: str) -> "Condition":
        return cls(field, "equals", (value,))

    @classmethod
    def any_of(cls, field: str, values: Sequence[str]) -> "Condition":
        return cls(field, "any_of", tuple(values))

    @classmethod
    def none_of(cls, field: str, values: Sequence[str]) -> "Condition":
        return cls(field, "none_of", tuple(values))

    @classmethod
    def range(cls, field: str, gte: float | None = None, lte: float | None = None) -> "Condition":
        return cls(field, "range", (), gte, lte)


def compile_mask(table: AttributeTable, conditions: Sequence[Condition]) -> np.ndarray:
    """Boolean mask over ``table``'s slots: live and matching every condition."""
    mask = table.alive.copy()
    for condition in conditions:
        mask &= _condition_mask(table, condition)
    return mask


def _condition_mask(table: AttributeTable, condition: Condition) -> np.ndarray:
    if condition.op == "range":
        prices = table.price
        mask = ~np.isnan(prices)
        if condition.gte is not None:
            mask &= prices >= condition.gte
        if condition.lte is not None:
            mask &= prices <= condition.lte
        return mask
    if condition.field == "id":
        hits = np.zeros(table.size, dtype=bool)
        slots = [table.slot_of[v] for v in condition.values if v in table.slot_of]
        hits[np.asarray(slots, dtype=np.int64)] = True
    else:
        vocab = table.vocabs[condition.field]
        codes = np.asarray([vocab.lookup(v) for v in condition.values], dtype=np.int32)
        column = table.codes(condition.field)
        hits = column == codes[0] if len(codes) == 1 else np.isin(column, codes)
    return ~hits if condition.op == "none_of" else hits
