"""Step 1 and 2 of preparation: the listings table cleaned, and the photo table joined to it."""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.prepared_data import LISTING_COLUMNS
from common.prices import DEFAULT_CURRENCY, ParsedPrice, parse_price, price_flag

#: Prices above this (in the listing's currency) are flagged "absurd": nothing in these
#: 13 second-hand goods categories costs more; the raw data has 1,234,567 and 10,000,000.
DEFAULT_ABSURD_PRICE = 100_000.0
EXAMPLES = 5  # how many example ids a report lists per reason

_TITLE_RE = re.compile(r"^(?P<title>.*)\s\|\s+in\s+(?P<location>.+?)\s+\|\s+Gumtree\s*$", re.DOTALL)
_IMAGE_NAME_RE = re.compile(r"^(?P<id>.+?)(?P<resized>_resized)?\.(?:jpe?g|png|webp)$", re.IGNORECASE)


def split_title(product_name: str) -> tuple[str, str | None]:
    """ "Sofa | in Leeds, West Yorkshire | Gumtree" -> ("Sofa", "Leeds, West Yorkshire").

    The last " | in ... | Gumtree" is the suffix, so titles that contain " | " keep it.
    Returns location None when the name has no such suffix.
    """
    match = _TITLE_RE.match(product_name)
    if not match:
        return product_name.strip(), None
    return match["title"].strip(), match["location"].strip()


def main_category_of(category: str) -> str:
    """The part of a category path before the first " / "."""
    return category.split(" / ", 1)[0].strip()


def read_table(path: Path, required: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Read a course CSV as strings, robust to bare ``\\r`` inside fields and CRLF files.

    A leading unnamed column (a saved pandas index) is used as index and dropped.
    Lines with too many fields are skipped *and returned* as parse-error messages.
    """
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = next(csv.reader([fh.readline().rstrip("\r\n")]), [])
    has_index = bool(header) and (header[0].strip() == "" or header[0].startswith("Unnamed"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pd.errors.ParserWarning)
        frame = pd.read_csv(
            path,
            lineterminator="\n",
            index_col=0 if has_index else None,
            dtype=str,
            keep_default_na=False,
            on_bad_lines="warn",
            encoding="utf-8-sig",  # tolerate a byte-order mark
        )
    parse_errors = [
        line.strip()
        for w in caught
        if issubclass(w.category, pd.errors.ParserWarning)
        for line in str(w.message).splitlines()
        if line.strip()
    ]
    # A CRLF file read with lineterminator="\n" leaves "\r" at the end of each last field.
    frame.columns = [str(c).strip() for c in frame.columns]
    last = frame.columns[-1]
    frame[last] = frame[last].str.removesuffix("\r")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ValueError(f"{path.name} lacks columns {missing}; found {list(frame.columns)}")
    return frame.reset_index(drop=True), parse_errors


def clean_listings(
    raw: pd.DataFrame,
    *,
    absurd_price: float = DEFAULT_ABSURD_PRICE,
    default_currency: str = DEFAULT_CURRENCY,
) -> tuple[pd.DataFrame, dict]:
    """Raw Products.csv rows -> Listing rows in the `LISTING_COLUMNS` layout, plus a report.

    A row is dropped only when it is really incomplete (no id, no title or no
    category) or repeats an earlier id; an odd price is kept and flagged instead.
    """
    frame = pd.DataFrame(
        {
            "product_id": raw["id"].str.strip(),
            "product_name": raw["product_name"].str.strip(),
            "category": raw["category"].str.strip(),
            "description": raw["product_description"]
            .str.replace("\r\n", "\n")
            .str.replace("\r", "\n")
            .str.strip(),
            "raw_price": raw["price"].str.strip(),
            "raw_location": raw["location"].str.strip() if "location" in raw else "",
        }
    )
    titles = frame["product_name"].map(split_title)
    frame["title"] = [t for t, _ in titles]
    suffix_location = pd.Series([loc for _, loc in titles], index=frame.index, dtype=object)
    frame["location"] = suffix_location.fillna(frame["raw_location"])

    dropped: list[dict] = []
    keep = pd.Series(True, index=frame.index)
    missing_fields = pd.DataFrame(
        {
            "product_id": frame["product_id"] == "",
            "title": frame["title"] == "",
            "category": frame["category"] == "",
        }
    )
    reasons = missing_fields.apply(lambda row: ", ".join(c for c, bad in row.items() if bad), axis=1)
    for reason, rows in frame[reasons != ""].groupby(reasons[reasons != ""], sort=True):
        dropped.append(_drop_record(f"missing {reason}", rows))
    keep &= reasons == ""
    duplicate = keep & frame["product_id"].where(keep).duplicated(keep="first")
    if duplicate.any():
        dropped.append(_drop_record("duplicate product_id (first kept)", frame[duplicate]))
    keep &= ~duplicate
    frame = frame[keep].copy()

    parsed = [parse_price(p, default_currency=default_currency) for p in frame["raw_price"]]
    frame["price"] = [np.nan if p.value is None else p.value for p in parsed]
    frame["currency"] = [p.currency for p in parsed]
    frame["price_flag"] = [price_flag(p.value, absurd_price=absurd_price) for p in parsed]
    frame["main_category"] = frame["category"].map(main_category_of)

    report = {
        "dropped": dropped,
        "titles_without_gumtree_suffix": int(suffix_location[keep].isna().sum()),
        "location_differs_from_location_column": int(
            ((frame["raw_location"] != "") & (frame["location"] != frame["raw_location"])).sum()
        ),
        "prices": _price_report(frame, parsed, absurd_price),
        "distinct_category_paths": int(frame["category"].nunique()),
    }
    return frame[list(LISTING_COLUMNS)].reset_index(drop=True), report


def _drop_record(reason: str, rows: pd.DataFrame) -> dict:
    ids = [pid or f"<row {i}>" for i, pid in zip(rows.index, rows["product_id"])]
    return {"reason": reason, "count": int(len(rows)), "examples": ids[:EXAMPLES]}


def _price_report(frame: pd.DataFrame, parsed: list[ParsedPrice], absurd_price: float) -> dict:
    """Price statistics over parsed prices, with and without the flagged ones."""
    flags = frame["price_flag"]
    ordinary = frame.loc[flags == "", "price"]
    parsed_prices = frame["price"].dropna()
    unparseable = frame.loc[flags == "unparseable", ["product_id", "raw_price"]]
    return {
        "parsed": int(parsed_prices.size),
        "unparseable": int((flags == "unparseable").sum()),
        "unparseable_examples": [
            f"{pid}: {raw!r}" for pid, raw in unparseable.head(EXAMPLES).itertuples(index=False)
        ],
        "zero": int((flags == "zero").sum()),
        "absurd": int((flags == "absurd").sum()),
        "absurd_threshold": absurd_price,
        "absurd_examples": [
            float(v) for v in frame.loc[flags == "absurd", "price"].sort_values().tail(EXAMPLES)
        ],
        "without_currency_symbol": int(sum(p.value is not None and not p.had_symbol for p in parsed)),
        "currencies": {k: int(v) for k, v in Counter(c for c in frame["currency"] if c).most_common()},
        "all_parsed": _stats(parsed_prices),
        "unflagged": _stats(ordinary),
    }


def _stats(values: pd.Series) -> dict:
    if values.empty:
        return {"count": 0}
    return {
        "count": int(values.size),
        "min": float(values.min()),
        "median": float(values.median()),
        "mean": round(float(values.mean()), 2),
        "max": float(values.max()),
    }


def find_image_files(images_dir: Path) -> tuple[dict[str, Path], dict]:
    """Map image_id -> file for ``<id>.jpg`` / ``<id>_resized.jpg`` (also .jpeg/.png/.webp).

    When both an original and a ``_resized`` file exist, the original is used: we
    do the cleaning ourselves from the best source.
    """
    found: dict[str, tuple[bool, Path]] = {}
    both = 0
    ignored: list[str] = []
    for entry in sorted(os.scandir(images_dir), key=lambda e: e.name):
        if not entry.is_file():
            continue
        match = _IMAGE_NAME_RE.match(entry.name)
        if not match:
            ignored.append(entry.name)
            continue
        image_id, resized = match["id"], bool(match["resized"])
        if image_id in found:
            both += 1
            if found[image_id][0] and not resized:
                found[image_id] = (resized, Path(entry.path))
            continue
        found[image_id] = (resized, Path(entry.path))
    report = {
        "files_found": len(found),
        "ids_with_original_and_resized": both,
        "files_ignored_by_name": len(ignored),
        "files_ignored_examples": ignored[:EXAMPLES],
    }
    return {image_id: path for image_id, (_, path) in found.items()}, report


def join_images(
    image_rows: pd.DataFrame, listings: pd.DataFrame, files: dict[str, Path]
) -> tuple[pd.DataFrame, dict]:
    """The course's ``combined_df``: Images.csv inner-joined with the clean listings,
    restricted to images whose file exists.  Returns image_id, product_id,
    main_category and source (the file path) per joinable image, plus a report."""
    rows = pd.DataFrame(
        {"image_id": image_rows["id"].str.strip(), "product_id": image_rows["product_id"].str.strip()}
    )
    report: dict = {"image_rows": int(len(rows))}
    incomplete = (rows["image_id"] == "") | (rows["product_id"] == "")
    duplicate = ~incomplete & rows["image_id"].duplicated(keep="first")
    report["image_rows_incomplete"] = int(incomplete.sum())
    report["image_rows_duplicate_id"] = int(duplicate.sum())
    rows = rows[~incomplete & ~duplicate]

    joined = rows.merge(
        listings[["product_id", "main_category"]], on="product_id", how="inner", validate="many_to_one"
    )
    unknown = rows[~rows["product_id"].isin(listings["product_id"])]
    report["image_rows_joined"] = int(len(joined))
    report["image_rows_without_listing"] = int(len(unknown))
    report["image_rows_without_listing_examples"] = unknown["image_id"].head(EXAMPLES).tolist()

    has_file = joined["image_id"].isin(files.keys())
    report["image_rows_with_file"] = int(has_file.sum())
    report["image_rows_without_file"] = int((~has_file).sum())
    listed = set(rows["image_id"])
    extras = sorted(set(files) - listed)
    report["files_without_image_row"] = len(extras)
    report["files_without_image_row_examples"] = extras[:EXAMPLES]
    products_with_rows = set(joined["product_id"])
    report["listings_without_image_rows"] = int((~listings["product_id"].isin(products_with_rows)).sum())
    with_file = joined[has_file].copy()
    report["listings_with_image_files"] = int(with_file["product_id"].nunique())
    with_file["source"] = with_file["image_id"].map(lambda i: str(files[i]))
    return with_file.sort_values("image_id").reset_index(drop=True), report
