"""Per-item metadata kept beside the FAISS index as numpy columns, one row per *slot*.

A slot is the int64 label the FAISS index returns for a vector. Slots are handed out in order and
never reused until the collection is compacted, so a stale label can never point at another item.
String attributes are dictionary-encoded (code 0 is the empty string), which keeps filters to a
few vectorised numpy comparisons over the whole catalogue.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_GROWTH = 1.5
_MIN_CAPACITY = 1024


@dataclass(frozen=True)
class Attributes:
    """Metadata of one stored item; ``price`` None means unknown."""

    listing_id: str = ""
    category: str = ""
    price: float | None = None
    location: str = ""

    def to_row(self) -> list:
        return [self.listing_id, self.category, self.price, self.location]

    @classmethod
    def from_row(cls, row: list) -> "Attributes":
        listing_id, category, price, location = row
        return cls(listing_id, category, None if price is None else float(price), location)


class Vocab:
    """String <-> dense int32 code; code 0 is always the empty string."""

    def __init__(self, values: list[str] | None = None) -> None:
        self.values: list[str] = list(values) if values else [""]
        if self.values[0] != "":
            raise ValueError("vocabulary must start with the empty string")
        self.codes: dict[str, int] = {v: i for i, v in enumerate(self.values)}

    def encode(self, value: str) -> int:
        """The code of ``value``, adding it if new."""
        code = self.codes.get(value)
        if code is None:
            code = len(self.values)
            self.values.append(value)
            self.codes[value] = code
        return code

    def lookup(self, value: str) -> int:
        """The code of ``value`` or -1 when it was never stored (matches nothing)."""
        return self.codes.get(value, -1)


class AttributeTable:
    """Ids and attribute columns indexed by slot, plus the id -> slot map."""

    STRING_COLUMNS = ("listing_id", "category", "location")

    def __init__(self) -> None:
        self.size = 0  # slots handed out so far (live and dead)
        self.ids: list[str | None] = []
        self.slot_of: dict[str, int] = {}
        self.vocabs = {name: Vocab() for name in self.STRING_COLUMNS}
        self._alive = np.zeros(0, dtype=bool)
        self._codes = {name: np.zeros(0, dtype=np.int32) for name in self.STRING_COLUMNS}
        self._price = np.zeros(0, dtype=np.float64)

    # -- reading -----------------------------------------------------------------------------
    @property
    def live_count(self) -> int:
        return len(self.slot_of)

    @property
    def dead_count(self) -> int:
        return self.size - len(self.slot_of)

    @property
    def alive(self) -> np.ndarray:
        """Boolean view over the slots handed out; do not modify."""
        return self._alive[: self.size]

    def codes(self, column: str) -> np.ndarray:
        return self._codes[column][: self.size]

    @property
    def price(self) -> np.ndarray:
        """Prices by slot; NaN where unknown (NaN compares false, so it never matches a range)."""
        return self._price[: self.size]

    def attributes(self, slot: int) -> Attributes:
        price = self._price[slot]
        return Attributes(
            listing_id=self.vocabs["listing_id"].values[self._codes["listing_id"][slot]],
            category=self.vocabs["category"].values[self._codes["category"][slot]],
            price=None if math.isnan(price) else float(price),
            location=self.vocabs["location"].values[self._codes["location"][slot]],
        )

    def live_slots(self) -> np.ndarray:
        return np.flatnonzero(self.alive).astype(np.int64)

    # -- writing -----------------------------------------------------------------------------
    def append(self, ids: list[str], attributes: list[Attributes]) -> np.ndarray:
        """Give each new item the next slot; the ids must not be live."""
        n = len(ids)
        self._reserve(self.size + n)
        slots = np.arange(self.size, self.size + n, dtype=np.int64)
        for slot, item_id, attrs in zip(slots.tolist(), ids, attributes):
            self.ids.append(item_id)
            self.slot_of[item_id] = slot
            self._codes["listing_id"][slot] = self.vocabs["listing_id"].encode(attrs.listing_id)
            self._codes["category"][slot] = self.vocabs["category"].encode(attrs.category)
            self._codes["location"][slot] = self.vocabs["location"].encode(attrs.location)
            self._price[slot] = np.nan if attrs.price is None else attrs.price
        self._alive[self.size : self.size + n] = True
        self.size += n
        return slots

    def kill(self, slots: np.ndarray) -> None:
        """Mark slots dead and forget their ids."""
        for slot in np.asarray(slots, dtype=np.int64).tolist():
            item_id = self.ids[slot]
            if item_id is not None:
                del self.slot_of[item_id]
                self.ids[slot] = None
        self._alive[np.asarray(slots, dtype=np.int64)] = False

    def _reserve(self, needed: int) -> None:
        capacity = len(self._alive)
        if needed <= capacity:
            return
        new_capacity = max(needed, int(capacity * _GROWTH), _MIN_CAPACITY)
        self._alive = _grown(self._alive, new_capacity, False)
        self._codes = {k: _grown(v, new_capacity, 0) for k, v in self._codes.items()}
        self._price = _grown(self._price, new_capacity, np.nan)

    def compacted(self) -> tuple["AttributeTable", np.ndarray]:
        """A copy holding only live rows, renumbered 0..n-1, and the old slots in new order."""
        old_slots = self.live_slots()
        table = AttributeTable()
        table.append(
            [self.ids[s] for s in old_slots.tolist()],  # type: ignore[misc]
            [self.attributes(s) for s in old_slots.tolist()],
        )
        return table, old_slots

    # -- persistence (JSON + npz, never pickle) ------------------------------------------------
    def save(self, ids_path: Path, columns_path: Path) -> None:
        meta = {"size": self.size, "ids": self.ids, "vocabs": {k: v.values for k, v in self.vocabs.items()}}
        ids_path.write_text(json.dumps(meta, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
        buffer = io.BytesIO()
        np.savez(
            buffer,
            alive=self.alive,
            price=self.price,
            **{f"code_{k}": self.codes(k) for k in self.STRING_COLUMNS},
        )
        columns_path.write_bytes(buffer.getvalue())

    @classmethod
    def load(cls, ids_path: Path, columns_path: Path) -> "AttributeTable":
        """Read a saved table; raises ValueError when the files disagree with each other."""
        meta = json.loads(ids_path.read_text(encoding="utf-8"))
        with np.load(columns_path, allow_pickle=False) as columns:
            arrays = {name: columns[name] for name in columns.files}
        table = cls()
        size = int(meta["size"])
        table.size = size
        table.ids = list(meta["ids"])
        table.vocabs = {k: Vocab(meta["vocabs"][k]) for k in cls.STRING_COLUMNS}
        table._alive = arrays["alive"].astype(bool)
        table._price = arrays["price"].astype(np.float64)
        table._codes = {k: arrays[f"code_{k}"].astype(np.int32) for k in cls.STRING_COLUMNS}
        lengths = {
            len(table.ids),
            len(table._alive),
            len(table._price),
            *(len(v) for v in table._codes.values()),
        }
        if lengths != {size}:
            raise ValueError(f"attribute columns have inconsistent lengths {sorted(lengths)} (size {size})")
        for k in cls.STRING_COLUMNS:
            codes = table._codes[k]
            if size and (codes.min() < 0 or codes.max() >= len(table.vocabs[k].values)):
                raise ValueError(f"column {k} has codes outside its vocabulary")
        table.slot_of = {item_id: slot for slot, item_id in enumerate(table.ids) if item_id is not None}
        if not np.array_equal(table._alive, np.array([i is not None for i in table.ids], dtype=bool)):
            raise ValueError("alive column disagrees with the id list")
        if len(table.slot_of) != int(table._alive.sum()):
            raise ValueError("duplicate live ids")
        return table


def _grown(array: np.ndarray, capacity: int, fill) -> np.ndarray:
    grown = np.full(capacity, fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
