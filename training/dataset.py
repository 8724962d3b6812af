"""Where the marketplace data lives, and the prepared photos as training sees them.

The prepared data set itself (files, columns, reader, writer) is declared in
`common.prepared_data`; this module adds what only training needs: the raw data folder
(`data_dir_default`, `check_data_dir`) and `TrainingPhotos`, the photos with their labels,
splits and content digests.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.files import sha256_file
from common.prepared_data import DataNotFoundError
from common.prepared_data.frames import load_prepared
from training.settings import DATA, SHARED_DATA_DIR  # noqa: F401 (SHARED_DATA_DIR: re-exported)

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Where `python -m training.prepare` writes unless told otherwise.
DEFAULT_OUT_DIR = REPO_ROOT / "build" / "data"

#: What a raw data folder must contain (the images folder may be named otherwise, see prepare).
REQUIRED_DATA_FILES: tuple[str, ...] = ("Products.csv", "Images.csv")


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


@dataclass
class TrainingPhotos:
    """The prepared photos with what training needs: absolute file, cache key, label, split."""

    data_dir: Path
    images: pd.DataFrame
    categories: list[str]
    fingerprint: str

    @property
    def files(self) -> list[Path]:
        return [self.data_dir / p for p in self.images["path"]]

    @property
    def keys(self) -> list[str]:
        return self.images["key"].tolist()

    @property
    def labels(self) -> np.ndarray:
        return self.images["label"].to_numpy(dtype=np.int64)

    @property
    def splits(self) -> np.ndarray:
        return self.images["split"].to_numpy()

    @property
    def listing_ids(self) -> np.ndarray:
        return self.images["product_id"].to_numpy()

    def mask(self, *splits: str) -> np.ndarray:
        return np.isin(self.images["split"].to_numpy(), splits)


def load_training_photos(data_dir: Path | str) -> TrainingPhotos:
    """Read a prepared folder and hash every photo (the feature-cache key and the data fingerprint)."""
    data_dir = Path(data_dir)
    _, images, categories = load_prepared(data_dir, check_files=True)
    images = images.sort_values("image_id").reset_index(drop=True)
    images["key"] = [sha256_file(data_dir / p) for p in images["path"]]
    digest = hashlib.sha256(json.dumps(categories).encode())
    for row in images[["image_id", "product_id", "label", "split", "key"]].itertuples(index=False):
        digest.update("|".join(map(str, row)).encode() + b"\n")
    return TrainingPhotos(data_dir, images, list(categories), digest.hexdigest())
