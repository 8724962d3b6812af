"""A tiny prepared-data folder in the layout of `training.prepare` (see `common.prepared_data`):
a few categories of synthetic photos that a model can tell apart (each category has its own colour
and shape), listings of two photos, and train/valid/test splits grouped by listing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from common.prepared_data import CategoryLabels
from common.prepared_data.frames import write_prepared

CATEGORIES = ("Appliances", "Baby & Kids Stuff", "Computers & Software")
COLOURS = ((200, 40, 40), (40, 170, 60), (50, 70, 210))


def _photo(category: int, listing: int, photo: int, size: int) -> Image.Image:
    rng = np.random.default_rng(1000 * category + 10 * listing + photo)
    base = np.asarray(COLOURS[category], dtype=float)
    pixels = np.clip(base * rng.uniform(0.7, 1.1) + rng.normal(0, 18, (size, size, 3)), 0, 255)
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    cx, cy = (rng.uniform(0.3, 0.7, 2) * size).astype(int)
    r = int(size * rng.uniform(0.15, 0.25))
    box = (cx - r, cy - r, cx + r, cy + r)
    if category == 0:
        draw.ellipse(box, fill=(250, 250, 250))
    elif category == 1:
        draw.rectangle(box, fill=(20, 20, 20))
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=(240, 220, 30))
    return img


def make_tiny_prepared(
    out: Path, *, listings_per_category: int = 5, photos_per_listing: int = 2, size: int = 96
) -> Path:
    """Write the folder; per category, listings 0-2 are train, 3 valid, 4+ test."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, listings = [], []
    for c, category in enumerate(CATEGORIES):
        for listing in range(listings_per_category):
            product_id = f"p{c}{listing:03d}"
            split = "train" if listing < 3 else "valid" if listing == 3 else "test"
            listings.append(
                {
                    "product_id": product_id,
                    "title": f"item {product_id}",
                    "location": "Leeds",
                    "description": "synthetic",
                    "category": f"{category} / Things",
                    "main_category": category,
                    "price": 10.0,
                    "currency": "GBP",
                    "price_flag": "ok",
                }
            )
            for photo in range(photos_per_listing):
                image_id = f"i{c}{listing:03d}{photo}"
                path = f"images/{image_id}.jpg"
                _photo(c, listing, photo, size).save(out / path, "JPEG", quality=92)
                images.append(
                    {
                        "image_id": image_id,
                        "product_id": product_id,
                        "main_category": category,
                        "label": c,
                        "split": split,
                        "path": path,
                        "sha256": "0" * 64,
                    }
                )
    write_prepared(out, pd.DataFrame(listings), pd.DataFrame(images), CategoryLabels(CATEGORIES))
    return out
