"""Where the marketplace data lives and how training/benchmark code reads the prepared set.

`training.prepare` writes a folder (default ``build/data``) with a fixed layout;
this module is the one reader of that layout, so the training and benchmark code
never parse the CSVs themselves:

    listings.csv  product_id,title,location,description,category,main_category,price,currency,price_flag
    images.csv    image_id,product_id,main_category,label,split,path,sha256
    labels.json   {"version": 1, "categories": [13 names, sorted]}   label i = categories[i]
    images/<image_id>.jpg   cleaned 512x512 RGB photos
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from training.settings import DATA, SHARED_DATA_DIR  # noqa: F401 (SHARED_DATA_DIR: re-exported)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: The course data shipped next to the repository (see its SOURCE.md).
#: Where `python -m training.prepare` writes unless told otherwise.
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "data"

LABELS_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "valid", "test")
LISTING_COLUMNS: tuple[str, ...] = (
    "product_id", "title", "location", "description", "category",
    "main_category", "price", "currency", "price_flag",
)
IMAGE_COLUMNS: tuple[str, ...] = (
    "image_id", "product_id", "main_category", "label", "split", "path", "sha256",
)
#: What a raw data folder must contain (the images folder may be named otherwise, see prepare).
REQUIRED_DATA_FILES: tuple[str, ...] = ("Products.csv", "Images.csv")


class DataNotFoundError(FileNotFoundError):
    """The raw or prepared data folder is missing or incomplete; the message says what is expected."""


def data_dir_default() -> Path:
    """The raw data folder: env ``DATA`` if set, else ``<repo>/../shared/data/marketplace``.

    Raises `DataNotFoundError` naming the expected files when the folder is missing
    or lacks them, so a user with the full photo set knows how to point at theirs.
    """
    path = DATA.from_environment().expanduser()
    check_data_dir(path, origin="env DATA" if os.environ.get(DATA.env) else "the default location")
    return path


def check_data_dir(path: Path, *, origin: str = "--data", images_dir: Path | None = None) -> None:
    """Fail clearly unless `path` holds Products.csv, Images.csv and an images/ folder
    (or `images_dir` exists, when the photos live elsewhere)."""
    missing = [name for name in REQUIRED_DATA_FILES if not (path / name).is_file()]
    if images_dir is not None:
        if not images_dir.is_dir():
            missing.append(f"the photo folder {str(images_dir)!r}")
    elif not (path / "images").is_dir():
        missing.append("images/")
    if path.is_dir() and not missing:
        return
    what = "does not exist" if not path.is_dir() else f"lacks {', '.join(missing)}"
    raise DataNotFoundError(
        f"marketplace data folder {str(path)!r} (from {origin}) {what}. Expected a folder with "
        "Products.csv (listings), Images.csv (image id -> product id) and images/ "
        "(photos named <image_id>.jpg or <image_id>_resized.jpg). "
        "Pass DATA=/path or --data /path."
    )


@dataclass(frozen=True)
class CategoryLabels:
    """Label encoder/decoder for the main categories, stored as JSON (never pickle).

    Categories are kept sorted alphabetically so the mapping is reproducible from the
    data alone: label i is ``categories[i]``.
    """

    categories: tuple[str, ...]

    @classmethod
    def from_names(cls, names: Iterable[str]) -> CategoryLabels:
        """Build from any collection of category names (duplicates collapse)."""
        return cls(tuple(sorted(set(names))))

    def encode(self, name: str) -> int:
        """Category name -> integer label; `KeyError` names the unknown category."""
        try:
            return self.categories.index(name)
        except ValueError:
            raise KeyError(f"unknown main category {name!r}") from None

    def decode(self, label: int) -> str:
        """Integer label -> category name."""
        if not 0 <= int(label) < len(self.categories):
            raise KeyError(f"label {label} out of range 0..{len(self.categories) - 1}")
        return self.categories[int(label)]

    def to_json(self) -> dict:
        return {"version": LABELS_VERSION, "categories": list(self.categories)}

    @classmethod
    def from_json(cls, payload: dict) -> CategoryLabels:
        if payload.get("version") != LABELS_VERSION:
            raise ValueError(f"labels.json version {payload.get('version')!r}, expected {LABELS_VERSION}")
        categories = tuple(payload["categories"])
        if list(categories) != sorted(set(categories)):
            raise ValueError("labels.json categories must be unique and sorted")
        return cls(categories)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> CategoryLabels:
        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))


class PreparedData(NamedTuple):
    """What `load_prepared` returns; unpacks as ``listings, images, categories``."""

    listings: pd.DataFrame
    images: pd.DataFrame
    categories: list[str]


def load_prepared(out_dir: Path | str = DEFAULT_OUT_DIR, *, check_files: bool = False) -> PreparedData:
    """Read a folder written by `training.prepare`.

    Ids and text stay strings (a title "NA" is not a missing value); ``price`` is
    float with NaN where the raw price was unparseable; ``label`` is int.
    With ``check_files`` every image path is also checked to exist.
    """
    out = Path(out_dir)
    needed = [out / "listings.csv", out / "images.csv", out / "labels.json"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"prepared data folder {str(out)!r} lacks {', '.join(missing)}; "
            "run `python -m training.prepare --data DIR --out DIR` first"
        )
    text_columns = [c for c in LISTING_COLUMNS if c != "price"]
    listings = pd.read_csv(
        out / "listings.csv",
        dtype={c: str for c in text_columns} | {"price": float},
        keep_default_na=False,
        na_values={"price": [""]},
    )
    images = pd.read_csv(
        out / "images.csv",
        dtype={c: str for c in IMAGE_COLUMNS if c != "label"} | {"label": int},
        keep_default_na=False,
    )
    _require_columns(listings, LISTING_COLUMNS, "listings.csv")
    _require_columns(images, IMAGE_COLUMNS, "images.csv")
    labels = CategoryLabels.load(out / "labels.json")
    if check_files:
        absent = [p for p in images["path"] if not (out / p).is_file()]
        if absent:
            raise DataNotFoundError(f"{len(absent)} image files listed in images.csv are missing, e.g. {absent[:3]}")
    return PreparedData(listings, images, list(labels.categories))


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise ValueError(f"{name} lacks columns {absent}; re-run training.prepare")
