"""The edge's routes: the page, the JSON API (one gateway RPC each) and the listing photos.

`create_app(config)` builds the FastAPI application; its OpenAPI document is at
``/openapi.json`` (and browsable at ``/docs``). Reads are open; ``POST /api/listings`` and
``DELETE /api/listings/{id}`` pass the caller's ``Authorization: Bearer <token>`` on to the
gateway, which checks it against its ``WRITE_TOKEN`` exactly as for a gRPC caller (the edge holds
no token of its own). Search filters are query parameters on every search endpoint; photos are
multipart uploads.
"""

from __future__ import annotations

import base64
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Callable, Literal, TypeVar

import grpc
from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.image_store import ImageNotFound, ImageStore, InvalidImageId, open_image_store
from marketplace.gateway.v1 import gateway_pb2
from services.gateway.client import GatewayClient
from services.gateway.domain import RankedResults
from services.web.config import WebConfig
from services.web.errors import HTTP_CODE_NAMES, EdgeError, from_rpc_error
from services.web.schemas import (
    CategoriesOut,
    ClassificationOut,
    ErrorBody,
    FilterIn,
    HealthOut,
    ListingOut,
    PredictImageOut,
    RecommendIn,
    RemovedOut,
    SearchResults,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
STATIC = Path(__file__).resolve().parent / "static"
GATEWAY_SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
UINT32_MAX = 2**32 - 1
#: A 1x1 PNG: ClassifyImage of it with a large top_k lists every category the model knows (the
#: gateway has no RPC for the list itself).
_BLANK_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
)

_ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 413, 429, 503, 504)}
_WRITE_ERRORS = {**_ERRORS, **{status: {"model": ErrorBody} for status in (401, 403, 409)}}
_bearer = HTTPBearer(auto_error=False, description="the gateway's WRITE_TOKEN")
#: Writes send the bearer token on to the gateway, which requires it only when its WRITE_TOKEN
#: is set: so the document says "bearer token, or none".
_WRITE_SECURITY = {"security": [{}]}  # appended to FastAPI's [{"HTTPBearer": []}]


class UploadLimit:
    """ASGI middleware: a request whose Content-Length exceeds the limit is 413 before its body
    is read."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope.get("headers") or ()).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_bytes:
                response = JSONResponse(status_code=413, content=too_large(int(length), self.max_bytes))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def too_large(size: int, limit: int) -> dict:
    return {
        "detail": f"the upload is {size:,} bytes; the limit is {limit:,} bytes "
        f"({limit // (1024 * 1024)} MiB): send a smaller photo",
        "code": "RESOURCE_EXHAUSTED",
    }


def search_filter(
    main_category: Annotated[str, Query(description="only this main category")] = "",
    min_price: Annotated[float | None, Query(description="lowest price")] = None,
    max_price: Annotated[float | None, Query(description="highest price")] = None,
    location: Annotated[str, Query(description="only this exact location")] = "",
    exclude: Annotated[list[str], Query(description="listing ids never to return")] = [],  # noqa: B006 (FastAPI builds a new list per request)
) -> FilterIn:
    return FilterIn(
        main_category=main_category,
        min_price=min_price,
        max_price=max_price,
        location=location,
        exclude=exclude,
    )


Filter = Annotated[FilterIn, Depends(search_filter)]
K = Annotated[int, Query(ge=0, le=UINT32_MAX, description="listings to return; 0 means 10")]
Partial = Annotated[
    bool,
    Query(
        description=(
            "when every replica of an index shard is down, answer from the other shards and name the "
            "missing ones in missing_shards and notice (default false: 503 naming the shard)"
        )
    ),
]


def create_app(
    config: WebConfig, *, store: ImageStore | None = None, client: GatewayClient | None = None
) -> FastAPI:
    store = store or open_image_store(config.image_store_dir)
    gateway = client or GatewayClient(
        config.gateway_addr,
        timeout=config.gateway_timeout_s,
        write_token="",
        channel=config.tls.open_channel(
            config.gateway_addr,
            [
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                # a restarted gateway is used again within seconds, not gRPC's default 2 minutes
                ("grpc.max_reconnect_backoff_ms", 2000),
                ("grpc.initial_reconnect_backoff_ms", 200),
                # a dns:/// target naming several gateway replicas: spread calls over all of them
                ("grpc.lb_policy_name", "round_robin"),
            ],
        ),
    )
    categories: list[str] = []
    categories_lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        gateway.close()

    app = FastAPI(
        title="Marketplace visual search",
        version="1",
        description="The page and a JSON API over the marketplace gateway: classify a photo, "
        "search listings by photo, text or both, similar listings, recommendations, "
        "and (with the write token) add or remove listings. Errors carry the "
        "gateway's message in `detail`.",
        lifespan=lifespan,
    )
    app.add_middleware(UploadLimit, max_bytes=config.max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(EdgeError)
    async def edge_error(_request: Request, exc: EdgeError) -> JSONResponse:
        return JSONResponse(status_code=exc.status, content={"detail": exc.detail, "code": exc.code})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (malformed multipart, unknown path) in the same shape;
        a 405's Allow names every method of the path (Starlette names only its first route's)."""
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            methods = set()
            for route in app.router.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    methods |= getattr(route, "methods", None) or set()
            headers["Allow"] = ", ".join(sorted(methods))
        return JSONResponse(
            status_code=exc.status_code,
            headers=headers,
            content={"detail": str(exc.detail), "code": HTTP_CODE_NAMES.get(exc.status_code, "UNKNOWN")},
        )

    def call(work: Callable[[], T]) -> T:
        try:
            return work()
        except grpc.RpcError as exc:
            error = from_rpc_error(exc, config.gateway_addr)
            if error.status >= 500:
                log.warning("gateway call failed: %s %s", error.code, error.detail)
            raise error from None
        except (ValueError, TypeError) as exc:  # a value the gateway's protos cannot carry
            raise EdgeError(
                400, "INVALID_ARGUMENT", f"the request cannot be sent to the gateway: {exc}"
            ) from None

    def photo(upload: UploadFile) -> bytes:
        data = upload.file.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise EdgeError(
                413, "RESOURCE_EXHAUSTED", too_large(len(data), config.max_upload_bytes)["detail"]
            )
        return data

    def search_route(method: Literal["get", "post"], path: str, summary: str):
        """The route of a search endpoint: listings ranked (SearchResults), or an error body."""
        return getattr(app, method)(
            path, response_model=SearchResults, responses=_ERRORS, tags=["search"], summary=summary
        )

    def ranked(
        gateway_search: Callable[..., RankedResults],
        *args,
        search: FilterIn,
        allow_partial_results: bool,
        **options,
    ) -> SearchResults:
        """One of the client's searches with the request's filter, as the JSON results."""
        return SearchResults.of(
            call(
                lambda: gateway_search(
                    *args,
                    allow_partial_results=allow_partial_results,
                    main_category=search.main_category,
                    min_price=search.min_price,
                    max_price=search.max_price,
                    location=search.location,
                    exclude=search.exclude,
                    **options,
                )
            )
        )

    # ------------------------------------------------------------------ the page

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get(
        "/api/health",
        response_model=HealthOut,
        tags=["service"],
        summary="Whether the edge and the gateway behind it can answer",
    )
    def health() -> HealthOut:
        stub = health_pb2_grpc.HealthStub(gateway.channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=GATEWAY_SERVICE), timeout=2)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError:
            status = "UNREACHABLE"
        return HealthOut(edge="SERVING", gateway=status, ready=status == "SERVING")

    @app.get(
        "/api/categories",
        response_model=CategoriesOut,
        responses=_ERRORS,
        tags=["service"],
        summary="The model's main categories (for filters)",
    )
    def list_categories() -> CategoriesOut:
        with categories_lock:
            if not categories:
                result = call(lambda: gateway.classify(_BLANK_PNG, top_k=1000))
                categories.extend(sorted(c.category for c in result.categories))
            return CategoriesOut(categories=list(categories))

    # ------------------------------------------------------------------ reads

    @app.post(
        "/predict/image",
        response_model=PredictImageOut,
        responses=_ERRORS,
        tags=["compatibility"],
        summary="Main category of a photo (the original FastAPI project's endpoint)",
    )
    def predict_image(image: Annotated[UploadFile, File(description="the photo")]) -> PredictImageOut:
        data = photo(image)
        best = call(lambda: gateway.classify(data, top_k=1)).categories[0]
        return PredictImageOut(Category=best.category, Probability=best.probability)

    @app.post(
        "/api/classify",
        response_model=ClassificationOut,
        responses=_ERRORS,
        tags=["search"],
        summary="ClassifyImage: main categories of a photo with probabilities",
    )
    def classify(
        image: Annotated[UploadFile, File(description="the photo")],
        top_k: Annotated[int, Query(ge=0, le=UINT32_MAX, description="categories to return; 0 means 3")] = 3,
    ) -> ClassificationOut:
        data = photo(image)
        return ClassificationOut.of(call(lambda: gateway.classify(data, top_k=top_k)))

    @search_route("post", "/api/search/image", "SearchByImage: listings whose photos look like this one")
    def search_by_image(
        image: Annotated[UploadFile, File(description="the query photo")],
        search: Filter,
        k: K = 10,
        allow_partial_results: Partial = False,
    ) -> SearchResults:
        return ranked(
            gateway.search_by_image,
            photo(image),
            k,
            search=search,
            allow_partial_results=allow_partial_results,
        )

    @search_route(
        "get", "/api/search/text", "SearchByText: listings whose title and description match a query"
    )
    def search_by_text(
        q: Annotated[str, Query(description="the text query")],
        search: Filter,
        k: K = 10,
        allow_partial_results: Partial = False,
    ) -> SearchResults:
        return ranked(
            gateway.search_by_text, q, k, search=search, allow_partial_results=allow_partial_results
        )

    @search_route("post", "/api/search", "Search: a photo and/or a text query, fused")
    def search(
        search: Filter,
        image: Annotated[UploadFile | None, File(description="the query photo")] = None,
        text: Annotated[str, Form(description="the text query")] = "",
        text_weight: Annotated[
            float | None,
            Form(
                description="weight of the text ranking in [0, 1]; unset: the gateway's default (chosen on valid for the served model)"
            ),
        ] = None,
        fusion: Annotated[
            Literal["weighted_cosine", "reciprocal_rank"],
            Form(description="how the two rankings are combined"),
        ] = "weighted_cosine",
        k: K = 10,
        allow_partial_results: Partial = False,
    ) -> SearchResults:
        data = photo(image) if image is not None else None
        return ranked(
            gateway.search,
            data or None,
            text,
            k,
            text_weight=text_weight,
            fusion=fusion,
            search=search,
            allow_partial_results=allow_partial_results,
        )

    @app.get(
        "/api/listings/{listing_id}",
        response_model=ListingOut,
        responses=_ERRORS,
        tags=["listings"],
        summary="GetListing: one listing",
    )
    def get_listing(listing_id: Annotated[str, PathParam()]) -> ListingOut:
        return ListingOut.of(call(lambda: gateway.get(listing_id)))

    @search_route(
        "get", "/api/listings/{listing_id}/similar", "SimilarListings: listings that look like this one"
    )
    def similar(
        listing_id: Annotated[str, PathParam()],
        search: Filter,
        k: K = 10,
        allow_partial_results: Partial = False,
    ) -> SearchResults:
        return ranked(
            gateway.similar, listing_id, k, search=search, allow_partial_results=allow_partial_results
        )

    @search_route(
        "post", "/api/recommend", "Recommend: listings like the liked ones and unlike the skipped ones"
    )
    def recommend(body: RecommendIn) -> SearchResults:
        return ranked(
            gateway.recommend,
            body.liked,
            body.skipped,
            body.seen,
            body.k,
            search=body.filter,
            allow_partial_results=body.allow_partial_results,
        )

    @app.get(
        "/api/images/{image_id}",
        tags=["listings"],
        summary="A listing photo",
        responses={
            200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "image/gif": {}}},
            404: {"model": ErrorBody},
        },
    )
    def listing_image(image_id: Annotated[str, PathParam()]) -> Response:
        try:
            stored = store.get(image_id)
        except (ImageNotFound, InvalidImageId) as exc:
            raise EdgeError(404, "NOT_FOUND", str(exc)) from None
        return Response(
            stored.data,
            media_type=stored.content_type,
            headers={
                "Cache-Control": "public, max-age=31536000, immutable",
                "X-Content-Type-Options": "nosniff",
            },
        )

    # ------------------------------------------------------------------ writes

    @app.post(
        "/api/listings",
        response_model=ListingOut,
        status_code=201,
        responses=_WRITE_ERRORS,
        tags=["listings"],
        openapi_extra=_WRITE_SECURITY,
        summary="AddListing: a new listing with its photos (write token)",
    )
    def add_listing(
        images: Annotated[list[UploadFile], File(description="the photos, in order")],
        title: Annotated[str, Form()],
        auth: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        description: Annotated[str, Form()] = "",
        category: Annotated[str, Form()] = "",
        main_category: Annotated[str, Form(description="empty: predicted from the photos")] = "",
        price: Annotated[float | None, Form()] = None,
        currency: Annotated[str, Form()] = "",
        location: Annotated[str, Form()] = "",
        listing_id: Annotated[str, Form(description="empty: assigned")] = "",
    ) -> ListingOut:
        photos = [photo(upload) for upload in images]
        if sum(map(len, photos)) > config.max_upload_bytes:
            raise EdgeError(
                413, "RESOURCE_EXHAUSTED", too_large(sum(map(len, photos)), config.max_upload_bytes)["detail"]
            )
        token = auth.credentials if auth is not None else ""
        return ListingOut.of(
            call(
                lambda: gateway.add(
                    photos,
                    title=title,
                    description=description,
                    category=category,
                    main_category=main_category,
                    price=price,
                    currency=currency,
                    location=location,
                    listing_id=listing_id,
                    write_token=token,
                )
            )
        )

    @app.delete(
        "/api/listings/{listing_id}",
        response_model=RemovedOut,
        responses=_WRITE_ERRORS,
        tags=["listings"],
        openapi_extra=_WRITE_SECURITY,
        summary="RemoveListing: a listing and its photos (write token)",
    )
    def remove_listing(
        listing_id: Annotated[str, PathParam()],
        auth: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> RemovedOut:
        token = auth.credentials if auth is not None else ""
        removed = call(lambda: gateway.remove(listing_id, write_token=token))
        return RemovedOut(listing_id=removed.listing_id, images_removed=removed.images_removed)

    return app
