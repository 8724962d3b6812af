"""Small in-process stand-ins for the embedder and the indexer, speaking the real protos.

They let the gateway's orchestration (filters, fan-out, merging, all-or-nothing writes, retries,
deadlines, round_robin) be tested in milliseconds without a model. The integration tests use the
real services.

FakeEmbedder: a photo's vector is a deterministic unit vector derived from its bytes (same bytes,
same vector); bytes starting with b"bad" are refused with INVALID_ARGUMENT. FakeIndexer: brute
force inner product over one dict per collection, with the indexer's filter semantics (checked
against the real indexer in test_fake_indexer_congruence.py).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter

import grpc
import numpy as np

from common.serving import Server, create_server
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from marketplace.indexer.v1 import indexer_pb2, indexer_pb2_grpc

CATEGORIES = ("Appliances", "Home & Garden", "Other Goods")
DIM = 16


def fake_vector(image: bytes, dim: int = DIM) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(image).digest()[:8], "big")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def near(image: bytes, noise_seed: int, amount: float = 0.3) -> np.ndarray:
    """A unit vector close to ``fake_vector(image)``."""
    noise = np.random.default_rng(noise_seed).standard_normal(DIM).astype(np.float32)
    vector = fake_vector(image) + amount * noise / np.linalg.norm(noise)
    return vector / np.linalg.norm(vector)


class Faults:
    """Failures to inject: the next ``n`` calls of a method answer ``code`` (or sleep ``delay``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.planned: dict[str, list[tuple[grpc.StatusCode | None, float]]] = {}
        self.calls: Counter = Counter()
        self.metadata: list[dict] = []
        self.time_remaining: list[float | None] = []

    def plan(
        self, method: str, code: grpc.StatusCode | None = None, times: int = 1, delay: float = 0.0
    ) -> None:
        with self.lock:
            self.planned.setdefault(method, []).extend([(code, delay)] * times)

    def enter(self, method: str, context) -> None:
        with self.lock:
            self.calls[method] += 1
            self.metadata.append({"method": method, **dict(context.invocation_metadata())})
            self.time_remaining.append(context.time_remaining())
            fault = self.planned.get(method, [])
            code, delay = fault.pop(0) if fault else (None, 0.0)
        if delay:
            time.sleep(delay)
        if code is not None:
            context.abort(code, f"injected {code.name} in {method}")


class FakeEmbedder(embedder_pb2_grpc.EmbedderServicer):
    def __init__(self, name: str = "embedder") -> None:
        self.name = name
        self.faults = Faults()

    def _vectors(self, images, context):
        if not images:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no images")
        for index, image in enumerate(images):
            if image.startswith(b"bad"):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"images[{index}] is not a decodable image: cannot identify image file",
                )
        return [fake_vector(image) for image in images]

    def Embed(self, request, context):
        self.faults.enter("Embed", context)
        vectors = self._vectors(request.images, context)
        return embedder_pb2.EmbedResponse(
            embeddings=[embedder_pb2.Vector(values=v.tolist()) for v in vectors], model_version="fake-1"
        )

    def Classify(self, request, context):
        self.faults.enter("Classify", context)
        vectors = self._vectors(request.images, context)
        top_k = min(request.top_k or 3, len(CATEGORIES))
        results = []
        for vector in vectors:
            logits = np.array([vector[i] * 4 for i in range(len(CATEGORIES))])
            probs = np.exp(logits) / np.exp(logits).sum()
            order = np.argsort(-probs)[:top_k]
            result = embedder_pb2.Classification(
                categories=[
                    embedder_pb2.CategoryScore(category=CATEGORIES[i], probability=float(probs[i]))
                    for i in order
                ]
            )
            if request.include_embeddings:
                result.embedding.values.extend(vector.tolist())
            results.append(result)
        return embedder_pb2.ClassifyResponse(results=results, model_version="fake-1")

    def GetModelInfo(self, request, context):
        self.faults.enter("GetModelInfo", context)
        return embedder_pb2.ModelInfo(
            backbone="fake",
            embedding_dim=DIM,
            categories=CATEGORIES,
            model_version="fake-1",
            input_size=8,
            modalities=["image"],
            max_batch=4,
            max_image_bytes=1 << 20,
        )


def _matches(attributes: indexer_pb2.Attributes, item_id: str, condition) -> bool:
    field = condition.field
    if field == "price":
        if not attributes.HasField("price"):
            return False
        rng = condition.range
        return (not rng.HasField("gte") or attributes.price >= rng.gte) and (
            not rng.HasField("lte") or attributes.price <= rng.lte
        )
    value = item_id if field == "id" else getattr(attributes, field)
    op = condition.WhichOneof("op")
    if op == "equals":
        return value == condition.equals
    if op == "any_of":
        return value in condition.any_of.values
    if op == "none_of":
        return value not in condition.none_of.values
    raise ValueError(op)


class FakeIndexer(indexer_pb2_grpc.IndexerServicer):
    def __init__(self) -> None:
        #: The "image" collection, which most tests look into; other collections are beside it.
        self.items: dict[str, tuple[np.ndarray, indexer_pb2.Attributes]] = {}
        self.collections: dict[str, dict[str, tuple[np.ndarray, indexer_pb2.Attributes]]] = {
            "image": self.items
        }
        self.lock = threading.Lock()
        self.faults = Faults()

    def _collection(self, name: str, context, *, create: bool = False) -> dict:
        if name not in self.collections:
            if not create:
                context.abort(grpc.StatusCode.NOT_FOUND, f"collection {name!r} does not exist")
            self.collections[name] = {}
        return self.collections[name]

    def Upsert(self, request, context):
        self.faults.enter("Upsert", context)
        inserted = replaced = 0
        with self.lock:
            items = self._collection(request.collection, context, create=True)
            for item in request.items:
                replaced += item.id in items
                inserted += item.id not in items
                items[item.id] = (np.asarray(item.vector, dtype=np.float32), item.attributes)
        return indexer_pb2.UpsertResponse(inserted=inserted, replaced=replaced)

    def Delete(self, request, context):
        self.faults.enter("Delete", context)
        with self.lock:
            items = self._collection(request.collection, context)
            found = [i for i in request.ids if i in items]
            for item_id in found:
                del items[item_id]
        return indexer_pb2.DeleteResponse(
            deleted=len(found), not_found=[i for i in request.ids if i not in found]
        )

    def Fetch(self, request, context):
        self.faults.enter("Fetch", context)
        with self.lock:
            items = self._collection(request.collection, context)
            found = [
                indexer_pb2.Item(id=i, vector=items[i][0].tolist(), attributes=items[i][1])
                for i in request.ids
                if i in items
            ]
            missing = [i for i in request.ids if i not in items]
        return indexer_pb2.FetchResponse(items=found, not_found=missing)

    def Search(self, request, context):
        self.faults.enter("Search", context)
        with self.lock:
            items = self._collection(request.collection, context)
            candidates = [
                (item_id, vector, attrs)
                for item_id, (vector, attrs) in items.items()
                if all(_matches(attrs, item_id, c) for c in request.filter.must)
            ]
        results = []
        for query in request.queries:
            q = np.asarray(query.values, dtype=np.float32)
            scored = sorted(
                ((float(vector @ q), item_id, attrs) for item_id, vector, attrs in candidates),
                key=lambda t: (-t[0], t[1]),
            )
            neighbors, seen = [], set()
            for score, item_id, attrs in scored:
                if request.group_by_listing:
                    if attrs.listing_id in seen:
                        continue
                    seen.add(attrs.listing_id)
                neighbors.append(indexer_pb2.Neighbor(id=item_id, score=score, attributes=attrs))
                if len(neighbors) == request.k:
                    break
            results.append(indexer_pb2.NeighborList(neighbors=neighbors))
        return indexer_pb2.SearchResponse(results=results)

    def GetStats(self, request, context):
        with self.lock:
            names = [request.collection] if request.collection else sorted(self.collections)
            counts = [len(self._collection(name, context)) for name in names]
        return indexer_pb2.GetStatsResponse(
            collections=[
                indexer_pb2.CollectionStats(
                    name=name, count=count, dimension=DIM, index_type="flat", metric="ip"
                )
                for name, count in zip(names, counts)
            ]
        )

    def ListIds(self, request, context):
        self.faults.enter("ListIds", context)
        with self.lock:
            stored = self._collection(request.collection or "image", context)
            size = request.page_size or 1024
            chosen = sorted(i for i in stored if i > request.page_token)
        page = chosen[:size]
        return indexer_pb2.ListIdsResponse(
            ids=[indexer_pb2.ListedId(id=i, listing_id=stored[i][1].listing_id) for i in page],
            next_page_token=page[-1] if len(chosen) > size else "",
        )


def serve_embedder(servicer: FakeEmbedder, address: str = "127.0.0.1:0") -> Server:
    def register(server):
        embedder_pb2_grpc.add_EmbedderServicer_to_server(servicer, server)
        return ["marketplace.embedder.v1.Embedder"]

    server = create_server(register, address)
    server.set_serving(True)
    return server


def serve_indexer(servicer: FakeIndexer, address: str = "127.0.0.1:0") -> Server:
    def register(server):
        indexer_pb2_grpc.add_IndexerServicer_to_server(servicer, server)
        return ["marketplace.indexer.v1.Indexer"]

    server = create_server(register, address)
    server.set_serving(True)
    return server
