"""The prepared data set as pandas frames: its typed reader and its writers (the file names and
columns are declared in `common.prepared_data`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from common.prepared_data import (
    IMAGE_COLUMNS,
    IMAGES_FILE,
    LABELS_FILE,
    LISTING_COLUMNS,
    LISTINGS_FILE,
    SUMMARY_FILE,
    CategoryLabels,
    DataNotFoundError,
    _require_columns,
    _require_files,
)


class PreparedData(NamedTuple):
    """What `load_prepared` returns; unpacks as ``listings, images, categories``."""

    listings: pd.DataFrame
    images: pd.DataFrame
    categories: list[str]


def load_prepared(out_dir: Path | str, *, check_files: bool = False) -> PreparedData:
    """Read a prepared folder as typed frames.

    Ids and text stay strings (a title "NA" is not a missing value); ``price`` is
    float with NaN where the raw price was unparseable; ``label`` is int.
    With ``check_files`` every image path is also checked to exist.
    """
    out = Path(out_dir)
    _require_files(out, (LISTINGS_FILE, IMAGES_FILE, LABELS_FILE))
    text_columns = [c for c in LISTING_COLUMNS if c != "price"]
    listings = pd.read_csv(
        out / LISTINGS_FILE,
        dtype={c: str for c in text_columns} | {"price": float},
        keep_default_na=False,
        na_values={"price": [""]},
    )
    images = pd.read_csv(
        out / IMAGES_FILE,
        dtype={c: str for c in IMAGE_COLUMNS if c != "label"} | {"label": int},
        keep_default_na=False,
    )
    _require_columns(list(listings.columns), LISTING_COLUMNS, LISTINGS_FILE)
    _require_columns(list(images.columns), IMAGE_COLUMNS, IMAGES_FILE)
    labels = CategoryLabels.load(out / LABELS_FILE)
    if check_files:
        absent = [p for p in images["path"] if not (out / p).is_file()]
        if absent:
            raise DataNotFoundError(
                f"{len(absent)} image files listed in {IMAGES_FILE} are missing, e.g. {absent[:3]}"
            )
    return PreparedData(listings, images, list(labels.categories))


def write_prepared(
    out_dir: Path | str, listings: pd.DataFrame, images: pd.DataFrame, labels: CategoryLabels
) -> None:
    """Write ``labels.json``, ``listings.csv`` and ``images.csv`` (the CSVs atomically, in the
    declared column order, so a reader never sees half a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels.save(out / LABELS_FILE)
    _write_csv(listings[list(LISTING_COLUMNS)], out / LISTINGS_FILE)
    _write_csv(images[list(IMAGE_COLUMNS)], out / IMAGES_FILE)


def write_summary(out_dir: Path | str, summary: dict) -> None:
    """``summary.json``, atomically."""
    path = Path(out_dir) / SUMMARY_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)
