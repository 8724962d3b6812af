"""Real photos for tests: marketplace listing photos when the shared data is there, otherwise
scikit-image's sample photographs; plus helpers to encode them in the formats uploads come in."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from common.config import REPO_ROOT

MARKETPLACE_IMAGES = REPO_ROOT.parent / "shared" / "data" / "marketplace" / "images"
# Hand-picked for variety (different categories); the rest of the folder serves if they vanish.
_PREFERRED = (
    "6e02fe9d-2f35-4e0a-a9fa-fb1c9eec6a5b_resized.jpg",  # Appliances
    "0b6ade6e-5fc2-463d-9fee-cc6526c898f2_resized.jpg",  # Clothes, Footwear & Accessories
    "dff254c9-c932-477a-86c5-a8715fb94b33_resized.jpg",  # Computers & Software
    "632beefb-cc08-4138-88d0-b0236fe36833_resized.jpg",  # Home & Garden
    "25aba0cd-e6a8-4702-988b-c9219a1811b9_resized.jpg",  # Sports, Leisure & Travel
    "0c6329f5-b542-4bfd-b4e7-b8a111f3a749_resized.jpg",  # Video Games & Consoles
)


class NoPhotos(RuntimeError):
    """Neither the marketplace photos nor scikit-image's samples are available."""


def photo_files(count: int) -> list[Path]:
    """Up to ``count`` marketplace photo files (512x512 JPEGs), [] when the data is absent."""
    if not MARKETPLACE_IMAGES.is_dir():
        return []
    chosen = [MARKETPLACE_IMAGES / name for name in _PREFERRED if (MARKETPLACE_IMAGES / name).is_file()]
    if len(chosen) < count:
        extra = sorted(p for p in MARKETPLACE_IMAGES.glob("*.jpg") if p not in chosen)
        chosen += extra[: count - len(chosen)]
    return chosen[:count]


def _sample_photos() -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError:
        return []
    return [
        Image.fromarray(getattr(data, name)()).convert("RGB")
        for name in ("coffee", "astronaut", "chelsea", "rocket")
    ]


def real_photos(count: int) -> list[bytes]:
    """``count`` distinct real photos as encoded bytes (JPEG); ``NoPhotos`` if there are none."""
    files = photo_files(count)
    if len(files) == count:
        return [path.read_bytes() for path in files]
    samples = _sample_photos()
    if len(samples) < count:
        raise NoPhotos(
            f"need {count} photos: {MARKETPLACE_IMAGES} is absent or small and "
            "scikit-image's samples are not enough"
        )
    return [encode(image, "JPEG", quality=95) for image in samples[:count]]


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """Encode a PIL image (``fmt`` as Pillow names it: JPEG, PNG, WEBP, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    """Trusted test bytes -> RGB PIL image."""
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")
