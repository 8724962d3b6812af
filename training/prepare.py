"""Turn the raw marketplace tables and photos into a reproducible, leak-free dataset.

    python -m training.prepare --data DIR --out DIR

Steps (each reports what it dropped and why, nothing is dropped silently):

1. Listings: ``Products.csv`` read with ``lineterminator="\\n"`` (descriptions hold
   bare carriage returns that the default reader treats as row ends, which is where
   the course's phantom "nulls" came from); incomplete rows and duplicate ids
   dropped; prices parsed to number + currency and flagged; the Gumtree title
   suffix split into title and location; ``main_category`` derived from the path.
2. Join: ``Images.csv`` inner-joined with the listings and restricted to images whose
   file exists (``<image_id>.jpg`` or ``<image_id>_resized.jpg``).
3. Photos: decoded with `common.images.open_image` (EXIF orientation, any mode to RGB,
   corrupt files listed and skipped), letterboxed to a square of their own longest
   side, at most 512 (never scaled up: the 320x320 photos stay 320x320, the model's
   transform resizes to its input size) and written as ``OUT/images/<image_id>.jpg``
   on 2 processes; a re-run skips finished files.
   A source that is already a square RGB JPEG without EXIF and correctly centred is
   copied byte for byte (re-encoding would only lose quality); anything else is
   re-encoded at quality 95, which also drops EXIF metadata such as GPS positions.
   The course's square photos were letterboxed *top-left* (the black band is only
   on the right or bottom); `recentre_letterbox` moves their content to the centre
   so training photos look like what `common.images.letterbox` gives at query time.
   Each cleaned photo gets a 32x32 grey fingerprint for near-duplicate detection.
4. Splits: 70/15/15 train/valid/test, grouped so that a listing never spans two
   splits *and* listings sharing a photo or a near-duplicate of one (the same photo
   re-encoded or resized, see `near_duplicate_photo_pairs`) or a near-identical text
   (re-posted adverts, `near_duplicate_text_pairs`) form one unit, stratified by main
   category, with a fixed seed.
5. ``labels.json``, ``listings.csv``, ``images.csv``, ``summary.json`` and
   ``samples.png`` (a grid of sample photos per category).

The output layout is described in `training.dataset`, which is also its reader.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common.images import ImageError, letterbox, open_image
from common.listing_text import listing_text
from training.dataset import (
    DEFAULT_OUT_DIR,
    IMAGE_COLUMNS,
    LISTING_COLUMNS,
    SPLITS,
    CategoryLabels,
    check_data_dir,
    data_dir_default,
)

DEFAULT_SEED = 42
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.70, 0.15, 0.15)
DEFAULT_SIZE = 512
DEFAULT_WORKERS = 2
#: Prices above this (in the listing's currency) are flagged "absurd": nothing in these
#: 13 second-hand goods categories costs more; the raw data has 1,234,567 and 10,000,000.
DEFAULT_ABSURD_PRICE = 100_000.0
#: Limits for photos we did not take ourselves (a raw phone photo is < 20 MB, < 50 Mpx).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_CURRENCY = "GBP"  # Gumtree UK: a bare number is pounds
JPEG_QUALITY = 95
EXAMPLES = 5  # how many example ids a report lists per reason

CURRENCY_SYMBOLS = {"£": "GBP", "$": "USD", "€": "EUR"}
_PRICE_RE = re.compile(
    r"""^(?P<neg>-)?\s*
        (?P<pre>[£$€]|GBP|USD|EUR)?\s*
        (?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)\s*
        (?P<post>GBP|USD|EUR)?$""",
    re.VERBOSE | re.IGNORECASE,
)
_TITLE_RE = re.compile(r"^(?P<title>.*)\s\|\s+in\s+(?P<location>.+?)\s+\|\s+Gumtree\s*$", re.DOTALL)
_IMAGE_NAME_RE = re.compile(r"^(?P<id>.+?)(?P<resized>_resized)?\.(?:jpe?g|png|webp)$", re.IGNORECASE)


# ============================================================================ listings


@dataclass(frozen=True)
class ParsedPrice:
    """A raw price string turned into a number and an ISO currency code."""

    value: float | None  # None when unparseable
    currency: str  # "" when unparseable
    had_symbol: bool


def parse_price(raw: str, *, default_currency: str = DEFAULT_CURRENCY) -> ParsedPrice:
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


def price_flag(value: float | None, *, absurd_price: float) -> str:
    """"" for an ordinary price, else "unparseable", "zero" or "absurd" (negative or huge)."""
    if value is None or np.isnan(value):
        return "unparseable"
    if value == 0:
        return "zero"
    if value < 0 or value > absurd_price:
        return "absurd"
    return ""


def split_title(product_name: str) -> tuple[str, str | None]:
    """"Sofa | in Leeds, West Yorkshire | Gumtree" -> ("Sofa", "Leeds, West Yorkshire").

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
    frame = pd.DataFrame({
        "product_id": raw["id"].str.strip(),
        "product_name": raw["product_name"].str.strip(),
        "category": raw["category"].str.strip(),
        "description": raw["product_description"].str.replace("\r\n", "\n").str.replace("\r", "\n").str.strip(),
        "raw_price": raw["price"].str.strip(),
        "raw_location": raw["location"].str.strip() if "location" in raw else "",
    })
    titles = frame["product_name"].map(split_title)
    frame["title"] = [t for t, _ in titles]
    suffix_location = pd.Series([loc for _, loc in titles], index=frame.index, dtype=object)
    frame["location"] = suffix_location.fillna(frame["raw_location"])

    dropped: list[dict] = []
    keep = pd.Series(True, index=frame.index)
    missing_fields = pd.DataFrame({
        "product_id": frame["product_id"] == "",
        "title": frame["title"] == "",
        "category": frame["category"] == "",
    })
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
        "unparseable_examples": [f"{pid}: {raw!r}" for pid, raw in unparseable.head(EXAMPLES).itertuples(index=False)],
        "zero": int((flags == "zero").sum()),
        "absurd": int((flags == "absurd").sum()),
        "absurd_threshold": absurd_price,
        "absurd_examples": [float(v) for v in frame.loc[flags == "absurd", "price"].sort_values().tail(EXAMPLES)],
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


# ============================================================================ join


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
    rows = pd.DataFrame({"image_id": image_rows["id"].str.strip(), "product_id": image_rows["product_id"].str.strip()})
    report: dict = {"image_rows": int(len(rows))}
    incomplete = (rows["image_id"] == "") | (rows["product_id"] == "")
    duplicate = ~incomplete & rows["image_id"].duplicated(keep="first")
    report["image_rows_incomplete"] = int(incomplete.sum())
    report["image_rows_duplicate_id"] = int(duplicate.sum())
    rows = rows[~incomplete & ~duplicate]

    joined = rows.merge(listings[["product_id", "main_category"]], on="product_id", how="inner", validate="many_to_one")
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


# ============================================================================ photos


@dataclass(frozen=True)
class ImageJob:
    """One photo to clean; plain fields so it pickles cheaply to a worker process."""

    image_id: str
    source: str
    target: str
    size: int
    max_bytes: int | None
    max_pixels: int | None
    recentre: bool = True


#: A column/row whose brightest channel stays at or below this counts as padding
#: (pure black plus JPEG ringing).
PADDING_THRESHOLD = 24
#: Bands narrower than this are left alone (dark photo edges, not padding).
MIN_PADDING = 4


def recentre_letterbox(img: Image.Image, *, threshold: int = PADDING_THRESHOLD) -> tuple[Image.Image, bool]:
    """Centre a square photo that was letterboxed into its top-left corner.

    Per axis: when the trailing (right/bottom) band is padding-dark and at least
    `MIN_PADDING` wide while the leading edge is not dark, the content is shifted
    so the band is split evenly on both sides.  Only near-black pixels are moved
    out or replaced by black, so a misread dark photo loses nothing visible.
    Returns the (possibly new) image and whether it changed.
    """
    rgb = np.asarray(img.convert("RGB"))
    pixels = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])  # ndarray.max(axis=2) is ~15x slower
    width, height = img.size
    offsets = []
    for profile, length in ((pixels.max(axis=0), width), (pixels.max(axis=1), height)):
        bright = np.flatnonzero(profile > threshold)
        if bright.size == 0 or bright[0] > 0:
            offsets.append((0, length))  # all dark, or a leading band: not top-left padding
            continue
        extent = int(bright[-1]) + 1
        band = length - extent
        offsets.append(((band // 2, extent) if band >= MIN_PADDING else (0, length)))
    (dx, content_w), (dy, content_h) = offsets
    if dx == 0 and dy == 0:
        return img, False
    canvas = Image.new("RGB", img.size, (0, 0, 0))
    canvas.paste(img.convert("RGB").crop((0, 0, content_w, content_h)), (dx, dy))
    return canvas, True


@dataclass(frozen=True)
class ImageOutcome:
    image_id: str
    status: str  # "copied" | "written" | "skipped" | "error"
    sha256: str = ""
    error: str = ""
    recentred: bool = False
    #: `photo_fingerprint` of the cleaned photo (empty on error).
    fingerprint: bytes = b""


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (streamed)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def clean_image(job: ImageJob) -> ImageOutcome:
    """Hash, validate and letterbox one photo.  Never raises for a bad photo: the
    error is returned so the caller can list it.  Idempotent: an existing target
    that is newer than the source and has the right size/format is kept.

    The output is a square of side ``min(job.size, longest side of the source)``: a
    photo is never scaled up here (the model's own transform does whatever resizing
    its input needs), so the 320 px photos stay 320 px.  Any square source
    letterboxed into its top-left corner is re-centred, whatever its size."""
    try:
        size = os.path.getsize(job.source)
        if job.max_bytes is not None and size > job.max_bytes:
            raise ImageError(f"file is {size:,} bytes, over the limit of {job.max_bytes:,}")
        with open(job.source, "rb") as fh:
            data = fh.read()
    except (OSError, ImageError) as exc:
        return ImageOutcome(job.image_id, "error", error=str(exc))
    digest = hashlib.sha256(data).hexdigest()
    if _target_is_current(job):
        return _finished(job, "skipped", digest, recentred=False)
    try:
        img = open_image(data, max_bytes=job.max_bytes, max_pixels=job.max_pixels)
        side = output_side(img.size, job.size)
        recentred = False
        if img.width == img.height and job.recentre:
            img, recentred = recentre_letterbox(img)
        copy_as_is = not recentred and _is_clean_already(data, side)
        tmp = f"{job.target}.tmp{os.getpid()}"
        if copy_as_is:
            with open(tmp, "wb") as fh:
                fh.write(data)
        else:
            letterbox(img, side).save(tmp, "JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, job.target)
        return _finished(job, "copied" if copy_as_is else "written", digest, recentred=recentred)
    except ImageError as exc:
        _remove_quietly(job.target)  # a stale output of an older, valid version
        return ImageOutcome(job.image_id, "error", digest, str(exc))
    except Exception as exc:  # noqa: BLE001 - one odd photo must not stop the run
        _remove_quietly(job.target)
        return ImageOutcome(job.image_id, "error", digest, f"{type(exc).__name__}: {exc}")


def output_side(source_size: tuple[int, int], max_side: int) -> int:
    """The cleaned photo's square side: the source's longest side, capped at `max_side`."""
    return max(1, min(max_side, max(source_size)))


def _finished(job: ImageJob, status: str, digest: str, *, recentred: bool) -> ImageOutcome:
    """The outcome of a photo whose target is written, with the target's fingerprint."""
    return ImageOutcome(job.image_id, status, digest, recentred=recentred, fingerprint=photo_fingerprint(job.target))


def _is_clean_already(data: bytes, size: int) -> bool:
    """A size x size RGB baseline JPEG without EXIF needs no re-encoding."""
    with Image.open(io.BytesIO(data)) as img:
        return img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size) and "exif" not in img.info


def _target_is_current(job: ImageJob) -> bool:
    try:
        if os.path.getmtime(job.target) < os.path.getmtime(job.source):
            return False
        with Image.open(job.source) as source:
            side = output_side(source.size, job.size)
        with Image.open(job.target) as img:
            return img.format == "JPEG" and img.mode == "RGB" and img.size == (side, side)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def clean_images(jobs: Sequence[ImageJob], *, workers: int, progress: bool) -> list[ImageOutcome]:
    """Run `clean_image` over all jobs on `workers` processes with a tqdm bar."""
    bar = dict(total=len(jobs), desc="photos", unit="img", disable=not progress, file=sys.stderr)
    if workers <= 1 or len(jobs) < 2:
        outcomes = [clean_image(job) for job in tqdm(jobs, **bar)]
    else:
        chunksize = max(1, min(32, len(jobs) // (workers * 8)))
        with multiprocessing.get_context().Pool(workers) as pool:
            outcomes = list(tqdm(pool.imap_unordered(clean_image, jobs, chunksize=chunksize), **bar))
    return sorted(outcomes, key=lambda o: o.image_id)


# ============================================================================ near-duplicates

#: Side of the grey thumbnail a photo's fingerprint is (and its perceptual hash is computed from).
FINGERPRINT_SIDE = 32
#: Two photos are near-duplicates when their 63-bit perceptual hashes differ in at most this many
#: bits *and* their thumbnails correlate at least `NEAR_DUPLICATE_CORRELATION`.  Measured on the
#: shared data against the manifest's source-photo ids (git blob SHA-1 of the 512 px original, so
#: a photo kept at 512 px and again re-encoded at 320 px shares one): all 251 pairs of the same
#: source photo are within 8 bits (they correlate >= 0.976), but so are 290 pairs of different
#: sources, mostly unrelated photos whose black letterbox bands dominate the hash; the correlation
#: and grey-level checks keep the 137 of those that are really the same shot re-uploaded or a
#: burst of it, and drop the rest, which would otherwise chain unrelated listings together.
NEAR_DUPLICATE_HAMMING = 8
NEAR_DUPLICATE_CORRELATION = 0.95
#: ... and their grey levels differ by at most this much on average (0-255 scale).  Correlation
#: ignores brightness and contrast, so without this two plain shapes of the same outline but
#: different colour would count as one photo; same-source pairs differ by at most 6.5 here.
NEAR_DUPLICATE_MEAN_DIFFERENCE = 16.0
#: Listings whose texts (TF-IDF of words and word pairs) have at least this cosine are re-posts
#: of one another and are kept in one split.  At 0.90 one shop's boilerplate signature links 29
#: different appliances; at 0.95 the largest such group is 8 copies of the same advert.
NEAR_DUPLICATE_TEXT_COSINE = 0.95
_PAIR_CHUNK = 1024  # rows of the all-pairs comparisons computed at once


def photo_fingerprint(path: Path | str, side: int = FINGERPRINT_SIDE) -> bytes:
    """A side x side grey thumbnail of a photo, as bytes: what near-duplicate detection compares.

    JPEGs are decoded at reduced scale (`Image.draft`), which makes this a few milliseconds.
    """
    with Image.open(path) as img:
        img.draft("L", (2 * side, 2 * side))
        grey = img.convert("L").resize((side, side), Image.Resampling.BOX)
    return grey.tobytes()


def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix (rows are frequencies)."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return matrix


def perceptual_hashes(thumbs: np.ndarray) -> np.ndarray:
    """pHash of grey thumbnails (n, side, side) -> (n, 63) bool: the signs of the 8x8 lowest DCT
    frequencies (the constant one left out) against their median."""
    side = thumbs.shape[1]
    dct = _dct_matrix(side)
    low = (dct[:8] @ thumbs.astype(np.float64) @ dct[:8].T).reshape(len(thumbs), 64)[:, 1:]
    return low > np.median(low, axis=1, keepdims=True)


def _as_uint64(bits: np.ndarray) -> np.ndarray:
    """(n, <=64) bool -> (n,) uint64, one bit per column."""
    padded = np.zeros((len(bits), 64), dtype=bool)
    padded[:, :bits.shape[1]] = bits
    return np.packbits(padded, axis=1).view(">u8").ravel().astype(np.uint64)


def near_duplicate_photo_pairs(
    thumbs: np.ndarray,
    *,
    max_hamming: int = NEAR_DUPLICATE_HAMMING,
    min_correlation: float = NEAR_DUPLICATE_CORRELATION,
    max_mean_difference: float = NEAR_DUPLICATE_MEAN_DIFFERENCE,
) -> np.ndarray:
    """Index pairs (i < j) of near-duplicate photos among grey thumbnails (n, side, side).

    Robust to re-encoding and resizing: candidates are pairs whose perceptual hashes differ in at
    most `max_hamming` bits (counted for all pairs, `_PAIR_CHUNK` rows at a time, as the popcount
    of XORed 64-bit words), confirmed by the Pearson correlation of their thumbnails and their
    mean absolute grey-level difference.
    """
    n = len(thumbs)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    hashes = _as_uint64(perceptual_hashes(thumbs))
    grey = thumbs.reshape(n, -1).astype(np.float64)
    flat = grey - grey.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(flat, axis=1)
    flat /= np.where(norms > 0, norms, 1.0)[:, None]  # a flat grey photo correlates 0 with all
    found = []
    for start in range(0, n, _PAIR_CHUNK):
        hamming = np.bitwise_count(hashes[start:start + _PAIR_CHUNK, None] ^ hashes[None, :])
        rows, cols = np.nonzero(hamming <= max_hamming)
        rows = rows + start
        keep = rows < cols
        rows, cols = rows[keep], cols[keep]
        correlation = np.einsum("ij,ij->i", flat[rows], flat[cols])
        difference = np.abs(grey[rows] - grey[cols]).mean(axis=1)
        confirmed = (correlation >= min_correlation) & (difference <= max_mean_difference)
        found.append(np.stack([rows[confirmed], cols[confirmed]], axis=1))
    return np.concatenate(found).astype(np.int64)


def near_duplicate_text_pairs(texts: Sequence[str], *, min_cosine: float = NEAR_DUPLICATE_TEXT_COSINE) -> np.ndarray:
    """Index pairs (i < j, sorted) of texts whose TF-IDF (words and word pairs) cosine is >= `min_cosine`."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    nonempty = [i for i, t in enumerate(texts) if t.strip()]
    if len(nonempty) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    vectors = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform([texts[i] for i in nonempty])
    index = np.asarray(nonempty)
    found = []
    for start in range(0, len(nonempty), _PAIR_CHUNK):
        similar = (vectors[start:start + _PAIR_CHUNK] @ vectors.T).tocoo()
        rows = similar.row + start
        keep = (rows < similar.col) & (similar.data >= min_cosine - 1e-9)
        found.append(np.stack([index[rows[keep]], index[similar.col[keep]]], axis=1))
    pairs = np.concatenate(found).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def near_duplicate_text_links(listings: pd.DataFrame, *, min_cosine: float = NEAR_DUPLICATE_TEXT_COSINE) -> list[tuple[str, str]]:
    """Pairs of product ids whose listing texts (`common.text.listing_text`) are near-identical."""
    texts = [listing_text(t, d) for t, d in zip(listings["title"], listings["description"])]
    ids = listings["product_id"].tolist()
    return [(ids[i], ids[j]) for i, j in near_duplicate_text_pairs(texts, min_cosine=min_cosine)]


def photo_groups(images: pd.DataFrame, pairs: np.ndarray) -> pd.Series:
    """Give every photo the id of its near-duplicate group: photos with the same sha256 or joined
    by `pairs` (row positions in `images`), named by the smallest image_id in the group."""
    uf = _UnionFind()
    image_ids = images["image_id"].tolist()
    for image_id in image_ids:
        uf.find(image_id)
    for _, ids in images.groupby("sha256")["image_id"]:
        first, *rest = ids.tolist()
        for other in rest:
            uf.union(first, other)
    for i, j in pairs:
        uf.union(image_ids[i], image_ids[j])
    return _name_groups(image_ids, uf, images.index)


def _name_groups(keys: list, uf: "_UnionFind", index: pd.Index) -> pd.Series:
    """Each key -> the smallest key of its union-find group (independent of row order)."""
    members: dict = defaultdict(list)
    for key in keys:
        members[uf.find(key)].append(key)
    name = {key: min(group) for group in members.values() for key in group}
    return pd.Series([name[k] for k in keys], index=index)


# ============================================================================ splits


class _UnionFind:
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


def split_units(images: pd.DataFrame, links: Iterable[tuple[str, str]] = ()) -> pd.Series:
    """Give every image the id of its split unit: listings connected by a shared photo (the same
    ``photo_group`` when the frame has one, else the same sha256) or by one of `links` (pairs of
    product ids, e.g. re-posts with near-identical text) form one unit.  The unit id is the
    smallest product_id in it, so it does not depend on row order."""
    uf = _UnionFind()
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
    return _name_groups(products, uf, images.index)


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
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1, got {fractions}")
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
        leaks["near_duplicate_groups_in_several_splits"] = int((images.groupby("photo_group")["split"].nunique() > 1).sum())
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


# ============================================================================ outputs


def split_counts(images: pd.DataFrame, categories: Sequence[str]) -> dict:
    """Images and listings per split, and images per category and split."""
    per_category = (
        images.groupby(["main_category", "split"]).size().unstack(fill_value=0)
        .reindex(index=list(categories), columns=list(SPLITS), fill_value=0)
    )
    return {
        "images": {s: int((images["split"] == s).sum()) for s in SPLITS},
        "listings": {s: int(images.loc[images["split"] == s, "product_id"].nunique()) for s in SPLITS},
        "images_per_category": {c: {s: int(per_category.at[c, s]) for s in SPLITS} for c in categories},
    }


def save_samples_grid(images: pd.DataFrame, out_dir: Path, categories: Sequence[str], *, per_category: int, seed: int) -> Path:
    """A picture with one row of cleaned sample photos per main category."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = out_dir / "samples.png"
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


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write atomically so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    frame.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def _write_json(payload: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ============================================================================ pipeline


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
) -> dict:
    """Run the whole preparation and return the summary (also written to summary.json).

    `images_dir` defaults to ``data_dir/images``.  `recentre` moves the content of
    photos letterboxed into the top-left corner to the centre (see module doc).  Raises `DataNotFoundError` for a
    missing data folder and `AssertionError` if the splits would leak.
    """
    started = time.perf_counter()
    data_dir = Path(data_dir)
    out_dir = Path(out_dir)
    images_dir = Path(images_dir) if images_dir is not None else data_dir / "images"
    check_data_dir(data_dir, images_dir=images_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)

    raw, parse_errors = read_table(data_dir / "Products.csv", ["id", "product_name", "category", "product_description", "price"])
    listings, listing_report = clean_listings(raw, absurd_price=absurd_price)
    labels = CategoryLabels.from_names(listings["main_category"])

    image_rows, image_parse_errors = read_table(data_dir / "Images.csv", ["id", "product_id"])
    files, files_report = find_image_files(images_dir)
    joined, join_report = join_images(image_rows, listings, files)

    jobs = [
        ImageJob(row.image_id, row.source, str(out_dir / "images" / f"{row.image_id}.jpg"), size, max_bytes, max_pixels, recentre)
        for row in joined.itertuples(index=False)
    ]
    outcomes = clean_images(jobs, workers=workers, progress=progress)
    outcome_of = {o.image_id: o for o in outcomes}
    failed = [o for o in outcomes if o.status == "error"]
    source_of = dict(zip(joined["image_id"], joined["source"]))

    images = joined[~joined["image_id"].isin({o.image_id for o in failed})].reset_index(drop=True)
    images["sha256"] = images["image_id"].map(lambda i: outcome_of[i].sha256)
    images["label"] = images["main_category"].map(labels.encode).astype(int)
    images["path"] = "images/" + images["image_id"] + ".jpg"
    thumbs = np.stack([
        np.frombuffer(outcome_of[i].fingerprint, dtype=np.uint8).reshape(FINGERPRINT_SIDE, FINGERPRINT_SIDE)
        for i in images["image_id"]
    ]) if len(images) else np.zeros((0, FINGERPRINT_SIDE, FINGERPRINT_SIDE), dtype=np.uint8)
    photo_pairs = near_duplicate_photo_pairs(thumbs)
    images["photo_group"] = photo_groups(images, photo_pairs)
    text_links = near_duplicate_text_links(listings[listings["product_id"].isin(set(images["product_id"]))])
    images["split"] = assign_splits(images, fractions=fractions, seed=seed, links=text_links) if len(images) else []
    assert_no_leak(images)
    units = split_units(images, text_links) if len(images) else pd.Series(dtype=str)
    near_duplicates = {
        "photo_pairs": int(len(photo_pairs)),
        "photo_pairs_not_byte_identical": int(
            sum(images.at[i, "sha256"] != images.at[j, "sha256"] for i, j in photo_pairs)),
        **(duplicate_report(images, "photo_group") if len(images) else {}),
        "text_pairs": len(text_links),
        "largest_split_unit_listings": int(images.groupby(units)["product_id"].nunique().max()) if len(images) else 0,
        "max_hamming": NEAR_DUPLICATE_HAMMING,
        "min_correlation": NEAR_DUPLICATE_CORRELATION,
        "min_text_cosine": NEAR_DUPLICATE_TEXT_COSINE,
    }
    images = images[list(IMAGE_COLUMNS)].sort_values("image_id").reset_index(drop=True)

    labels.save(out_dir / "labels.json")
    _write_csv(listings, out_dir / "listings.csv")
    _write_csv(images, out_dir / "images.csv")
    statuses = Counter(o.status for o in outcomes)
    referenced = set(images["path"].str.removeprefix("images/"))
    stale = sum(1 for name in os.listdir(out_dir / "images") if name.endswith(".jpg") and name not in referenced)

    summary = {
        "data_dir": str(data_dir),
        "images_dir": str(images_dir),
        "out_dir": str(out_dir),
        "listings": {
            "rows_read": int(len(raw)),
            "parse_errors": len(parse_errors),
            "parse_error_examples": parse_errors[:EXAMPLES],
            "dropped": listing_report["dropped"],
            "kept": int(len(listings)),
            "per_main_category": {c: int(n) for c, n in listings["main_category"].value_counts().items()},
            "distinct_category_paths": listing_report["distinct_category_paths"],
            "titles_without_gumtree_suffix": listing_report["titles_without_gumtree_suffix"],
            "location_differs_from_location_column": listing_report["location_differs_from_location_column"],
        },
        "prices": listing_report["prices"],
        "join": {**join_report, "image_table_parse_errors": len(image_parse_errors), **files_report},
        "photos": {
            "processed": len(outcomes),
            "copied_unchanged": statuses["copied"],
            "reencoded": statuses["written"],
            "recentred": sum(o.recentred for o in outcomes),
            "skipped_already_done": statuses["skipped"],
            "failed": len(failed),
            "failed_list": [{"image_id": o.image_id, "file": source_of[o.image_id], "error": o.error} for o in failed],
            "usable": int(len(images)),
            "stale_files_in_out_images": stale,
        },
        "duplicates": duplicate_report(images) if len(images) else {},
        "near_duplicates": near_duplicates,
        "splits": {
            "seed": seed,
            "fractions": list(fractions),
            "units": int(units.nunique()),
            "listings_merged_by_shared_photos_or_texts": int(images["product_id"].nunique() - units.nunique()) if len(images) else 0,
            **split_counts(images, labels.categories),
            **split_leaks(images),
        },
        "labels": list(labels.categories),
        "seconds": None,
    }
    if len(images):
        summary["samples_png"] = str(save_samples_grid(images, out_dir, labels.categories, per_category=samples_per_category, seed=seed))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    _write_json(summary, out_dir / "summary.json")
    return summary


def format_summary(summary: dict) -> str:
    """The summary as a few readable lines for the terminal."""
    lst, prices, join, photos, splits = (summary[k] for k in ("listings", "prices", "join", "photos", "splits"))
    lines = [
        f"listings: {lst['rows_read']:,} rows read, {lst['parse_errors']} parse errors, {lst['kept']:,} kept",
    ]
    for drop in lst["dropped"]:
        lines.append(f"  dropped {drop['count']:,}: {drop['reason']} (e.g. {', '.join(drop['examples'][:3])})")
    lines.append(f"  {len(lst['per_main_category'])} main categories, {lst['distinct_category_paths']} category paths")
    for category, n in lst["per_main_category"].items():
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
        f"photos: {photos['usable']:,} usable from {photos['processed']:,} of "
        f"{join['listings_with_image_files']:,} listings "
        f"({photos['copied_unchanged']:,} copied, {photos['reencoded']:,} re-encoded of which "
        f"{photos['recentred']:,} re-centred, "
        f"{photos['skipped_already_done']:,} already done, {photos['failed']} failed)",
    ]
    for failure in photos["failed_list"][:10]:
        lines.append(f"  failed {failure['image_id']}: {failure['error']}")
    dup = summary["duplicates"]
    if dup:
        lines.append(
            f"duplicates: {dup['groups']} groups of byte-identical photos ({dup['extra_copies']} extra copies), "
            f"{dup['groups_spanning_listings']} spanning several listings"
        )
    near = summary.get("near_duplicates") or {}
    if near:
        lines.append(
            f"near-duplicates: {near['photo_pairs']} photo pairs ({near['photo_pairs_not_byte_identical']} not byte-identical) "
            f"in {near['groups']} groups, {near['groups_spanning_listings']} spanning several listings; "
            f"{near['text_pairs']} listing pairs with near-identical text; largest split unit "
            f"{near['largest_split_unit_listings']} listings"
        )
    lines.append(
        f"splits (seed {splits['seed']}, {splits['units']:,} units, {splits['listings_merged_by_shared_photos_or_texts']} listings "
        f"merged by shared photos or texts): images {splits['images']}, listings {splits['listings']}; leaks: "
        f"{splits['listings_in_several_splits']} listings, {splits['photos_in_several_splits']} photos, "
        f"{splits.get('near_duplicate_groups_in_several_splits', 0)} near-duplicate groups"
    )
    lines.append(f"  {'category':<34} {'train':>6} {'valid':>6} {'test':>6}")
    for category, counts in splits["images_per_category"].items():
        lines.append(f"  {category:<34} " + " ".join(f"{counts[s]:>6,}" for s in SPLITS))
    lines.append(f"wrote {summary['out_dir']} in {summary['seconds']} s")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="raw data folder (default: env DATA or ../shared/data/marketplace)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output folder (default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--images", type=Path, default=None, help="photo folder (default: DATA/images)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="square output size in pixels")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="photo-cleaning processes")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    parser.add_argument("--absurd-price", type=float, default=DEFAULT_ABSURD_PRICE, help="flag prices above this")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="skip photos larger than this")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip photos with more pixels")
    parser.add_argument("--keep-alignment", action="store_true", help="do not re-centre top-left letterboxed photos")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        data_dir = args.data if args.data is not None else data_dir_default()
        summary = prepare(
            data_dir, args.out, images_dir=args.images, size=args.size, workers=args.workers, seed=args.seed,
            absurd_price=args.absurd_price, max_bytes=args.max_bytes, max_pixels=args.max_pixels,
            recentre=not args.keep_alignment, progress=not args.no_progress,
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
