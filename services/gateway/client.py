"""A small Python client for the gateway, returning plain dataclasses (`services.gateway.domain`).

    from services.gateway.client import GatewayClient

    with GatewayClient("127.0.0.1:50050") as gateway:
        for result in gateway.search_by_image("photo.jpg", k=5, max_price=100):
            print(result.rank, round(result.score, 3), result.listing.title, result.matched_image_id)
        gateway.search_by_text("oak dining table", k=5)
        gateway.search(image="photo.jpg", text="oak", text_weight=0.3, fusion="reciprocal_rank")
        gateway.recommend(liked=["id1", "id2"], skipped=["id3"], seen=["id4"], k=10)
        answer = gateway.similar("id1", k=5, allow_partial_results=True)
        if answer.missing_shards:
            print(answer.notice)  # "These results are incomplete: index shard 1 is unavailable..."
        listing = gateway.add(["front.jpg", "back.jpg"], title="Oak table", price=40)
        gateway.remove(listing.id)

Searches return `RankedResults`: the list of results, plus ``missing_shards`` (and ``notice``, the
same in words). With ``allow_partial_results=True`` a search whose shard has every replica down
answers from the other shards and names the missing ones there; without it (the default) it
fails with UNAVAILABLE naming the shard.

Photos may be given as bytes or as file paths. Errors are the gRPC errors (``grpc.RpcError``
with ``.code()`` and ``.details()``); the gateway's messages are meant to be shown to a person.
Write calls send ``authorization: Bearer <token>`` when a write token is given (default: the
``WRITE_TOKEN`` environment variable; ``write_token=`` on `add` / `remove` sends a caller's own
token instead, as the HTTP edge does with the token its caller presented). TLS follows ``TLS_CA`` (see `common.security`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Required, TypedDict, Unpack

import grpc

from common.config import Setting
from common.security import bearer_metadata, open_channel
from common.security import write_token as env_write_token
from marketplace.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import convert
from services.gateway.domain import (
    AddedListing,
    Classification,
    Listing,
    RankedResults,
    RemovedListing,
    SearchFilter,
)

#: Where a client finds the gateway: the HTTP edge's and the CLI's setting.
GATEWAY_ADDR = Setting(
    "GATEWAY_ADDR",
    "gateway_addr",
    default="127.0.0.1:50050",
    flag="--gateway",
    help="the gateway to call (a gRPC target)",
)

Image = bytes | str | os.PathLike


class SearchOptions(TypedDict, total=False):
    """The keyword arguments every search takes: the filter (`SearchFilter`'s fields), whether a
    shard with every replica down may be left out, and the call's timeout (None: the client's)."""

    main_category: str
    min_price: float | None
    max_price: float | None
    location: str
    exclude: Iterable[str]
    allow_partial_results: bool
    timeout: float | None


class ListingFields(TypedDict, total=False):
    """The keyword arguments of `GatewayClient.add_listing`."""

    title: Required[str]
    description: str
    category: str
    main_category: str
    price: float | None
    currency: str
    location: str
    listing_id: str
    timeout: float | None
    write_token: str | None


def read_image(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    return Path(image).read_bytes()


class GatewayClient:
    def __init__(
        self,
        address: str,
        *,
        timeout: float = 10.0,
        write_token: str | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        token = write_token if write_token is not None else env_write_token()
        self._write_metadata = bearer_metadata(token)
        self._own_channel = channel is None
        self.channel = channel or open_channel(
            address,
            [
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        #: The raw stub, for callers who want the protos themselves.
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def close(self) -> None:
        if self._own_channel:
            self.channel.close()

    def __enter__(self) -> "GatewayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    def _ranked(self, rpc, request_type, options: SearchOptions, **fields) -> RankedResults:
        """One search RPC: a ``request_type`` of ``fields`` plus the options' filter and
        partial-results flag, called with the options' timeout."""
        unknown = set(options) - SearchOptions.__annotations__.keys()
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
        search_filter = SearchFilter(
            options.get("main_category", ""),
            options.get("min_price"),
            options.get("max_price"),
            options.get("location", ""),
            tuple(options.get("exclude", ())),
        )
        request = request_type(
            filter=convert.filter_to_proto(search_filter),
            allow_partial_results=options.get("allow_partial_results", False),
            **fields,
        )
        return convert.ranked_from_proto(rpc(request, timeout=self._timeout(options.get("timeout"))))

    # ------------------------------------------------------------------ reads

    def classify(self, image: Image, top_k: int = 3, *, timeout: float | None = None) -> Classification:
        reply = self.stub.ClassifyImage(
            gateway_pb2.ClassifyImageRequest(image=read_image(image), top_k=top_k),
            timeout=self._timeout(timeout),
        )
        return convert.classification_from_proto(reply)

    def search_by_image(self, image: Image, k: int = 10, **options: Unpack[SearchOptions]) -> RankedResults:
        """Listings whose photos look like ``image``."""
        return self._ranked(
            self.stub.SearchByImage, gateway_pb2.SearchByImageRequest, options, image=read_image(image), k=k
        )

    def search_by_text(self, query: str, k: int = 10, **options: Unpack[SearchOptions]) -> RankedResults:
        """Listings whose title and description best match ``query``."""
        return self._ranked(
            self.stub.SearchByText, gateway_pb2.SearchByTextRequest, options, query=query, k=k
        )

    def search(
        self,
        image: Image | None = None,
        text: str = "",
        k: int = 10,
        *,
        text_weight: float | None = None,
        fusion: str = "weighted_cosine",
        **options: Unpack[SearchOptions],
    ) -> RankedResults:
        """Hybrid search by a photo and/or a text query. ``text_weight`` in [0, 1] (None: the
        gateway's default, 0.5); ``fusion`` "weighted_cosine" or "reciprocal_rank"."""
        weight = {} if text_weight is None else {"text_weight": text_weight}  # unset: the default
        return self._ranked(
            self.stub.Search,
            gateway_pb2.HybridSearchRequest,
            options,
            image=read_image(image) if image is not None else b"",
            text=text,
            k=k,
            fusion=convert.fusion_to_proto(fusion),
            **weight,
        )

    def recommend(
        self,
        liked: Iterable[str],
        skipped: Iterable[str] = (),
        seen: Iterable[str] = (),
        k: int = 10,
        **options: Unpack[SearchOptions],
    ) -> RankedResults:
        """Listings like the ``liked`` ones and unlike the ``skipped`` ones; liked, skipped and
        ``seen`` listings are never returned."""
        return self._ranked(
            self.stub.Recommend,
            gateway_pb2.RecommendRequest,
            options,
            liked_listing_ids=list(liked),
            skipped_listing_ids=list(skipped),
            seen_listing_ids=list(seen),
            k=k,
        )

    def similar(
        self, listing_id: str, k: int = 10, *, photos_only: bool = False, **options: Unpack[SearchOptions]
    ) -> RankedResults:
        """Listings like ``listing_id``: by its photos and text fused, or by its photos alone."""
        return self._ranked(
            self.stub.SimilarListings,
            gateway_pb2.SimilarListingsRequest,
            options,
            listing_id=listing_id,
            k=k,
            photos_only=photos_only,
        )

    def get(self, listing_id: str, *, include_pending: bool = False, timeout: float | None = None) -> Listing:
        reply = self.stub.GetListing(
            gateway_pb2.GetListingRequest(listing_id=listing_id, include_pending=include_pending),
            timeout=self._timeout(timeout),
        )
        return convert.listing_from_proto(reply)

    # ------------------------------------------------------------------ writes

    def add(self, images: Sequence[Image], **fields: Unpack[ListingFields]) -> Listing:
        """Add a listing with its photos (the keyword arguments of `add_listing`); returns it with
        its assigned id and image ids. An empty ``main_category`` is predicted from the photos."""
        return self.add_listing(images, **fields).listing

    def add_listing(
        self,
        images: Sequence[Image],
        *,
        title: str,
        description: str = "",
        category: str = "",
        main_category: str = "",
        price: float | None = None,
        currency: str = "",
        location: str = "",
        listing_id: str = "",
        timeout: float | None = None,
        write_token: str | None = None,
    ) -> AddedListing:
        """`add`, also saying whether the listing's vectors are still pending (see AddedListing)."""
        listing = Listing(listing_id, title, description, category, main_category, price, currency, location)
        reply = self.stub.AddListing(
            gateway_pb2.AddListingRequest(
                listing=convert.listing_to_proto(listing), images=[read_image(i) for i in images]
            ),
            timeout=self._timeout(timeout),
            metadata=self._write_auth(write_token),
        )
        return AddedListing(convert.listing_from_proto(reply.listing), bool(reply.pending))

    def remove(
        self, listing_id: str, *, timeout: float | None = None, write_token: str | None = None
    ) -> RemovedListing:
        reply = self.stub.RemoveListing(
            gateway_pb2.RemoveListingRequest(listing_id=listing_id),
            timeout=self._timeout(timeout),
            metadata=self._write_auth(write_token),
        )
        return convert.removed_from_proto(reply)

    def _write_auth(self, write_token: str | None):
        """Metadata of a write call: ``write_token`` when given, else the client's own."""
        return bearer_metadata(write_token) if write_token is not None else self._write_metadata
