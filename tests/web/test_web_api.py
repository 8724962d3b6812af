"""The edge's JSON API against the real stack (`conftest.web_stack`): every gateway RPC through
HTTP, gRPC errors as HTTP codes with the gateway's words, photos from the image store, writes
behind the gateway's token, bad uploads, and a dead gateway."""

from __future__ import annotations

import httpx
import pytest

from tests.web.conftest import UPLOAD_LIMIT_MB, WRITE_TOKEN, photo_of, start_edge
from scripts.stack import free_port

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def http(web_stack):
    with httpx.Client(base_url=web_stack.url, timeout=120) as client:
        yield client


def some_listing(web_stack, index: int = 0) -> str:
    return web_stack.listings["product_id"].iloc[index]


def jpeg(files_field: str, data: bytes, name: str = "photo.jpg", kind: str = "image/jpeg"):
    return {files_field: (name, data, kind)}


def test_the_page_and_its_assets_load(http):
    page = http.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Marketplace visual search" in page.text and 'for="photo"' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert http.get(asset).status_code == 200
    spec = http.get("/openapi.json").json()
    assert {
        "/predict/image",
        "/api/search/image",
        "/api/search/text",
        "/api/search",
        "/api/listings/{listing_id}/similar",
        "/api/recommend",
        "/api/listings",
        "/api/classify",
        "/api/images/{image_id}",
    } <= set(spec["paths"])


def test_health_says_the_gateway_is_ready(http):
    assert http.get("/api/health").json() == {"edge": "SERVING", "gateway": "SERVING", "ready": True}


def test_predict_image_answers_like_the_original_project(http, web_stack):
    _, photo = photo_of(web_stack, some_listing(web_stack))
    answer = http.post("/predict/image", files=jpeg("image", photo))
    assert answer.status_code == 200
    body = answer.json()
    assert set(body) == {"Category", "Probability"}
    full = http.post("/api/classify", params={"top_k": 13}, files=jpeg("image", photo)).json()
    assert body["Category"] == full["categories"][0]["category"]
    assert body["Probability"] == pytest.approx(full["categories"][0]["probability"])
    probabilities = [c["probability"] for c in full["categories"]]
    assert len(probabilities) == 13 and probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


def test_categories_are_the_models(http):
    categories = http.get("/api/categories").json()["categories"]
    assert len(categories) == 13 and categories == sorted(categories)
    assert "Home & Garden" in categories


def test_search_by_a_catalogue_photo_finds_its_listing_and_its_photo_is_served(http, web_stack):
    listing_id = some_listing(web_stack, 4)
    image_id, photo = photo_of(web_stack, listing_id)
    results = http.post("/api/search/image", params={"k": 6}, files=jpeg("image", photo)).json()["results"]
    assert [r["rank"] for r in results] == [1, 2, 3, 4, 5, 6]
    top = results[0]
    assert (top["listing"]["id"], top["matched_image_id"]) == (listing_id, image_id)
    assert top["score"] == pytest.approx(1.0, abs=1e-3)
    assert top["image_url"] == f"/api/images/{image_id}"
    served = http.get(top["image_url"])
    assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
    assert served.content == photo


def test_filters_reach_the_gateway(http, web_stack):
    _, photo = photo_of(web_stack, some_listing(web_stack))
    results = http.post(
        "/api/search/image",
        params={"k": 10, "main_category": "Home & Garden", "max_price": 500},
        files=jpeg("image", photo),
    ).json()["results"]
    assert results and all(r["listing"]["main_category"] == "Home & Garden" for r in results)
    assert all(r["listing"]["price"] is not None and r["listing"]["price"] <= 500 for r in results)
    bad = http.get("/api/search/text", params={"q": "table", "min_price": 50, "max_price": 10})
    assert bad.status_code == 400
    assert bad.json() == {
        "code": "INVALID_ARGUMENT",
        "detail": "filter.min_price 50 is greater than filter.max_price 10",
    }


def test_text_and_hybrid_search(http, web_stack):
    text = http.get("/api/search/text", params={"q": "sofa", "k": 5}).json()["results"]
    assert len(text) == 5 and all(r["matched_image_id"] == "" for r in text)
    assert all(r["image_url"] == f"/api/images/{r['listing']['image_ids'][0]}" for r in text)
    _, photo = photo_of(web_stack, some_listing(web_stack, 7))
    image_only = http.post("/api/search/image", params={"k": 5}, files=jpeg("image", photo))
    as_image = http.post(
        "/api/search", params={"k": 5}, files=jpeg("image", photo), data={"text": "sofa", "text_weight": "0"}
    )
    as_text = http.post(
        "/api/search", params={"k": 5}, files=jpeg("image", photo), data={"text": "sofa", "text_weight": "1"}
    )
    ids = lambda reply: [r["listing"]["id"] for r in reply.json()["results"]]  # noqa: E731
    assert ids(as_image) == ids(image_only)
    assert ids(as_text) == [r["listing"]["id"] for r in text]
    only_text = http.post("/api/search", params={"k": 5}, data={"text": "sofa"})
    assert ids(only_text) == ids(as_text)
    nothing = http.post("/api/search", data={"text": " "})
    assert nothing.status_code == 400 and "send an image, a text query, or both" in nothing.text


def test_similar_listings_and_get_listing(http, web_stack):
    listing_id = some_listing(web_stack, 10)
    listing = http.get(f"/api/listings/{listing_id}").json()
    row = web_stack.listings[web_stack.listings["product_id"] == listing_id].iloc[0]
    assert (listing["title"], listing["main_category"]) == (row["title"], row["main_category"])
    assert listing["image_urls"] == [f"/api/images/{i}" for i in listing["image_ids"]]
    similar = http.get(f"/api/listings/{listing_id}/similar", params={"k": 5}).json()["results"]
    assert len(similar) == 5 and listing_id not in {r["listing"]["id"] for r in similar}
    missing = http.get("/api/listings/no-such-listing")
    assert missing.status_code == 404
    assert missing.json() == {"code": "NOT_FOUND", "detail": "listing no-such-listing not found"}


def test_recommend_follows_likes(http, web_stack):
    liked = [some_listing(web_stack, 0)]
    first = http.post("/api/recommend", json={"liked": liked, "k": 8}).json()["results"]
    assert len(first) == 8 and liked[0] not in {r["listing"]["id"] for r in first}
    liked.append(some_listing(web_stack, 20))
    second = http.post(
        "/api/recommend", json={"liked": liked, "skipped": [first[0]["listing"]["id"]], "k": 8}
    ).json()["results"]
    assert [r["listing"]["id"] for r in second] != [r["listing"]["id"] for r in first]
    assert not set(liked) & {r["listing"]["id"] for r in second}
    unknown = http.post("/api/recommend", json={"liked": ["nope"]})
    assert unknown.status_code == 404 and "nope" in unknown.json()["detail"]
    empty = http.post("/api/recommend", json={"liked": []})
    assert empty.status_code == 400 and "like at least one listing" in empty.json()["detail"]


def test_bad_uploads_are_refused_in_words(http):
    text_file = http.post(
        "/predict/image", files=jpeg("image", b"just some text\n", "notes.txt", "text/plain")
    )
    assert text_file.status_code == 400
    assert text_file.json()["code"] == "INVALID_ARGUMENT"
    assert "image" in text_file.json()["detail"].lower()
    empty = http.post("/api/search/image", files=jpeg("image", b""))
    assert empty.status_code == 400 and "image is empty" in empty.json()["detail"]
    too_big = http.post("/api/classify", files=jpeg("image", b"\xff" * (UPLOAD_LIMIT_MB * 2**20 + 1)))
    assert too_big.status_code == 413 and "the limit is" in too_big.json()["detail"]
    k_too_big = http.get("/api/search/text", params={"q": "chair", "k": 1000})
    assert k_too_big.status_code == 400 and "k must be between 1 and 100" in k_too_big.text


def test_photo_ids_cannot_leave_the_store(http, web_stack):
    secret = web_stack.root / "secret.txt"
    secret.write_text("do not serve")
    for path in (
        "/api/images/..%2Fsecret.txt",
        "/api/images/%2e%2e",
        "/api/images/.hidden",
        "/api/images/no-such-photo",
    ):
        reply = http.get(path)
        assert reply.status_code == 404, path
        assert "do not serve" not in reply.text


def test_writes_need_the_token_and_keep_the_photos(http, web_stack):
    _, photo = photo_of(web_stack, some_listing(web_stack, 30))
    form = {
        "title": "Web edge test chair",
        "price": "12.5",
        "location": "Leeds, West Yorkshire",
        "main_category": "Home & Garden",
    }
    files = [("images", ("chair.jpg", photo, "image/jpeg"))]
    anonymous = http.post("/api/listings", data=form, files=files)
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "UNAUTHENTICATED"
    wrong = http.post("/api/listings", data=form, files=files, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 403 and wrong.json()["code"] == "PERMISSION_DENIED"
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}
    added = http.post("/api/listings", data=form, files=files, headers=auth)
    assert added.status_code == 201, added.text
    listing = added.json()
    assert listing["title"] == "Web edge test chair" and listing["price"] == 12.5
    (image_id,) = listing["image_ids"]
    assert http.get(f"/api/images/{image_id}").content == photo  # kept, not dropped
    again = http.post("/api/listings", data={**form, "listing_id": listing["id"]}, files=files, headers=auth)
    assert again.status_code == 409 and listing["id"] in again.json()["detail"]
    assert http.delete(f"/api/listings/{listing['id']}").status_code == 401
    removed = http.delete(f"/api/listings/{listing['id']}", headers=auth)
    assert removed.json() == {"listing_id": listing["id"], "images_removed": 1}
    assert http.get(f"/api/images/{image_id}").status_code == 404
    assert http.get(f"/api/listings/{listing['id']}").status_code == 404


def test_a_dead_gateway_is_503_and_the_page_still_loads(web_stack):
    edge = start_edge(web_stack.root, f"127.0.0.1:{free_port()}", web_stack.store, "web-dead")
    try:
        with httpx.Client(base_url=f"http://{edge.address}", timeout=60) as client:
            assert client.get("/").status_code == 200
            assert client.get("/api/health").json()["ready"] is False
            reply = client.get("/api/search/text", params={"q": "chair"})
            assert reply.status_code == 503
            assert reply.json()["code"] == "UNAVAILABLE"
            assert "not reachable" in reply.json()["detail"]
    finally:
        edge.stop()


def test_a_shard_down_partial_results_name_it_and_without_the_option_503(web_stack):
    """A gateway whose shard 1 has no live replica, behind its own edge: with
    allow_partial_results the JSON answer holds shard 0's listings, missing_shards [1] and the
    notice in words; without it 503 naming the shard."""
    from dataclasses import replace

    from services.gateway.server import start as start_gateway
    from services.gateway.shards import shard_of

    config = web_stack.gateway_config
    gateway = start_gateway(
        replace(
            config,
            port=0,
            bootstrap_dir=None,
            readiness_interval_s=0,
            indexer_addrs=(config.indexer_addrs[0], f"127.0.0.1:{free_port()}"),
        )
    )
    edge = start_edge(web_stack.root, f"127.0.0.1:{gateway.port}", web_stack.store, "web-partial")
    on_shard_0 = next(i for i in web_stack.listings["product_id"] if shard_of(i, 2) == 0)
    try:
        with httpx.Client(base_url=f"http://{edge.address}", timeout=120) as client:
            answers = {
                "text": client.get(
                    "/api/search/text", params={"q": "chair", "k": 5, "allow_partial_results": "true"}
                ),
                "similar": client.get(
                    f"/api/listings/{on_shard_0}/similar", params={"k": 5, "allow_partial_results": "true"}
                ),
                "recommend": client.post(
                    "/api/recommend", json={"liked": [on_shard_0], "k": 5, "allow_partial_results": True}
                ),
            }
            for name, reply in answers.items():
                assert reply.status_code == 200, (name, reply.text)
                body = reply.json()
                assert body["missing_shards"] == [1], name
                assert "index shard 1 is unavailable" in body["notice"], name
                assert body["results"], name
                assert all(shard_of(r["listing"]["id"], 2) == 0 for r in body["results"]), name
            refused = client.get("/api/search/text", params={"q": "chair", "k": 5})
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "UNAVAILABLE"
            assert "shard 1" in refused.json()["detail"]
            complete = httpx.get(
                f"{web_stack.url}/api/search/text",
                timeout=120,
                params={"q": "chair", "k": 5, "allow_partial_results": "true"},
            ).json()
            assert complete["missing_shards"] == [] and complete["notice"] == ""
    finally:
        edge.stop()
        gateway.stop(0)
