"""Reading what the training pipeline produces: embeddings and per-image attributes.

Embedding formats (all plain data, never pickle):
    ``<name>_embeddings.npy`` + ``<name>_ids.json``  float32 N x D and the list of N ids (fast)
    ``<name>_embeddings.npz``                         arrays ``ids`` (strings) and ``embeddings``
    ``<name>_embeddings.json``                        {id: [floats]} - the baseline project's format
A directory is searched for these (also in its ``embeddings/`` subdirectory), preferring .npy.

Attributes: a CSV with columns ``id, listing_id, category, price, location`` (one row per image),
or the prepared data directory (``images.csv`` joined with ``listings.csv`` on ``product_id``),
which ``attributes_from_prepared`` turns into the same mapping.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.prepared_data import IMAGES_FILE, LISTINGS_FILE, read_rows
from common.prices import price_value
from services.indexer.attributes import Attributes

log = logging.getLogger(__name__)

ATTRIBUTE_COLUMNS = ("id", "listing_id", "category", "price", "location")


@dataclass(frozen=True)
class Embeddings:
    ids: list[str]
    vectors: np.ndarray  # float32 (n, d)

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or len(self.ids) != len(self.vectors):
            raise ValueError(f"{len(self.ids)} ids for a {self.vectors.shape} embedding array")
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("embedding ids are not unique")


def find_embeddings(path: Path, name: str = "image") -> Path:
    """The embeddings file for collection ``name`` in ``path`` (a file is returned as is)."""
    if path.is_file():
        return path
    for folder in (path, path / "embeddings"):
        for suffix in (".npy", ".npz", ".json"):
            candidate = folder / f"{name}_embeddings{suffix}"
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"no {name}_embeddings.npy/.npz/.json in {path} or {path / 'embeddings'}")


def load_embeddings(path: Path, name: str = "image", ids_path: Path | None = None) -> Embeddings:
    """Load embeddings from a file or artefact directory in any of the supported formats."""
    file = find_embeddings(Path(path), name)
    if file.suffix == ".npy":
        vectors = np.load(file, allow_pickle=False)
        ids_file = ids_path or _ids_beside(file)
        ids = json.loads(ids_file.read_text(encoding="utf-8"))
    elif file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            key = "embeddings" if "embeddings" in data.files else "vectors"
            vectors = data[key]
            ids = [str(i) for i in data["ids"].tolist()]
    elif file.suffix == ".json":
        mapping = json.loads(file.read_text(encoding="utf-8"))
        if not isinstance(mapping, dict):
            raise ValueError(f"{file}: expected a JSON object of id -> vector")
        ids = list(mapping)
        vectors = np.asarray([mapping[i] for i in ids], dtype=np.float32) if ids else np.zeros((0, 0))
    else:
        raise ValueError(f"{file}: unsupported embeddings format (use .npy + ids .json, .npz or .json)")
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f"ids for {file} must be a JSON list of strings")
    return Embeddings([str(i) for i in ids], np.ascontiguousarray(vectors, dtype=np.float32))


def _ids_beside(file: Path) -> Path:
    candidates = [
        file.with_name(file.name.replace("_embeddings.npy", "_ids.json")),
        file.with_name(file.stem + "_ids.json"),
        file.with_name("ids.json"),
    ]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"no ids file for {file} (looked for {', '.join(c.name for c in candidates)})")


def load_attributes_csv(path: Path) -> dict[str, Attributes]:
    """id -> Attributes from a CSV with columns id, listing_id, category, price, location."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("id",) if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(ATTRIBUTE_COLUMNS)}"
            )
        return {
            row["id"]: Attributes(
                row.get("listing_id") or "",
                row.get("category") or "",
                price_value(row.get("price")),
                row.get("location") or "",
            )
            for row in reader
        }


def write_attributes_csv(attributes: dict[str, Attributes], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(ATTRIBUTE_COLUMNS)
        for item_id, a in attributes.items():
            writer.writerow(
                [item_id, a.listing_id, a.category, "" if a.price is None else a.price, a.location]
            )


def attributes_from_prepared(prepared_dir: Path) -> dict[str, Attributes]:
    """Per-image attributes from the prepared data (`common.prepared_data`): images.csv
    (image_id, product_id, main_category) joined with listings.csv (product_id, price, location)."""
    prepared_dir = Path(prepared_dir)
    listings = {
        row["product_id"].strip(): row
        for row in read_rows(prepared_dir, LISTINGS_FILE, required=("product_id", "price", "location"))
    }
    attributes: dict[str, Attributes] = {}
    unmatched = 0
    for row in read_rows(prepared_dir, IMAGES_FILE, required=("image_id", "product_id", "main_category")):
        product_id = row["product_id"].strip()
        listing = listings.get(product_id)
        unmatched += listing is None
        listing = listing or {}
        attributes[row["image_id"].strip()] = Attributes(
            listing_id=product_id,
            category=row["main_category"].strip() or listing.get("main_category", "").strip(),
            price=price_value(listing.get("price", "").strip() or None),
            location=listing.get("location", "").strip(),
        )
    if unmatched:
        log.warning("%d image(s) in %s have no listing in %s", unmatched, prepared_dir, LISTINGS_FILE)
    return attributes
