"""Step 4 of preparation: leak-free train/valid/test splits over units of connected listings."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from common.prepared_data import SPLITS

DEFAULT_SEED = 42
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)


class UnionFind:
    """Minimal union-find over hashable keys (path halving, union by size)."""

    def __init__(self) -> None:
        self.parent: dict = {}
        self.size: dict = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        self.size.setdefault(key, 1)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] < self.size[rb]:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


def name_groups(keys: list, uf: UnionFind, index: pd.Index) -> pd.Series:
    """Each key -> the smallest key of its union-find group (independent of row order)."""
    members: dict = defaultdict(list)
    for key in keys:
        members[uf.find(key)].append(key)
    name = {key: min(group) for group in members.values() for key in group}
    return pd.Series([name[k] for k in keys], index=index)


def split_units(images: pd.DataFrame, links: Iterable[tuple[str, str]] = ()) -> pd.Series:
    """Give every image the id of its split unit: listings connected by a shared photo (the same
    ``photo_group`` when the frame has one, else the same sha256) or by one of `links` (pairs of
    product ids, e.g. re-posts with near-identical text) form one unit.  The unit id is the
    smallest product_id in it, so it does not depend on row order."""
    uf = UnionFind()
    for product_id in images["product_id"]:
        uf.find(product_id)
    photo_key = "photo_group" if "photo_group" in images else "sha256"
    for _, products in images.groupby(photo_key)["product_id"]:
        first, *rest = products.tolist()
        for other in rest:
            uf.union(first, other)
    known = set(images["product_id"])
    for a, b in links:
        if a in known and b in known:
            uf.union(a, b)
    products = images["product_id"].tolist()
    return name_groups(products, uf, images.index)


def assign_splits(
    images: pd.DataFrame,
    *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    links: Iterable[tuple[str, str]] = (),
) -> pd.Series:
    """Split images into train/valid/test, grouped by unit and stratified by category.

    Each unit gets the main category of most of its images (ties: alphabetical).
    Within a category, units are shuffled with `seed` (largest first, so the small
    ones fine-tune the balance) and each goes to the split furthest below its share
    of that category's images.  Needs columns product_id, main_category and sha256 (or
    photo_group); `links` are product-id pairs that must share a split (see `split_units`).
    """
    if len(fractions) != len(SPLITS) or abs(sum(fractions) - 1.0) > 1e-9 or min(fractions) < 0:
        raise ValueError(
            f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}"
        )
    units = split_units(images, links)
    counts = images.groupby([units, images["main_category"]]).size()
    unit_category: dict[str, str] = {}
    for unit, per_category in counts.groupby(level=0):
        ranked = sorted(((-n, cat) for (_, cat), n in per_category.items()))
        unit_category[unit] = ranked[0][1]
    unit_size = units.value_counts()
    by_category: dict[str, list[str]] = defaultdict(list)
    for unit in sorted(unit_category):
        by_category[unit_category[unit]].append(unit)

    rng = np.random.default_rng(seed)
    target = np.asarray(fractions, dtype=float)
    split_of_unit: dict[str, str] = {}
    for category in sorted(by_category):
        members = by_category[category]
        shuffled = [members[i] for i in rng.permutation(len(members))]
        shuffled.sort(key=lambda u: -int(unit_size[u]))  # stable: shuffle order kept among equal sizes
        filled = np.zeros(len(SPLITS))
        for unit in shuffled:
            size = int(unit_size[unit])
            deficit = target * (filled.sum() + size) - filled
            choice = int(np.argmax(deficit))
            filled[choice] += size
            split_of_unit[unit] = SPLITS[choice]
    return units.map(split_of_unit)


def split_leaks(images: pd.DataFrame) -> dict[str, int]:
    """Count leaks: listings, byte-identical photos and (when the frame has a ``photo_group``
    column) near-duplicate photo groups that occur in more than one split."""
    leaks = {
        "listings_in_several_splits": int((images.groupby("product_id")["split"].nunique() > 1).sum()),
        "photos_in_several_splits": int((images.groupby("sha256")["split"].nunique() > 1).sum()),
    }
    if "photo_group" in images:
        leaks["near_duplicate_groups_in_several_splits"] = int(
            (images.groupby("photo_group")["split"].nunique() > 1).sum()
        )
    return leaks


def assert_no_leak(images: pd.DataFrame) -> None:
    """Raise `AssertionError` if a listing or a (near-)duplicated photo spans two splits."""
    leaks = split_leaks(images)
    if any(leaks.values()):
        raise AssertionError(f"split leak: {leaks}")


def duplicate_report(images: pd.DataFrame, key: str = "sha256") -> dict:
    """Groups of photos with the same `key` (sha256: byte-identical; photo_group: near-duplicates),
    and how many span several listings."""
    groups = images.groupby(key).agg(files=("image_id", "size"), products=("product_id", "nunique"))
    dup = groups[groups["files"] > 1]
    return {
        "groups": int(len(dup)),
        "files_in_groups": int(dup["files"].sum()),
        "extra_copies": int((dup["files"] - 1).sum()),
        "groups_spanning_listings": int((dup["products"] > 1).sum()),
    }
