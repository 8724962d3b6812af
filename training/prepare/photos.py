"""Step 3 of preparation: every photo validated, re-centred, letterboxed and fingerprinted."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.images import ImageError, letterbox, open_image

DEFAULT_SIZE = 512
DEFAULT_WORKERS = 2
#: Limits for photos we did not take ourselves (a raw phone photo is < 20 MB, < 50 Mpx).
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_MAX_PIXELS = 50_000_000
JPEG_QUALITY = 95
FINGERPRINT_SIDE = 32


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
    pixels = np.maximum(
        np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2]
    )  # ndarray.max(axis=2) is ~15x slower
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
    return ImageOutcome(
        job.image_id, status, digest, recentred=recentred, fingerprint=photo_fingerprint(job.target)
    )


def _is_clean_already(data: bytes, size: int) -> bool:
    """A size x size RGB baseline JPEG without EXIF needs no re-encoding."""
    with Image.open(io.BytesIO(data)) as img:
        return (
            img.format == "JPEG" and img.mode == "RGB" and img.size == (size, size) and "exif" not in img.info
        )


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


def photo_fingerprint(path: Path | str, side: int = FINGERPRINT_SIDE) -> bytes:
    """A side x side grey thumbnail of a photo, as bytes: what near-duplicate detection compares.

    JPEGs are decoded at reduced scale (`Image.draft`), which makes this a few milliseconds.
    """
    with Image.open(path) as img:
        img.draft("L", (2 * side, 2 * side))
        grey = img.convert("L").resize((side, side), Image.Resampling.BOX)
    return grey.tobytes()
