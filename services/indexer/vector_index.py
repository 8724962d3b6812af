"""One collection: a FAISS index plus the id map and attribute columns, independent of gRPC.

Ids and slots
    Callers use string ids (image or listing UUIDs). Each stored vector gets an int64 *slot*,
    the label FAISS returns, which indexes the attribute columns (see ``attributes.py``).
    Slots are never reused before compaction, so a label can never point at the wrong item.

Index types and how each stores slots
    ``flat``      IndexIDMap2(IndexFlat): exact; deletes really remove vectors (O(n) memmove).
    ``ivf_flat``  IndexIVFFlat with the slots as its own ids and a hashtable direct map (so
                  vectors can be fetched and removed). Until it has been trained - by ``build``
                  on a sample, or online once enough vectors arrived - it keeps vectors in an
                  exact IndexIDMap2(IndexFlat) "staging" index, so it works from the first upsert.
    ``hnsw``      IndexHNSWFlat, where slot == position. HNSW cannot remove vectors, so deletes
                  and replacements leave tombstones that every search excludes through the same
                  IDSelector as the filters; ``compact`` rebuilds without them.

Concurrency
    Searches and fetches hold a shared lock; applying a write holds the exclusive lock, so a
    search sees a batch entirely or not at all. Writers are serialised by ``writer_lock``
    (the store holds it while it logs a batch and applies it). Slow work (IVF training,
    compaction) is done outside the exclusive lock and swapped in at the end.

Filters run inside FAISS: a boolean mask over slots becomes an ``IDSelectorBitmap`` in the
search parameters. For approximate indexes a very selective filter can starve the search; when
fewer than k results come back although k items match, the query is answered exactly instead
(IVF: probing every list; HNSW: brute force over the matching vectors), so filters still return
k items whenever k match.

Grouping by listing: search k' = 2k, keep the best item of each listing, and repeat with k'
four times larger for any query that has fewer than k distinct listings while more candidates
exist. It is exact for flat and never drops below k listings when k listings match.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import faiss
import numpy as np

from services.indexer.attributes import Attributes, AttributeTable
from services.indexer.errors import InvalidArgument, NotFound
from services.indexer.filters import Condition, compile_mask
from services.indexer.locks import ReadWriteLock
from services.indexer.spec import MAX_EF_SEARCH, CollectionSpec

MAX_ID_BYTES = 256
MIN_ONLINE_TRAIN = 10_000  # an IVF collection fed by upserts trains once it holds this many
EXACT_FALLBACK_MAX = 262_144  # HNSW: brute-force a starved filtered query up to this many matches
TRAIN_POINTS_PER_LIST = 64  # IVF training sample: this many vectors per list (FAISS wants >= 39)


@dataclass(frozen=True)
class Hit:
    """One neighbour: the stored id, its score (higher is better) and attributes."""

    id: str
    score: float
    attributes: Attributes


@dataclass(frozen=True)
class UpsertBatch:
    """A validated upsert, ready to be logged and applied (vectors already normalised)."""

    ids: list[str]
    vectors: np.ndarray
    attributes: list[Attributes]


@dataclass(frozen=True)
class UpsertResult:
    inserted: int
    replaced: int


@dataclass(frozen=True)
class DeleteResult:
    deleted: int
    not_found: list[str]


@dataclass(frozen=True)
class StoredItem:
    id: str
    vector: np.ndarray
    attributes: Attributes


DEFAULT_BLAS_THRESHOLD = 20
#: FAISS's ``distance_compute_blas_threshold`` that keeps every computation on its SIMD loop
#: (FAISS 1.15's own default is 128000).
_NEVER_BLAS = 1 << 30
_blas_from_queries = DEFAULT_BLAS_THRESHOLD


def tune_faiss(blas_threshold: int = DEFAULT_BLAS_THRESHOLD) -> None:
    """Process-wide FAISS setting: use BLAS for exact distance computations from this many
    queries up (``use_blas_for``). FAISS's SIMD loop is several times slower for batched
    queries here (batch 32 over 100k x 512: ~1.2 s vs ~0.14 s on one core); 20 is FAISS's
    long-standing value. Also speeds IVF training and assignment."""
    global _blas_from_queries
    _blas_from_queries = int(blas_threshold)
    faiss.cvar.distance_compute_blas_threshold = int(blas_threshold)


def use_blas_for(queries: int) -> None:
    """Before an exact distance computation for ``queries`` vectors: BLAS from the tuned number
    of queries up, FAISS's SIMD loop below it.

    FAISS 1.15 no longer compares its threshold with the number of queries: any value low
    enough for a batch of 20 to use BLAS also sends a single query through sgemm, which packs
    the whole database on every call. One query over 6k x 1280 took 5.2 ms of CPU that way
    against 2.5 ms on the SIMD loop, and a batch of 8 took 0.8 ms per query against 2.4 ms.
    The setting is process-wide, so concurrent searches of both kinds may now and then take
    the other path: that changes their speed, never their results."""
    faiss.cvar.distance_compute_blas_threshold = 1 if queries >= _blas_from_queries else _NEVER_BLAS


def auto_nlist(count: int) -> int:
    """IVF list count for ``count`` vectors: about sqrt(n), at least 39 training points per list."""
    return max(1, min(int(round(math.sqrt(max(count, 1)))), count // 39 if count >= 39 else 1, 65536))


def validate_ids(ids: Sequence[str]) -> list[str]:
    """Ids must be non-empty strings of at most 256 UTF-8 bytes, unique within one request."""
    checked: list[str] = []
    seen: set[str] = set()
    for position, item_id in enumerate(ids):
        if not isinstance(item_id, str) or not item_id:
            raise InvalidArgument(f"item {position}: id must be a non-empty string")
        if len(item_id.encode("utf-8")) > MAX_ID_BYTES:
            raise InvalidArgument(f"item {position}: id is longer than {MAX_ID_BYTES} bytes")
        if item_id in seen:
            raise InvalidArgument(f"item {position}: id {item_id!r} appears twice in one request")
        seen.add(item_id)
        checked.append(item_id)
    return checked


class VectorIndex:
    """A FAISS index for one collection with string ids, attributes, filters and grouping."""

    def __init__(
        self,
        spec: CollectionSpec,
        *,
        faiss_index: faiss.Index | None = None,
        table: AttributeTable | None = None,
        trained: bool = False,
    ) -> None:
        self.spec = spec
        self.writer_lock = threading.RLock()
        self._lock = ReadWriteLock()
        self._table = table if table is not None else AttributeTable()
        self._trained = trained if spec.index_type == "ivf_flat" else True
        self._index = faiss_index if faiss_index is not None else self._empty_index()
        self._alive_bits: np.ndarray | None = None

    # -- description ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dimension(self) -> int:
        return self.spec.dimension

    @property
    def count(self) -> int:
        return self._table.live_count

    @property
    def dead_count(self) -> int:
        return self._table.dead_count

    @property
    def slot_count(self) -> int:
        return self._table.size

    @property
    def trained(self) -> bool:
        return self._trained

    @property
    def raw_index(self) -> faiss.Index:
        """The underlying FAISS index (for benchmarks comparing against raw FAISS)."""
        return self._index

    @property
    def metric_type(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.spec.metric == "ip" else faiss.METRIC_L2

    @property
    def nlist(self) -> int:
        return int(self._index.nlist) if self._kind == "ivf" else 0

    @property
    def _kind(self) -> str:
        """How slots live in the FAISS index: 'idmap' (flat, untrained IVF), 'ivf' or 'hnsw'."""
        if self.spec.index_type == "hnsw":
            return "hnsw"
        if self.spec.index_type == "ivf_flat" and self._trained:
            return "ivf"
        return "idmap"

    def _empty_index(self) -> faiss.Index:
        d = self.spec.dimension
        if self.spec.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(d, self.spec.hnsw_m, self.metric_type)
            index.hnsw.efConstruction = self.spec.ef_construction
            index.hnsw.efSearch = self.spec.ef_search
            return index
        if self.spec.index_type == "ivf_flat" and self._trained:
            raise ValueError("a trained IVF index cannot be created empty; use build()")
        return faiss.IndexIDMap2(faiss.IndexFlat(d, self.metric_type))

    def _new_ivf(self, nlist: int) -> faiss.IndexIVFFlat:
        d = self.spec.dimension
        quantizer = faiss.IndexFlat(d, self.metric_type)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, self.metric_type)
        index.nprobe = min(self.spec.nprobe, nlist)
        return index

    # -- validation ----------------------------------------------------------------------------
    def as_vectors(self, vectors, what: str = "vector") -> np.ndarray:
        """A C-contiguous float32 (n, d) copy, checked for dimension and finiteness, normalised
        to unit length when the collection normalises. Raises InvalidArgument."""
        try:
            array = np.array(vectors, dtype=np.float32, copy=True)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{what}s must be numeric arrays of equal length: {exc}") from None
        if array.ndim == 1 and array.size == self.dimension:
            array = array[None, :]
        if array.ndim != 2 or (array.shape[0] and array.shape[1] != self.dimension):
            got = array.shape[-1] if array.ndim else 0
            raise InvalidArgument(
                f"{what} has dimension {got}; collection {self.name!r} expects {self.dimension}"
            )
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            raise InvalidArgument(f"{what} {int(np.argmin(finite))} has a non-finite value (NaN or inf)")
        if self.spec.normalize and len(array):
            norms = np.linalg.norm(array, axis=1)
            if not (norms > 0).all():
                raise InvalidArgument(
                    f"{what} {int(np.argmin(norms > 0))} is all zeros and cannot be "
                    f"normalised for cosine similarity"
                )
            array /= norms[:, None]
        return np.ascontiguousarray(array)

    def prepare_upsert(
        self, ids: Sequence[str], vectors, attributes: Sequence[Attributes] | None = None
    ) -> UpsertBatch:
        """Validate an upsert without changing anything (so it can be logged, then applied)."""
        checked_ids = validate_ids(ids)
        matrix = self.as_vectors(vectors if len(checked_ids) else np.zeros((0, self.dimension)))
        attrs = list(attributes) if attributes is not None else [Attributes()] * len(checked_ids)
        if not len(checked_ids) == len(matrix) == len(attrs):
            raise InvalidArgument(
                f"{len(checked_ids)} ids, {len(matrix)} vectors and {len(attrs)} attribute sets do not match"
            )
        for position, a in enumerate(attrs):
            if a.price is not None and not math.isfinite(a.price):
                raise InvalidArgument(f"item {position}: price must be a finite number")
        return UpsertBatch(checked_ids, matrix, attrs)

    def prepare_delete(self, ids: Sequence[str], strict: bool) -> tuple[list[str], list[str]]:
        """Split ids into (stored, unknown); in strict mode an unknown id raises NotFound."""
        stored: list[str] = []
        unknown: list[str] = []
        seen: set[str] = set()
        for item_id in ids:
            if item_id in seen:
                continue
            seen.add(item_id)
            (stored if item_id in self._table.slot_of else unknown).append(item_id)
        if strict and unknown:
            shown = ", ".join(repr(i) for i in unknown[:5])
            raise NotFound(
                f"{len(unknown)} id(s) not in collection {self.name!r}: {shown}"
                f"{' ...' if len(unknown) > 5 else ''}; nothing was deleted"
            )
        return stored, unknown

    # -- writes ----------------------------------------------------------------------------------
    def upsert(
        self, ids: Sequence[str], vectors, attributes: Sequence[Attributes] | None = None
    ) -> UpsertResult:
        """Insert or replace items (all or none). Not durable by itself: see IndexStore."""
        with self.writer_lock:
            return self.apply_upsert(self.prepare_upsert(ids, vectors, attributes))

    def delete(self, ids: Sequence[str], strict: bool = False) -> DeleteResult:
        with self.writer_lock:
            stored, unknown = self.prepare_delete(ids, strict)
            return DeleteResult(self.apply_delete(stored), unknown)

    def apply_upsert(self, batch: UpsertBatch) -> UpsertResult:
        """Apply a validated batch; cannot fail on valid input (it may already be in the WAL)."""
        with self.writer_lock:
            if not batch.ids:
                return UpsertResult(0, 0)
            table = self._table
            old = np.asarray([table.slot_of[i] for i in batch.ids if i in table.slot_of], dtype=np.int64)
            with self._lock.write():
                if len(old):
                    self._remove_slots(old)
                    table.kill(old)
                slots = table.append(batch.ids, batch.attributes)
                self._add(batch.vectors, slots)
                self._alive_bits = None
            if self._kind == "idmap" and self.spec.index_type == "ivf_flat":
                self._maybe_train_online()
            return UpsertResult(len(batch.ids) - len(old), len(old))

    def apply_delete(self, ids: Sequence[str]) -> int:
        with self.writer_lock:
            slots = np.asarray(
                [self._table.slot_of[i] for i in ids if i in self._table.slot_of], dtype=np.int64
            )
            if not len(slots):
                return 0
            with self._lock.write():
                self._remove_slots(slots)
                self._table.kill(slots)
                self._alive_bits = None
            return len(slots)

    def _add(self, vectors: np.ndarray, slots: np.ndarray) -> None:
        if self._kind == "hnsw":
            if self._index.ntotal != slots[0]:
                raise AssertionError("HNSW positions out of step with slots")
            self._index.add(vectors)
        else:
            self._index.add_with_ids(vectors, slots)

    def _remove_slots(self, slots: np.ndarray) -> None:
        kind = self._kind
        if kind == "idmap":
            self._index.remove_ids(faiss.IDSelectorBatch(slots))
        elif kind == "ivf":
            self._index.remove_ids(faiss.IDSelectorArray(slots))
        # hnsw: tombstone only; the dead slot stays in the graph and searches exclude it

    # -- bulk build, training, compaction ----------------------------------------------------------
    @classmethod
    def build(
        cls,
        spec: CollectionSpec,
        ids: Sequence[str],
        vectors,
        attributes: Sequence[Attributes] | None = None,
        *,
        train_size: int = 0,
        seed: int = 1234,
    ) -> "VectorIndex":
        """A new index holding these items; IVF is trained on a random sample first
        (``train_size`` vectors, default 64 per list)."""
        index = cls(spec)
        batch = index.prepare_upsert(ids, vectors, attributes)
        if spec.index_type == "ivf_flat":
            nlist = spec.nlist or auto_nlist(len(batch.ids))
            if len(batch.ids) >= nlist:
                index._index = index._trained_ivf(batch.vectors, nlist, train_size, seed)
                index._trained = True
        index.apply_upsert(batch)
        return index

    def _trained_ivf(self, vectors: np.ndarray, nlist: int, train_size: int, seed: int) -> faiss.IndexIVFFlat:
        ivf = self._new_ivf(nlist)
        take = min(len(vectors), train_size or TRAIN_POINTS_PER_LIST * nlist)
        if take < len(vectors):
            rows = np.sort(np.random.default_rng(seed).choice(len(vectors), take, replace=False))
            sample = vectors[rows]
        else:
            sample = vectors
        ivf.cp.seed = seed
        use_blas_for(len(sample))
        ivf.train(sample)
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return ivf

    def _maybe_train_online(self) -> None:
        """Turn the exact staging index into a trained IVF once it holds enough vectors.

        Training and filling run outside the exclusive lock (writers are held off by
        ``writer_lock``; searches keep using the staging index) and the new index is swapped in.
        """
        count = self._table.live_count
        nlist = self.spec.nlist or auto_nlist(count)
        if count < max(MIN_ONLINE_TRAIN, 39 * nlist):
            return
        slots = self._table.live_slots()
        vectors = self._index.reconstruct_batch(slots)
        ivf = self._trained_ivf(vectors, nlist, 0, 1234)
        ivf.add_with_ids(vectors, slots)
        with self._lock.write():
            self._index = ivf
            self._trained = True

    def needs_compaction(self, dead_fraction: float) -> bool:
        dead = self._table.dead_count
        return dead > 0 and dead >= dead_fraction * self._table.size

    def compact(self) -> bool:
        """Drop dead slots: renumber live items 0..n-1 (and rebuild HNSW without tombstones).

        Flat just rewrites the IDMap labels; IVF re-adds the vectors under the same centroids;
        HNSW rebuilds its graph, which is slow for large collections (writes wait meanwhile).
        """
        with self.writer_lock:
            if self._table.dead_count == 0:
                return False
            new_table, old_slots = self._table.compacted()
            new_slots = np.arange(len(old_slots), dtype=np.int64)
            kind = self._kind
            new_index = None
            if kind != "idmap":
                vectors = (
                    self._index.reconstruct_batch(old_slots)
                    if len(old_slots)
                    else np.zeros((0, self.dimension), np.float32)
                )
                if kind == "ivf":
                    new_index = self._ivf_like(self._index)
                    new_index.add_with_ids(vectors, new_slots)
                else:
                    new_index = self._empty_index()
                    new_index.add(vectors)
            with self._lock.write():
                if kind == "idmap":
                    remap = np.full(self._table.size, -1, dtype=np.int64)
                    remap[old_slots] = new_slots
                    labels = faiss.vector_to_array(self._index.id_map)
                    faiss.copy_array_to_vector(remap[labels], self._index.id_map)
                    self._index.construct_rev_map()
                else:
                    self._index = new_index
                self._table = new_table
                self._alive_bits = None
            return True

    def _ivf_like(self, ivf: faiss.IndexIVFFlat) -> faiss.IndexIVFFlat:
        """An empty IVF index with the same centroids (no retraining)."""
        new = self._new_ivf(int(ivf.nlist))
        new.quantizer.add(ivf.quantizer.reconstruct_n(0, int(ivf.nlist)))
        new.is_trained = True
        new.nprobe = ivf.nprobe
        new.set_direct_map_type(faiss.DirectMap.Hashtable)
        return new

    # -- reads -----------------------------------------------------------------------------------
    def search(
        self,
        queries,
        k: int,
        conditions: Iterable[Condition] = (),
        *,
        group_by_listing: bool = False,
        nprobe: int = 0,
        ef_search: int = 0,
    ) -> list[list[Hit]]:
        """k nearest neighbours of each query (best first) among items matching all conditions."""
        q = self.as_vectors(queries, "query")
        if k < 1:
            raise InvalidArgument(f"k must be at least 1 (got {k})")
        if ef_search < 0 or ef_search > MAX_EF_SEARCH:
            raise InvalidArgument(f"ef_search must be in 1..{MAX_EF_SEARCH} (got {ef_search})")
        conditions = tuple(conditions)
        with self._lock.read():
            if nprobe and self._kind == "ivf" and not 1 <= nprobe <= self.nlist:
                raise InvalidArgument(
                    f"nprobe must be in 1..{self.nlist} for collection {self.name!r} (got {nprobe})"
                )
            table = self._table
            mask = compile_mask(table, conditions) if conditions else None
            candidates = int(mask.sum()) if mask is not None else table.live_count
            if candidates == 0 or not len(q):
                return [[] for _ in range(len(q))]
            searcher = _Searcher(self, q, mask, candidates, nprobe, ef_search)
            if group_by_listing:
                rows = searcher.grouped(k)
            else:
                scores, labels = searcher.knn(np.arange(len(q)), min(k, candidates))
                rows = [_valid(scores[i], labels[i]) for i in range(len(q))]
            flip = -1.0 if self.spec.metric == "l2" else 1.0
            return [
                [
                    Hit(table.ids[slot], flip * float(score), table.attributes(slot))  # type: ignore[arg-type]
                    for score, slot in zip(s.tolist(), l.tolist())
                ]
                for s, l in rows
            ]

    def fetch(self, ids: Sequence[str]) -> tuple[list[StoredItem], list[str]]:
        """Stored vectors and attributes of known ids (request order) and the unknown ids."""
        with self._lock.read():
            table = self._table
            known = [(i, table.slot_of[i]) for i in ids if i in table.slot_of]
            missing = [i for i in ids if i not in table.slot_of]
            if not known:
                return [], missing
            slots = np.asarray([s for _, s in known], dtype=np.int64)
            vectors = self._index.reconstruct_batch(slots)
            items = [StoredItem(i, vectors[n], table.attributes(s)) for n, (i, s) in enumerate(known)]
            return items, missing

    def contains(self, item_id: str) -> bool:
        return item_id in self._table.slot_of

    def ids(self) -> list[str]:
        with self._lock.read():
            return [i for i in self._table.ids if i is not None]

    def list_ids(self, after: str, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` (id, listing id) pairs with id > ``after``, in ascending id order."""
        with self._lock.read():
            table = self._table
            chosen = sorted(i for i in table.slot_of if i > after)[:limit]
            return [(i, table.attributes(table.slot_of[i]).listing_id) for i in chosen]

    # -- persistence -------------------------------------------------------------------------------
    def save(self, directory: Path, stem: str) -> dict:
        """Write the FAISS index and the id/attribute files; returns their names and the state
        needed to load them. Call with the writer lock held so nothing changes meanwhile."""
        with self.writer_lock, self._lock.read():
            files = {"index": f"{stem}.faiss", "ids": f"{stem}.ids.json", "columns": f"{stem}.columns.npz"}
            faiss.write_index(self._index, str(directory / files["index"]))
            self._table.save(directory / files["ids"], directory / files["columns"])
            return {"files": files, "trained": self._trained, "count": self.count}

    @classmethod
    def load(cls, spec: CollectionSpec, directory: Path, entry: dict) -> "VectorIndex":
        """Read what ``save`` wrote; raises ValueError (or RuntimeError from FAISS) when the
        files are unreadable or disagree with each other or with the spec."""
        files = entry["files"]
        index = faiss.read_index(str(directory / files["index"]))
        table = AttributeTable.load(directory / files["ids"], directory / files["columns"])
        loaded = cls(spec, faiss_index=index, table=table, trained=bool(entry.get("trained", True)))
        loaded._check_consistent()
        return loaded

    def _check_consistent(self) -> None:
        index, table = self._index, self._table
        if index.d != self.dimension or index.metric_type != self.metric_type:
            raise ValueError(
                f"index has dimension {index.d} / metric {index.metric_type}, spec says "
                f"{self.dimension} / {self.spec.metric}"
            )
        expected = table.size if self._kind == "hnsw" else table.live_count
        if index.ntotal != expected:
            raise ValueError(f"index holds {index.ntotal} vectors but the id map expects {expected}")
        expected_type = {"idmap": faiss.IndexIDMap2, "ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}[
            self._kind
        ]
        if not isinstance(index, expected_type):
            raise ValueError(f"index is a {type(index).__name__}, expected {expected_type.__name__}")

    # -- used by _Searcher ---------------------------------------------------------------------
    def _alive_mask_bits(self) -> np.ndarray:
        if self._alive_bits is None:
            self._alive_bits = np.packbits(self._table.alive, bitorder="little")
        return self._alive_bits


def _valid(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = labels >= 0
    return scores[keep], labels[keep]


class _Searcher:
    """One search call: builds the FAISS selector/parameters once and answers k-NN requests,
    with the exact fallback for starved approximate queries."""

    def __init__(
        self,
        owner: VectorIndex,
        queries: np.ndarray,
        mask: np.ndarray | None,
        candidates: int,
        nprobe: int,
        ef_search: int,
    ) -> None:
        self.owner = owner
        self.index = owner._index
        self.kind = owner._kind
        self.queries = queries
        self.candidates = candidates
        self.nprobe = nprobe or (min(owner.spec.nprobe, owner.nlist) if self.kind == "ivf" else 0)
        self.ef_search = ef_search or owner.spec.ef_search
        tombstones = self.kind == "hnsw" and owner._table.dead_count > 0
        self.mask = mask if mask is not None else (owner._table.alive if tombstones else None)
        if mask is not None:
            self._bits = np.packbits(mask, bitorder="little")
        elif tombstones:
            self._bits = owner._alive_mask_bits()
        else:
            self._bits = None
        self.selector = (
            faiss.IDSelectorBitmap(len(self._bits), faiss.swig_ptr(self._bits))
            if self._bits is not None
            else None
        )

    def _params(self, k: int, exhaustive: bool = False):
        if self.kind == "ivf":
            params = faiss.SearchParametersIVF()
            params.nprobe = int(self.index.nlist) if exhaustive else self.nprobe
        elif self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(self.ef_search, k)
        elif self.selector is None:
            return None
        else:
            params = faiss.SearchParameters()
        if self.selector is not None:
            params.sel = self.selector
        return params

    def knn(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and slots (-1 padded) of the k best candidates for the given query rows."""
        q = self.queries[rows]
        params = self._params(k)
        use_blas_for(len(q))
        scores, labels = (
            self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)
        )
        if self.kind in ("ivf", "hnsw"):
            want = min(k, self.candidates)
            short = np.flatnonzero((labels >= 0).sum(axis=1) < want)
            if len(short):
                scores[short], labels[short] = self._exact(q[short], k)
        return scores, labels

    def _exact(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact answer for starved approximate queries (see the module docstring)."""
        use_blas_for(len(q))
        if self.kind == "ivf":
            return self.index.search(q, k, params=self._params(k, exhaustive=True))
        slots = (
            np.flatnonzero(self.mask).astype(np.int64)
            if self.mask is not None
            else self.owner._table.live_slots()
        )
        if len(slots) > EXACT_FALLBACK_MAX:
            params = self._params(k)
            params.efSearch = MAX_EF_SEARCH
            return self.index.search(q, k, params=params)
        vectors = self.index.reconstruct_batch(slots)
        scores = np.full((len(q), k), -np.inf if self.owner.spec.metric == "ip" else np.inf, np.float32)
        labels = np.full((len(q), k), -1, dtype=np.int64)
        got = min(k, len(slots))
        d, i = faiss.knn(q, vectors, got, metric=self.owner.metric_type)
        scores[:, :got] = d
        labels[:, :got] = np.where(i >= 0, slots[np.maximum(i, 0)], -1)
        return scores, labels

    def grouped(self, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Best item per listing, k listings per query (items without a listing stand alone)."""
        listing = self.owner._table.codes("listing_id")
        results: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self.queries)
        pending = np.arange(len(self.queries))
        depth = min(self.candidates, max(2 * k, k + 8))
        while len(pending):
            scores, labels = self.knn(pending, depth)
            unfinished = []
            for row, query in enumerate(pending.tolist()):
                s, l = _valid(scores[row], labels[row])
                keep = _best_per_group(l, listing, k)
                if len(keep) >= k or depth >= self.candidates or len(l) < depth:
                    results[query] = (s[keep], l[keep])
                else:
                    unfinished.append(query)
            pending = np.asarray(unfinished, dtype=np.int64)
            depth = min(self.candidates, depth * 4)
        return results  # type: ignore[return-value]


def _best_per_group(labels: np.ndarray, listing: np.ndarray, k: int) -> list[int]:
    """Positions (into ``labels``, best first) of the first item of each listing, at most k."""
    seen: set[int] = set()
    keep: list[int] = []
    for position, slot in enumerate(labels.tolist()):
        code = int(listing[slot])
        key = code if code else -1 - slot
        if key in seen:
            continue
        seen.add(key)
        keep.append(position)
        if len(keep) == k:
            break
    return keep
