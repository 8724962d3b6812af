"""What a collection is: its name, vector dimension, FAISS index type, metric and index knobs.

A spec is written in configuration as ``name:dim[:type[:metric[:key=value...]]]``, e.g.
``image:1280:flat:ip`` or ``image:512:ivf_flat:ip:nlist=1024:nprobe=32`` or
``image:512:hnsw:ip:m=32:ef_construction=80:ef_search=64``. It is also stored (as JSON) in
snapshots and in the write-ahead log, so a data directory describes itself.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields, replace

from services.indexer.errors import InvalidArgument

INDEX_TYPES = ("flat", "ivf_flat", "hnsw")
METRICS = ("ip", "l2")
DEFAULT_COLLECTION = "image"
MAX_DIMENSION = 65536
MAX_EF_SEARCH = 4096
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEYS = {
    "nlist": "nlist",
    "nprobe": "nprobe",
    "m": "hnsw_m",
    "hnsw_m": "hnsw_m",
    "ef_construction": "ef_construction",
    "ef_search": "ef_search",
    "normalize": "normalize",
}


@dataclass(frozen=True)
class CollectionSpec:
    """One named vector space.

    ``normalize`` (default: true for ``ip``, false for ``l2``) scales stored vectors and queries
    to unit length, so ``ip`` scores are cosine similarities. ``nlist`` 0 means "choose from the
    catalogue size when the IVF index is trained" (about sqrt(n)). ``nprobe`` and ``ef_search``
    are the per-collection defaults that a request may override within bounds.
    """

    name: str
    dimension: int
    index_type: str = "flat"
    metric: str = "ip"
    normalize: bool | None = None
    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64

    def __post_init__(self) -> None:
        if self.normalize is None:
            object.__setattr__(self, "normalize", self.metric == "ip")
        problems = []
        if not _NAME.match(self.name or ""):
            problems.append(f"name {self.name!r} must be 1-64 characters of letters, digits, _ . -")
        if not 1 <= self.dimension <= MAX_DIMENSION:
            problems.append(f"dimension {self.dimension} must be in 1..{MAX_DIMENSION}")
        if self.index_type not in INDEX_TYPES:
            problems.append(f"index type {self.index_type!r} must be one of {', '.join(INDEX_TYPES)}")
        if self.metric not in METRICS:
            problems.append(f"metric {self.metric!r} must be one of {', '.join(METRICS)}")
        if self.nlist < 0 or self.nprobe < 1 or self.hnsw_m < 2:
            problems.append("nlist must be >= 0, nprobe >= 1 and m >= 2")
        if not 1 <= self.ef_search <= MAX_EF_SEARCH or self.ef_construction < 1:
            problems.append(f"ef_search must be in 1..{MAX_EF_SEARCH} and ef_construction >= 1")
        if problems:
            raise InvalidArgument(f"collection spec {self.name!r}: " + "; ".join(problems))

    @classmethod
    def parse(cls, text: str) -> "CollectionSpec":
        """Parse ``name:dim[:type[:metric[:key=value...]]]``; raises InvalidArgument."""
        parts = [p.strip() for p in text.strip().split(":")]
        if len(parts) < 2:
            raise InvalidArgument(f"collection spec {text!r} must look like name:dim[:type[:metric]]")
        try:
            dimension = int(parts[1])
        except ValueError:
            raise InvalidArgument(
                f"collection spec {text!r}: dimension {parts[1]!r} is not an integer"
            ) from None
        kwargs: dict[str, object] = {"name": parts[0], "dimension": dimension}
        if len(parts) > 2 and parts[2]:
            kwargs["index_type"] = parts[2]
        if len(parts) > 3 and parts[3]:
            kwargs["metric"] = parts[3]
        for option in parts[4:]:
            key, _, value = option.partition("=")
            if key not in _KEYS or not value:
                raise InvalidArgument(
                    f"collection spec {text!r}: unknown option {option!r} (known: {', '.join(sorted(_KEYS))})"
                )
            try:
                kwargs[_KEYS[key]] = (
                    (value.lower() in {"1", "true", "yes"}) if key == "normalize" else int(value)
                )
            except ValueError:
                raise InvalidArgument(
                    f"collection spec {text!r}: {key}={value!r} is not an integer"
                ) from None
        return cls(**kwargs)  # type: ignore[arg-type]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "CollectionSpec":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def with_changes(self, **changes) -> "CollectionSpec":
        return replace(self, **changes)


def parse_collections(text: str) -> list[CollectionSpec]:
    """Parse a comma-separated list of specs; duplicate names are an error."""
    specs = [CollectionSpec.parse(item) for item in text.split(",") if item.strip()]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InvalidArgument(f"collection(s) configured twice: {', '.join(duplicates)}")
    return specs
