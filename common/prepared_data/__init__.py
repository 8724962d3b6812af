"""The prepared data set: the one declaration of its files and columns, its reader and its writer.

`python -m training.prepare` writes a folder (default ``build/data``) with this layout; training,
the benchmarks, the gateway's catalogue loader and the indexer's attribute loader all read it
through this module, so nobody re-declares a column or a file name::

    listings.csv  product_id,title,location,description,category,main_category,price,currency,price_flag
    images.csv    image_id,product_id,main_category,label,split,path,sha256
    labels.json   {"version": 1, "categories": [names, sorted]}   label i = categories[i]
    images/<image_id>.jpg   cleaned square RGB photos (``path`` is relative to the folder)
    summary.json  what preparation kept and dropped, and why
    samples.png   a grid of sample photos per main category

Two readers over the same declaration: `read_rows` here (plain dicts from the standard library's
csv module, for the services, whose images carry no pandas) and `common.prepared_data.frames`
(typed pandas frames: `load_prepared`, and the writers `write_prepared` and `write_summary`, for
training, the benchmarks and the demo).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

LISTINGS_FILE = "listings.csv"
IMAGES_FILE = "images.csv"
LABELS_FILE = "labels.json"
IMAGES_DIR = "images"
SUMMARY_FILE = "summary.json"
SAMPLES_FILE = "samples.png"

LABELS_VERSION = 1
SPLITS: tuple[str, ...] = ("train", "valid", "test")
LISTING_COLUMNS: tuple[str, ...] = (
    "product_id",
    "title",
    "location",
    "description",
    "category",
    "main_category",
    "price",
    "currency",
    "price_flag",
)
IMAGE_COLUMNS: tuple[str, ...] = (
    "image_id",
    "product_id",
    "main_category",
    "label",
    "split",
    "path",
    "sha256",
)
#: Price flags that make a listing's price unknown to the services (see `common.prices.price_flag`).
UNUSABLE_PRICE_FLAGS = frozenset({"unparseable", "absurd"})


class DataNotFoundError(FileNotFoundError):
    """The raw or prepared data folder is missing or incomplete; the message says what is expected."""


def image_path(image_id: str) -> str:
    """Where a cleaned photo lives, relative to the prepared folder (the ``path`` column)."""
    return f"{IMAGES_DIR}/{image_id}.jpg"


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


def read_rows(out_dir: Path | str, file: str, *, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows of ``listings.csv`` or ``images.csv`` as strings (no pandas), after checking that the
    file exists and has the `required` columns; columns a row lacks read as ""."""
    out = Path(out_dir)
    _require_files(out, (file,))
    with open(out / file, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        _require_columns(list(reader.fieldnames or []), required, str(out / file))
        return [{k: v or "" for k, v in row.items()} for row in reader]


def _require_files(out: Path, names: Sequence[str]) -> None:
    missing = [name for name in names if not (out / name).is_file()]
    if missing:
        raise DataNotFoundError(
            f"prepared data folder {str(out)!r} lacks {', '.join(missing)}; "
            "run `python -m training.prepare --data DIR --out DIR` first"
        )


def _require_columns(found: Sequence[str], columns: Sequence[str], name: str) -> None:
    absent = [c for c in columns if c not in found]
    if absent:
        raise ValueError(f"{name} lacks columns {absent}; found {list(found)}; re-run training.prepare")
