"""Step 5 of preparation: what was kept and dropped, as a summary, a few terminal lines and a picture."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.prepared_data import SAMPLES_FILE, SPLITS


@dataclass
class ListingsSummary:
    """Step 1: what Products.csv held and what was kept."""

    rows_read: int
    parse_errors: int
    parse_error_examples: list[str]
    dropped: list[dict]
    kept: int
    per_main_category: dict[str, int]
    distinct_category_paths: int
    titles_without_gumtree_suffix: int
    location_differs_from_location_column: int


@dataclass
class PhotosSummary:
    """Step 3: what happened to each photo."""

    processed: int
    copied_unchanged: int
    reencoded: int
    recentred: int
    skipped_already_done: int
    failed: int
    failed_list: list[dict]
    usable: int
    stale_files_in_out_images: int


@dataclass
class SplitsSummary:
    """Step 4: the split's settings, its counts and its leaks (all zero, or preparation fails)."""

    seed: int
    fractions: list[float]
    units: int
    listings_merged_by_shared_photos_or_texts: int
    images: dict[str, int]
    listings: dict[str, int]
    images_per_category: dict[str, dict[str, int]]
    leaks: dict[str, int]

    def to_json(self) -> dict:
        payload = asdict(self)
        return payload | payload.pop("leaks")


@dataclass
class PrepareSummary:
    """What one preparation run did; ``summary.json`` is its `to_json`."""

    data_dir: str
    images_dir: str
    out_dir: str
    listings: ListingsSummary
    prices: dict
    join: dict
    photos: PhotosSummary
    duplicates: dict
    near_duplicates: dict
    splits: SplitsSummary
    labels: list[str]
    seconds: float | None = None
    samples_png: str | None = None

    def to_json(self) -> dict:
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        payload |= {
            "listings": asdict(self.listings),
            "photos": asdict(self.photos),
            "splits": self.splits.to_json(),
        }
        if self.samples_png is None:
            del payload["samples_png"]
        return payload


def split_counts(images: pd.DataFrame, categories: Sequence[str]) -> dict:
    """Images and listings per split, and images per category and split."""
    per_category = (
        images.groupby(["main_category", "split"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=list(categories), columns=list(SPLITS), fill_value=0)
    )
    return {
        "images": {s: int((images["split"] == s).sum()) for s in SPLITS},
        "listings": {s: int(images.loc[images["split"] == s, "product_id"].nunique()) for s in SPLITS},
        "images_per_category": {c: {s: int(per_category.at[c, s]) for s in SPLITS} for c in categories},
    }


def save_samples_grid(
    images: pd.DataFrame, out_dir: Path, categories: Sequence[str], *, per_category: int, seed: int
) -> Path:
    """A picture with one row of cleaned sample photos per main category."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = out_dir / SAMPLES_FILE
    rows = [c for c in categories if (images["main_category"] == c).any()] or list(categories)
    cols = max(1, per_category)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.5 * cols + 1.8, 1.5 * len(rows)), squeeze=False)
    for r, category in enumerate(rows):
        pool = images[images["main_category"] == category]
        picks = pool.sample(n=min(cols, len(pool)), random_state=seed) if len(pool) else pool
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(picks):
                with Image.open(out_dir / picks.iloc[c]["path"]) as img:
                    img.thumbnail((160, 160))
                    ax.imshow(np.asarray(img.convert("RGB")))
            else:
                ax.axis("off")
        axes[r][0].set_ylabel(category, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"Sample cleaned photos per main category ({len(images):,} photos)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def format_summary(summary: PrepareSummary) -> str:
    """The summary as a few readable lines for the terminal."""
    lst, prices, join, photos, splits = (
        summary.listings,
        summary.prices,
        summary.join,
        summary.photos,
        summary.splits,
    )
    lines = [
        f"listings: {lst.rows_read:,} rows read, {lst.parse_errors} parse errors, {lst.kept:,} kept",
    ]
    for drop in lst.dropped:
        lines.append(
            f"  dropped {drop['count']:,}: {drop['reason']} (e.g. {', '.join(drop['examples'][:3])})"
        )
    lines.append(
        f"  {len(lst.per_main_category)} main categories, {lst.distinct_category_paths} category paths"
    )
    for category, n in lst.per_main_category.items():
        lines.append(f"    {category:<34} {n:>6,}")
    ordinary = prices["unflagged"]
    lines += [
        f"prices: {prices['parsed']:,} parsed, {prices['unparseable']} unparseable, {prices['zero']} zero, "
        f"{prices['absurd']} absurd (> {prices['absurd_threshold']:,.0f} or < 0: {prices['absurd_examples']})",
        f"  unflagged: min {ordinary.get('min')}, median {ordinary.get('median')}, mean {ordinary.get('mean')}, "
        f"max {ordinary.get('max')}; currencies {prices['currencies']}",
        f"join: {join['image_rows']:,} image rows, {join['image_rows_joined']:,} joined to a listing, "
        f"{join['image_rows_with_file']:,} with a file, {join['image_rows_without_file']:,} without; "
        f"{join['image_rows_without_listing']} rows without listing; {join['listings_without_image_rows']} listings "
        f"without image rows; {join['files_without_image_row']} files without a row",
        f"photos: {photos.usable:,} usable from {photos.processed:,} of "
        f"{join['listings_with_image_files']:,} listings "
        f"({photos.copied_unchanged:,} copied, {photos.reencoded:,} re-encoded of which "
        f"{photos.recentred:,} re-centred, "
        f"{photos.skipped_already_done:,} already done, {photos.failed} failed)",
    ]
    for failure in photos.failed_list[:10]:
        lines.append(f"  failed {failure['image_id']}: {failure['error']}")
    dup = summary.duplicates
    if dup:
        lines.append(
            f"duplicates: {dup['groups']} groups of byte-identical photos ({dup['extra_copies']} extra copies), "
            f"{dup['groups_spanning_listings']} spanning several listings"
        )
    near = summary.near_duplicates
    if near:
        lines.append(
            f"near-duplicates: {near['photo_pairs']} photo pairs ({near['photo_pairs_not_byte_identical']} not byte-identical) "
            f"in {near['groups']} groups, {near['groups_spanning_listings']} spanning several listings; "
            f"{near['text_pairs']} listing pairs with near-identical text; largest split unit "
            f"{near['largest_split_unit_listings']} listings"
        )
    lines.append(
        f"splits (seed {splits.seed}, {splits.units:,} units, {splits.listings_merged_by_shared_photos_or_texts} listings "
        f"merged by shared photos or texts): images {splits.images}, listings {splits.listings}; leaks: "
        f"{splits.leaks['listings_in_several_splits']} listings, {splits.leaks['photos_in_several_splits']} photos, "
        f"{splits.leaks.get('near_duplicate_groups_in_several_splits', 0)} near-duplicate groups"
    )
    lines.append(f"  {'category':<34} {'train':>6} {'valid':>6} {'test':>6}")
    for category, counts in splits.images_per_category.items():
        lines.append(f"  {category:<34} " + " ".join(f"{counts[s]:>6,}" for s in SPLITS))
    lines.append(f"wrote {summary.out_dir} in {summary.seconds} s")
    return "\n".join(lines)
