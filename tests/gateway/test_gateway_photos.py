"""The gateway's image-store hook (`services.gateway.photos`): AddListing's photos are kept under
their image ids, a store that refuses leaves nothing behind and says why, RemoveListing forgets."""

from __future__ import annotations

import pytest

from common.image_store import LocalImageStore
from services.gateway.domain import Listing, Unavailable
from services.gateway.photos import ListingPhotos
from tests.support.photos import real_photos


def listing(*image_ids: str) -> Listing:
    return Listing("L1", "Oak table", image_ids=image_ids)


def test_photos_are_kept_and_forgotten(tmp_path):
    store = LocalImageStore(tmp_path)
    photos = real_photos(2)
    ListingPhotos(store).keep(listing("i1", "i2"), photos)
    assert [store.get(i).data for i in ("i1", "i2")] == photos
    ListingPhotos(store).forget(["i1", "i2", "never-stored"])
    assert not store.contains("i1") and not store.contains("i2")


def test_a_refusing_store_keeps_nothing_and_says_why(tmp_path):
    small, big = sorted(real_photos(2), key=len)
    store = LocalImageStore(tmp_path, max_bytes=len(small))
    with pytest.raises(Unavailable, match="could not keep the photos of listing L1: .*limit"):
        ListingPhotos(store).keep(listing("i1", "i2"), [small, big])
    assert not store.contains("i1")  # the first photo, stored before the failure, is gone


def test_without_a_store_nothing_happens():
    ListingPhotos(None).keep(listing("i1"), [b"anything"])
    ListingPhotos(None).forget(["i1"])
