"""The whole preparation, step after step (see `training.prepare` for what each step does)."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.prepared_data import IMAGE_COLUMNS, IMAGES_DIR, CategoryLabels, image_path
from common.prepared_data.frames import write_prepared, write_summary
from training.dataset import DEFAULT_OUT_DIR, check_data_dir
from training.prepare.near_duplicates import (
    NEAR_DUPLICATE_CORRELATION,
    NEAR_DUPLICATE_HAMMING,
    NEAR_DUPLICATE_TEXT_COSINE,
    near_duplicate_photo_pairs,
    near_duplicate_text_links,
    photo_groups,
)
from training.prepare.photos import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_SIZE,
    DEFAULT_WORKERS,
    FINGERPRINT_SIDE,
    ImageJob,
    clean_images,
)
from training.prepare.report import (
    ListingsSummary,
    PhotosSummary,
    PrepareSummary,
    SplitsSummary,
    save_samples_grid,
    split_counts,
)
from training.prepare.splits import (
    DEFAULT_FRACTIONS,
    DEFAULT_SEED,
    assert_no_leak,
    assign_splits,
    duplicate_report,
    split_leaks,
    split_units,
)
from training.prepare.tables import (
    DEFAULT_ABSURD_PRICE,
    EXAMPLES,
    clean_listings,
    find_image_files,
    join_images,
    read_table,
)


def prepare(
    data_dir: Path | str,
    out_dir: Path | str = DEFAULT_OUT_DIR,
    *,
    images_dir: Path | str | None = None,
    size: int = DEFAULT_SIZE,
    workers: int = DEFAULT_WORKERS,
    seed: int = DEFAULT_SEED,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    absurd_price: float = DEFAULT_ABSURD_PRICE,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    samples_per_category: int = 6,
    recentre: bool = True,
    progress: bool = True,
) -> PrepareSummary:
    """Run the whole preparation and return its summary (also written to summary.json).

    `images_dir` defaults to ``data_dir/images``.  `recentre` moves the content of
    photos letterboxed into the top-left corner to the centre (see module doc).  Raises `DataNotFoundError` for a
    missing data folder and `AssertionError` if the splits would leak.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    images_dir = Path(images_dir) if images_dir is not None else data_dir / "images"
    check_data_dir(data_dir, images_dir=images_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)

    raw, parse_errors = read_table(
        data_dir / "Products.csv", ["id", "product_name", "category", "product_description", "price"]
    )
    listings, listing_report = clean_listings(raw, absurd_price=absurd_price)
    labels = CategoryLabels.from_names(listings["main_category"])

    image_rows, image_parse_errors = read_table(data_dir / "Images.csv", ["id", "product_id"])
    files, files_report = find_image_files(images_dir)
    joined, join_report = join_images(image_rows, listings, files)

    jobs = [
        ImageJob(
            row.image_id,
            row.source,
            str(out_dir / image_path(row.image_id)),
            size,
            max_bytes,
            max_pixels,
            recentre,
        )
        for row in joined.itertuples(index=False)
    ]
    outcomes = clean_images(jobs, workers=workers, progress=progress)
    outcome_of = {o.image_id: o for o in outcomes}
    failed = [o for o in outcomes if o.status == "error"]
    source_of = dict(zip(joined["image_id"], joined["source"]))

    images = joined[~joined["image_id"].isin({o.image_id for o in failed})].reset_index(drop=True)
    images["sha256"] = images["image_id"].map(lambda i: outcome_of[i].sha256)
    images["label"] = images["main_category"].map(labels.encode).astype(int)
    images["path"] = images["image_id"].map(image_path)
    thumbs = (
        np.stack(
            [
                np.frombuffer(outcome_of[i].fingerprint, dtype=np.uint8).reshape(
                    FINGERPRINT_SIDE, FINGERPRINT_SIDE
                )
                for i in images["image_id"]
            ]
        )
        if len(images)
        else np.zeros((0, FINGERPRINT_SIDE, FINGERPRINT_SIDE), dtype=np.uint8)
    )
    photo_pairs = near_duplicate_photo_pairs(thumbs)
    images["photo_group"] = photo_groups(images, photo_pairs)
    text_links = near_duplicate_text_links(listings[listings["product_id"].isin(set(images["product_id"]))])
    images["split"] = (
        assign_splits(images, fractions=fractions, seed=seed, links=text_links) if len(images) else []
    )
    assert_no_leak(images)
    units = split_units(images, text_links) if len(images) else pd.Series(dtype=str)
    near_duplicates = {
        "photo_pairs": int(len(photo_pairs)),
        "photo_pairs_not_byte_identical": int(
            sum(images.at[i, "sha256"] != images.at[j, "sha256"] for i, j in photo_pairs)
        ),
        **(duplicate_report(images, "photo_group") if len(images) else {}),
        "text_pairs": len(text_links),
        "largest_split_unit_listings": int(images.groupby(units)["product_id"].nunique().max())
        if len(images)
        else 0,
        "max_hamming": NEAR_DUPLICATE_HAMMING,
        "min_correlation": NEAR_DUPLICATE_CORRELATION,
        "min_text_cosine": NEAR_DUPLICATE_TEXT_COSINE,
    }
    images = images[list(IMAGE_COLUMNS)].sort_values("image_id").reset_index(drop=True)

    write_prepared(out_dir, listings, images, labels)
    statuses = Counter(o.status for o in outcomes)
    referenced = set(images["path"])
    stale = sum(
        1
        for name in os.listdir(out_dir / IMAGES_DIR)
        if name.endswith(".jpg") and f"{IMAGES_DIR}/{name}" not in referenced
    )

    summary = PrepareSummary(
        data_dir=str(data_dir),
        images_dir=str(images_dir),
        out_dir=str(out_dir),
        listings=ListingsSummary(
            rows_read=int(len(raw)),
            parse_errors=len(parse_errors),
            parse_error_examples=parse_errors[:EXAMPLES],
            dropped=listing_report["dropped"],
            kept=int(len(listings)),
            per_main_category={c: int(n) for c, n in listings["main_category"].value_counts().items()},
            distinct_category_paths=listing_report["distinct_category_paths"],
            titles_without_gumtree_suffix=listing_report["titles_without_gumtree_suffix"],
            location_differs_from_location_column=listing_report["location_differs_from_location_column"],
        ),
        prices=listing_report["prices"],
        join={**join_report, "image_table_parse_errors": len(image_parse_errors), **files_report},
        photos=PhotosSummary(
            processed=len(outcomes),
            copied_unchanged=statuses["copied"],
            reencoded=statuses["written"],
            recentred=sum(o.recentred for o in outcomes),
            skipped_already_done=statuses["skipped"],
            failed=len(failed),
            failed_list=[
                {"image_id": o.image_id, "file": source_of[o.image_id], "error": o.error} for o in failed
            ],
            usable=int(len(images)),
            stale_files_in_out_images=stale,
        ),
        duplicates=duplicate_report(images) if len(images) else {},
        near_duplicates=near_duplicates,
        splits=SplitsSummary(
            seed=seed,
            fractions=list(fractions),
            units=int(units.nunique()),
            listings_merged_by_shared_photos_or_texts=int(images["product_id"].nunique() - units.nunique())
            if len(images)
            else 0,
            **split_counts(images, labels.categories),
            leaks=split_leaks(images),
        ),
        labels=list(labels.categories),
    )
    if len(images):
        summary.samples_png = str(
            save_samples_grid(
                images, out_dir, labels.categories, per_category=samples_per_category, seed=seed
            )
        )
    summary.seconds = round(time.perf_counter() - started, 1)
    write_summary(out_dir, summary.to_json())
    return summary
