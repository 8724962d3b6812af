"""The listing photo store: what goes in is a real photo of a browser format and a bounded size,
ids never leave the folder, writes are whole, and the prepared photos are linked in once."""

from __future__ import annotations

import csv
import os

import pytest
from PIL import Image

from common.image_store import (
    ImageNotFound,
    ImageStoreError,
    ImageTooLarge,
    InvalidImageId,
    LocalImageStore,
    UnsupportedImage,
    fill_from_prepared,
    open_image_store,
    sniff_content_type,
)
from tests.support.photos import encode, real_photos


@pytest.fixture
def store(tmp_path) -> LocalImageStore:
    return LocalImageStore(tmp_path / "store", max_bytes=2 * 1024 * 1024)


def test_a_photo_comes_back_as_it_went_in_with_its_type(store):
    photo = real_photos(1)[0]
    stored = store.put("0b6ade6e-5fc2-463d-9fee-cc6526c898f2", photo)
    assert stored.content_type == "image/jpeg"
    again = store.get("0b6ade6e-5fc2-463d-9fee-cc6526c898f2")
    assert (again.data, again.content_type) == (photo, "image/jpeg")
    assert store.contains("0b6ade6e-5fc2-463d-9fee-cc6526c898f2")
    assert not list(store.root.rglob(".incoming-*"))  # the temporary file was renamed


@pytest.mark.parametrize(
    "fmt, content_type",
    [("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif"), ("JPEG", "image/jpeg")],
)
def test_browser_formats_are_recognised_by_their_bytes(fmt, content_type):
    image = Image.new("RGB", (8, 8), (200, 30, 30))
    assert sniff_content_type(encode(image, fmt)) == content_type


def test_what_is_not_a_browser_photo_is_refused_in_words(store):
    with pytest.raises(UnsupportedImage, match="not a JPEG, PNG, WebP or GIF"):
        store.put("a1", b"just text, not a photo")
    with pytest.raises(UnsupportedImage, match="not a JPEG"):
        store.put("a2", encode(Image.new("RGB", (8, 8)), "TIFF"))
    with pytest.raises(UnsupportedImage, match="empty"):
        store.put("a3", b"")
    with pytest.raises(ImageTooLarge, match="the limit is 2,097,152 bytes"):
        store.put("a4", b"\xff\xd8\xff" + b"\0" * (2 * 1024 * 1024))
    assert not any(store.contains(i) for i in ("a1", "a2", "a3", "a4"))


@pytest.mark.parametrize(
    "image_id", ["..", "../secret", "a/b", "/etc/passwd", ".hidden", "a.b", "", "x" * 129, "a\0b", "a\\b"]
)
def test_no_id_leads_out_of_the_store(store, tmp_path, image_id):
    (tmp_path / "secret").write_bytes(b"\xff\xd8\xff secret")
    with pytest.raises(InvalidImageId):
        store.get(image_id)
    with pytest.raises(InvalidImageId):
        store.put(image_id, real_photos(1)[0])
    with pytest.raises(InvalidImageId):
        store.delete(image_id)


def test_delete_and_unknown_ids(store):
    store.put("gone", real_photos(1)[0])
    assert store.delete("gone") is True and store.delete("gone") is False
    with pytest.raises(ImageNotFound, match="no photo with id gone"):
        store.get("gone")


def test_only_folders_are_built_in(tmp_path):
    assert isinstance(open_image_store(f"file://{tmp_path}/x"), LocalImageStore)
    with pytest.raises(ImageStoreError, match="no s3:// store is built in"):
        open_image_store("s3://bucket/photos")


def test_prepared_photos_are_linked_in_once(store, tmp_path):
    prepared = tmp_path / "prepared"
    (prepared / "images").mkdir(parents=True)
    photos = real_photos(2)
    rows = [
        ("p1", "images/p1.jpg"),
        ("p2", "images/p2.jpg"),
        ("p3", "images/missing.jpg"),
        ("p4", "images/notes.jpg"),
    ]
    for (_, path), data in zip(rows, photos):
        (prepared / path).write_bytes(data)
    (prepared / "images" / "notes.jpg").write_text("not a photo")
    with open(prepared / "images.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["image_id", "product_id", "path"])
        writer.writerows((image_id, "L", path) for image_id, path in rows)
    first = fill_from_prepared(store, prepared)
    assert (first.added, first.already_there, first.skipped) == (2, 0, 2)
    assert store.get("p2").data == photos[1]
    assert os.path.samefile(store.path_of("p1"), prepared / "images" / "p1.jpg")  # linked
    second = fill_from_prepared(store, prepared)
    assert (second.added, second.already_there, second.skipped) == (0, 2, 2)
