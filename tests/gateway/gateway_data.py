"""A small prepared-data folder (the ``training.prepare`` layout) made straight from the real
marketplace files, for the gateway's integration tests and benchmark.

``listings.csv`` and ``images.csv`` have the prepared columns; ``path`` points at the real 512x512
photos in the shared data folder (absolute paths, so nothing is copied). Listings with a photo that
is byte-identical to another listing's (re-posts) are left out, so "a catalogue photo finds its own
listing first" is well defined.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from common.prepared_data import IMAGE_COLUMNS, IMAGES_FILE, LISTING_COLUMNS, LISTINGS_FILE
from common.prices import price_value

SHARED = Path(
    os.environ.get("DATA") or Path(__file__).resolve().parents[3] / "shared" / "data" / "marketplace"
).resolve()


def shared_data_dir() -> Path:
    for candidate in (SHARED, Path("/work/shared/data/marketplace")):
        if (candidate / "images_manifest.csv").is_file():
            return candidate
    raise FileNotFoundError(f"marketplace data not found at {SHARED} (set DATA)")


def make_mini_prepared(
    out_dir: Path, per_category: int = 3, categories: list[str] | None = None, skip: int = 0
) -> Path:
    """Write listings.csv / images.csv for ``per_category`` listings of each category (the first by
    product id after ``skip``) and all their photos; returns ``out_dir``."""
    data = shared_data_dir()
    manifest = pd.read_csv(data / "images_manifest.csv", dtype=str)
    duplicated = manifest["git_blob_sha1"].duplicated(keep=False)
    reposted = set(manifest.loc[duplicated, "product_id"])
    manifest = manifest[~manifest["product_id"].isin(reposted)]
    products = pd.read_csv(data / "Products.csv", lineterminator="\n", index_col=0, dtype=str)
    products = products[products["id"].isin(set(manifest["product_id"]))]
    chosen: list[str] = []
    for category, group in sorted(manifest.groupby("main_category")):
        if categories is not None and category not in categories:
            continue
        chosen += sorted(group["product_id"].unique())[skip : skip + per_category]
    rows = []
    for product in products[products["id"].isin(chosen)].itertuples(index=False):
        title, _, rest = product.product_name.partition(" | ")
        location = rest.removeprefix("in ").split(" | ")[0].strip() or product.location
        price = price_value(product.price)
        rows.append(
            dict(
                product_id=product.id,
                title=title.strip(),
                location=location,
                description=str(product.product_description).replace("\r", "\n").strip(),
                category=product.category,
                main_category=product.category.split(" / ")[0],
                price=price,
                currency="GBP",
                price_flag="" if price is not None else "unparseable",
            )
        )
    listings = pd.DataFrame(rows, columns=list(LISTING_COLUMNS)).sort_values("product_id")
    images = manifest[manifest["product_id"].isin(chosen)].copy()
    images["label"] = 0
    images["split"] = "test"
    images["path"] = [str(data / "images" / name) for name in images["file"]]
    images["sha256"] = images["git_blob_sha1"]
    out_dir.mkdir(parents=True, exist_ok=True)
    listings.to_csv(out_dir / LISTINGS_FILE, index=False, lineterminator="\n")
    images[list(IMAGE_COLUMNS)].sort_values("image_id").to_csv(
        out_dir / IMAGES_FILE, index=False, lineterminator="\n"
    )
    return out_dir


def outside_photos(prepared: Path, count: int) -> list[Path]:
    """Real photos of listings that are not in ``prepared`` (for AddListing)."""
    data = shared_data_dir()
    inside = set(pd.read_csv(prepared / LISTINGS_FILE, dtype=str)["product_id"])
    manifest = pd.read_csv(data / "images_manifest.csv", dtype=str)
    duplicated = manifest["git_blob_sha1"].duplicated(keep=False)
    manifest = manifest[~duplicated & ~manifest["product_id"].isin(inside)].sort_values("image_id")
    return [data / "images" / name for name in manifest["file"].head(count)]
