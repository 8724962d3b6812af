"""Image-safety helpers shared by data preparation and the embedder service.

Everything here is written for *untrusted* bytes: a marketplace photo can be a
zero-byte upload, a renamed PDF, a truncated JPEG, a 16-bit PNG, a CMYK scan or a
decompression bomb.  `open_image` either returns a fully decoded RGB image or raises
`ImageError` with a message a person can read; it never returns half an image.

Design choices (documented because other code relies on them):

* Transparent pixels (RGBA, LA, PA, P/L/RGB with a transparency key) are composited
  on **black**, the same colour `letterbox` pads with, so "black" consistently means
  "no product here" to a model.
* Only common photo formats are decoded (`ALLOWED_FORMATS`).  Pillow can also open
  formats such as EPS, which shell out to Ghostscript; those are refused.
* Pixel limits are checked from the header (`img.size`) *before* any pixel data is
  decoded.  Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`, about 89 Mpx) stays
  active as an upper ceiling and is reported as `ImageError` too.
* EXIF orientation is applied, so a phone photo taken upright is upright.

This module deliberately depends only on Pillow and NumPy (no gRPC, no torch).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image, ImageFile, ImageOps

__all__ = [
    "ALLOWED_FORMATS",
    "ImageError",
    "ImageSource",
    "letterbox",
    "open_image",
    "to_rgb",
]

ImageSource = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

#: Formats `open_image` will decode by default (names of Pillow *openers*).  "JPEG"
#: also opens MPO, which many phones write (a JPEG with extra frames; the first is used).
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")

#: Modes that carry an alpha channel Pillow can convert to RGBA directly.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


class ImageError(ValueError):
    """An image could not be used; ``str(err)`` says why in plain words."""


def open_image(
    source: ImageSource,
    *,
    max_bytes: int | None = None,
    max_pixels: int | None = None,
    formats: Sequence[str] = ALLOWED_FORMATS,
) -> Image.Image:
    """Decode `source` (raw bytes or a file path) into an upright RGB image.

    Raises `ImageError` for empty data, non-image data, a disallowed format, data over
    `max_bytes`, a picture over `max_pixels` (checked from the header, before
    decoding), a decompression bomb, or a truncated/corrupt file (a full decode is
    forced with ``load()`` so truncation cannot slip through lazily).
    ``None`` limits mean "no limit of our own" (Pillow's bomb ceiling still applies).
    """
    formats = _checked_formats(formats)
    data = _read_source(source, max_bytes)
    if not data:
        raise ImageError("empty image data (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # a global someone may have flipped
        raise ImageError("refusing to decode: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set")

    with warnings.catch_warnings():
        # Pillow warns (not raises) between 1x and 2x MAX_IMAGE_PIXELS; make it fatal.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=formats)
        except Image.UnidentifiedImageError:
            raise ImageError(f"not a recognised image (accepted formats: {', '.join(formats)})") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image too large (decompression bomb guard): {exc}") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input
            raise ImageError(f"unreadable image header: {type(exc).__name__}: {exc}") from None

        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image has no pixels ({width}x{height})")
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
            )
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageError(f"image too large (decompression bomb guard): {exc}") from None
        except Exception as exc:  # noqa: BLE001 - decoders raise many types on hostile input
            raise ImageError(f"corrupt or truncated {img.format or 'image'} data: {exc}") from None

    img = _apply_exif_orientation(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without the usual mistakes.

    * alpha / transparency -> composited on black (not just dropped, which would
      expose whatever colour the transparent pixels happen to store);
    * 16/32-bit integer grey ('I;16*', 'I') -> scaled to 0..255 by the sample range;
    * float grey ('F') -> 0..1 data scaled by 255, anything else min-max stretched;
    * CMYK -> via its embedded ICC profile when there is one, else Pillow's formula;
    * '1', 'L', 'P', 'YCbCr', ... -> Pillow's standard conversion.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _ALPHA_MODES or (mode in {"P", "L", "RGB"} and "transparency" in img.info):
        return _composite_on_black(img.convert("RGBA"))
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_grey_to_uint8(img), mode="L").convert("RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"cannot convert image mode {mode!r} to RGB: {exc}") from None


def letterbox(img: Image.Image, size: int = 512) -> Image.Image:
    """The original course `resize_image`: fit inside size x size keeping the aspect
    ratio, then paste centred on a black RGB canvas.

    The long side becomes exactly `size` (small images are scaled up, as in the
    original); the short side is truncated like ``int(x * ratio)`` but computed in
    integers so 1023 px does not become 511.99 -> 511.  A 1024x512 photo becomes
    512x256 pasted at (0, 128).
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    img = to_rgb(img)
    width, height = img.size
    longest = max(width, height)
    new_size = (max(1, width * size // longest), max(1, height * size // longest))
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.LANCZOS)
    if new_size == (size, size):
        return img.copy() if img.mode == "RGB" else img.convert("RGB")
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(img, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


# --------------------------------------------------------------------------- helpers


def _checked_formats(formats: Sequence[str]) -> list[str]:
    """Upper-case the allowed formats and reject names Pillow cannot open (a caller bug,
    so `ValueError`, not `ImageError`)."""
    wanted = [f.upper() for f in formats]
    if not wanted:
        raise ValueError("formats must name at least one image format")
    Image.init()
    unknown = [f for f in wanted if f not in Image.OPEN]
    if unknown:
        raise ValueError(f"Pillow has no opener for {unknown}; MPO is opened by 'JPEG'")
    return wanted


def _read_source(source: ImageSource, max_bytes: int | None) -> bytes:
    """Return the raw bytes, refusing oversize input before reading it all."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if max_bytes is not None and len(data) > max_bytes:
            raise ImageError(f"image is {len(data):,} bytes, over the limit of {max_bytes:,}")
        return data
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        try:
            size = os.path.getsize(path)
            if max_bytes is not None and size > max_bytes:
                raise ImageError(f"image file is {size:,} bytes, over the limit of {max_bytes:,}")
            with open(path, "rb") as fh:
                return fh.read()
        except ImageError:
            raise
        except OSError as exc:
            raise ImageError(f"cannot read image file {path!r}: {exc.strerror or exc}") from None
    raise TypeError(f"source must be bytes or a path, not {type(source).__name__}")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    """Rotate/flip per the EXIF Orientation tag; a malformed EXIF block is ignored
    (the pixels are fine, only the hint is broken)."""
    try:
        rotated = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - any EXIF parsing bug must not reject the photo
        return img
    return rotated if rotated is not None else img


def _composite_on_black(rgba: Image.Image) -> Image.Image:
    """Alpha-composite an RGBA image over opaque black and drop the alpha."""
    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_uint8(img: Image.Image) -> np.ndarray:
    """Scale a high-bit-depth grey image to uint8 using its nominal sample range.

    16-bit data ('I;16*', or 'I' holding values in 0..65535) maps 65535 -> 255;
    'I' data already in 0..255 is kept; floats in 0..1 are multiplied by 255;
    anything else (negative or huge values) is min-max stretched.
    """
    arr = np.asarray(img)
    if arr.size == 0:
        return np.zeros(img.size[::-1], dtype=np.uint8)
    arr = arr.astype(np.float64)
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if img.mode.startswith("I;16"):
        scaled = arr / 257.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        scaled = arr
    elif img.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        scaled = arr / 257.0
    else:
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK -> RGB, colour-managed when the file carries an ICC profile."""
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(img, src, dst, outputMode="RGB")
            if converted is not None:
                return converted
        except Exception:  # noqa: BLE001 - a bad profile falls back to the plain formula
            pass
    return img.convert("RGB")
