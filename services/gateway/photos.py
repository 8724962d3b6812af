"""Keeps the photos of listings added through AddListing in the image store (`common.image_store`),
so the HTTP edge can show them; forgets them when the listing is removed.

The servicer calls `ListingPhotos.keep` after the core stored the listing (only then are the image
ids known). If the store refuses or fails, the listing is removed again and the caller sees
UNAVAILABLE: AddListing stays all or nothing. Without a store (``IMAGE_STORE_DIR`` unset) both
calls do nothing, as before the store existed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from common.image_store import ImageStore, ImageStoreError
from services.gateway.domain import Listing, Unavailable

log = logging.getLogger(__name__)


class ListingPhotos:
    def __init__(self, store: ImageStore | None) -> None:
        self.store = store

    def keep(self, listing: Listing, images: Sequence[bytes]) -> None:
        """Store each photo under its assigned image id; `Unavailable` (nothing kept) on failure."""
        if self.store is None:
            return
        kept: list[str] = []
        try:
            for image_id, data in zip(listing.image_ids, images):
                self.store.put(image_id, bytes(data))
                kept.append(image_id)
        except (ImageStoreError, OSError) as exc:
            self.forget(kept)
            raise Unavailable(
                f"the photo store could not keep the photos of listing {listing.id}: {exc}"
            ) from None

    def forget(self, image_ids: Sequence[str]) -> None:
        if self.store is None:
            return
        for image_id in image_ids:
            try:
                self.store.delete(image_id)
            except (ImageStoreError, OSError) as exc:
                log.warning("photo %s left in the store: %s", image_id, exc)
