"""The listing photo store: photo bytes by image id, for showing listings to people.

The gateway keeps the photos of listings added through AddListing here (`services.gateway.photos`)
and the HTTP edge serves them to the browser (`services.web`); the prepared photos are copied in
with `fill_from_prepared`. Two processes share it, so it is storage, not a service: a local folder
by default (`LocalImageStore`), and any object store with the same four operations can replace it.
An S3-compatible bucket maps one to one: ``put`` is PutObject of key ``prefix + image_id`` with
``ContentType``, ``get`` GetObject (NoSuchKey -> `ImageNotFound`), ``delete`` DeleteObject,
``contains`` HeadObject; `open_image_store` is the one place that picks the implementation.

Every photo is checked on the way in: at most ``max_bytes``, not empty, and one of the formats a
browser shows (JPEG, PNG, WebP, GIF), recognised by its leading bytes, never by a name or a
client's Content-Type. Image ids are checked against `IMAGE_ID` before they touch a path, so no id
can leave the store's folder.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from common.prepared_data import IMAGES_FILE, image_path, read_rows

log = logging.getLogger(__name__)

#: Image ids the store accepts: the gateway's UUIDs and the prepared data's ids; no "/" or "..".
IMAGE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

#: Leading bytes -> content type, for the formats browsers display.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
)
CONTENT_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif")


class ImageStoreError(Exception):
    """A photo cannot be stored or read; the message says why in words a person can act on."""


class InvalidImageId(ImageStoreError):
    pass


class ImageNotFound(ImageStoreError):
    pass


class UnsupportedImage(ImageStoreError):
    """Empty, or not a JPEG/PNG/WebP/GIF."""


class ImageTooLarge(ImageStoreError):
    pass


@dataclass(frozen=True)
class StoredImage:
    image_id: str
    content_type: str
    data: bytes


class ImageStore(Protocol):
    """Photo bytes by image id. Implementations are thread-safe."""

    max_bytes: int

    def put(self, image_id: str, data: bytes) -> StoredImage:
        """Check and store (replacing any photo with that id)."""

    def get(self, image_id: str) -> StoredImage:
        """The photo, or `ImageNotFound`."""

    def delete(self, image_id: str) -> bool:
        """Remove the photo; False if there was none."""

    def contains(self, image_id: str) -> bool: ...


def sniff_content_type(data: bytes) -> str | None:
    """The content type of an encoded photo from its leading bytes (None: not one we serve)."""
    for signature, content_type in _SIGNATURES:
        if data.startswith(signature):
            return content_type
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_image_id(image_id: str) -> str:
    if not isinstance(image_id, str) or not IMAGE_ID.match(image_id):
        raise InvalidImageId(
            f"image id {str(image_id)[:80]!r} is not valid: 1-128 letters, digits, '-' or '_'"
        )
    return image_id


def check_photo(data: bytes, max_bytes: int) -> str:
    """The photo's content type, or an error saying what is wrong with it."""
    if not data:
        raise UnsupportedImage("the photo is empty")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the photo is {len(data):,} bytes; the limit is {max_bytes:,} bytes")
    content_type = sniff_content_type(data)
    if content_type is None:
        raise UnsupportedImage("the file is not a JPEG, PNG, WebP or GIF photo")
    return content_type


class LocalImageStore:
    """One file per photo, ``root/<id[:2]>/<id>`` (a fan-out keeps folders small), written
    atomically (temporary file + rename), so a reader never sees half a photo."""

    def __init__(self, root: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root).resolve()  # created by the first photo stored
        self.max_bytes = max_bytes

    def __repr__(self) -> str:
        return f"LocalImageStore({str(self.root)!r})"

    def path_of(self, image_id: str) -> Path:
        check_image_id(image_id)
        path = self.root / image_id[:2] / image_id
        if path.resolve().parent.parent != self.root:  # belt and braces: the id is checked above
            raise InvalidImageId(f"image id {image_id!r} leaves the store")
        return path

    def put(self, image_id: str, data: bytes) -> StoredImage:
        path = self.path_of(image_id)
        content_type = check_photo(data, self.max_bytes)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return StoredImage(image_id, content_type, bytes(data))

    def link(self, image_id: str, source: Path) -> bool:
        """Add the photo file ``source`` under ``image_id`` without copying when the file system
        allows (a hard link), else by `put`. False if the id is already stored."""
        path = self.path_of(image_id)
        if path.exists():
            return False
        with open(source, "rb") as file:
            head = file.read(16)
        size = source.stat().st_size
        if size > self.max_bytes or sniff_content_type(head) is None:
            check_photo(source.read_bytes(), self.max_bytes)  # raises with the reason
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, path)
        except OSError:
            self.put(image_id, source.read_bytes())
        return True

    def get(self, image_id: str) -> StoredImage:
        path = self.path_of(image_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageNotFound(f"no photo with id {image_id}") from None
        content_type = sniff_content_type(data)
        if content_type is None:  # only a file changed behind the store's back gets here
            raise ImageNotFound(f"photo {image_id} is not readable as an image")
        return StoredImage(image_id, content_type, data)

    def delete(self, image_id: str) -> bool:
        try:
            self.path_of(image_id).unlink()
        except FileNotFoundError:
            return False
        return True

    def contains(self, image_id: str) -> bool:
        return self.path_of(image_id).is_file()


def open_image_store(location: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> ImageStore:
    """The store at ``location``: a folder path (or ``file://`` URL). Other schemes (``s3://``)
    need an implementation of `ImageStore` registered here."""
    text = str(location)
    if text.startswith("file://"):
        text = text.removeprefix("file://")
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ImageStoreError(
            f"image store {text!r}: no {scheme}:// store is built in; use a "
            "folder path (an S3 store implements common.image_store.ImageStore)"
        )
    return LocalImageStore(text, max_bytes)


@dataclass(frozen=True)
class FillReport:
    added: int
    already_there: int
    skipped: int


def fill_from_prepared(store: ImageStore, prepared: str | Path) -> FillReport:
    """Add the prepared photos (``images.csv``: ``image_id``, ``path`` relative to the prepared
    folder or absolute) missing from the store. Files that are absent or not photos are skipped
    and counted."""
    prepared = Path(prepared)
    added = there = skipped = 0
    for row in read_rows(prepared, IMAGES_FILE, required=("image_id",)):
        image_id, relative = row["image_id"], row.get("path", "")
        source = prepared / (relative or image_path(image_id))
        try:
            if isinstance(store, LocalImageStore):
                new = store.link(image_id, source)
            elif store.contains(image_id):
                new = False
            else:
                store.put(image_id, source.read_bytes())
                new = True
        except (ImageStoreError, OSError) as exc:
            log.warning("prepared photo %s not stored: %s", image_id, exc)
            skipped += 1
            continue
        added += new
        there += not new
    return FillReport(added, there, skipped)
