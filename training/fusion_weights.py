"""Choose the gateway's fusion weights on the valid split and write them into the artefact.

    python -m training.fusion_weights --data build/data --artifact artifacts/<run> [--out DIR]

(`training.text` runs this after fitting the text heads, so ``training.train --text ...`` and a
text refit do it too.) Two text weights ``w`` of the weighted-cosine fusion ``(1 - w) * photo +
w * text`` are chosen, each over ``WEIGHT_GRID`` (0.0, 0.1, ..., 1.0; ties: the smaller weight),
from the artefact's exported vectors (``embeddings/image_embeddings.npy`` of every catalogue photo,
``embeddings/text_embeddings.npy`` of every listing) with the gateway's ranking recomputed in
NumPy (each modality's top ``max(3k, 50)`` listings; a listing missing from one list takes that
list's lowest score):

* ``similar_text_weight`` (SimilarListings): for each valid listing, the other listings ranked by
  its photos (a listing's photo score is its best inner product with any of the query listing's
  photos) and its text; same-category precision@10.
* ``search_text_weight`` (hybrid Search): for each valid listing, the query is its first photo and
  its *title* (embedded as the gateway embeds a text query, `common.text.listing_text(title)`),
  the listing itself left out of the results (a buyer's photo of an item is not in the catalogue);
  same-category precision@10 of the fused top 10.

Only valid listings are queries; the test split is never looked at. Written: ``fusion_weights.json``
(`common.fusion_weights.FusionWeights`, naming the image model version it was chosen for) and
``fusion_weights.png`` (both valid curves, the choices marked).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common.artifact import (
    EMBEDDINGS_DIR,
    FUSION_WEIGHTS_PLOT_FILE,
    IMAGE_EMBEDDINGS_FILE,
    read_card,
    read_image_embeddings,
    read_text_embeddings,
)
from common.fusion_weights import FusionWeights
from common.text import TEXT_MODEL_NAME, listing_text

log = logging.getLogger("training.fusion_weights")

K = 10
#: The text weights tried on the valid split.
WEIGHT_GRID = tuple(round(0.1 * i, 1) for i in range(11))
SEARCH_MEASURE = (
    f"same-category precision@{K} of hybrid Search, query = a valid listing's first "
    "photo + its title, the listing itself excluded"
)
SIMILAR_MEASURE = (
    f"same-category precision@{K} of SimilarListings, query = a valid listing "
    "(its photos + its text), itself excluded"
)


class SimilarityData:
    """Photo and text vectors of the catalogue, indexed for the per-listing scores."""

    def __init__(
        self,
        listings: pd.DataFrame,
        image_ids: list[str],
        image_vectors: np.ndarray,
        photo_listing: dict[str, str],
        text_ids: list[str],
        text_vectors: np.ndarray,
    ) -> None:
        keep = [i for i, image_id in enumerate(image_ids) if image_id in photo_listing]
        self.image_vectors = np.asarray(image_vectors[keep], dtype=np.float32)
        owners = [photo_listing[image_ids[i]] for i in keep]
        self.listing_ids = sorted(set(owners) | set(text_ids))
        self.row = {listing_id: i for i, listing_id in enumerate(self.listing_ids)}
        self.photo_owner = np.array([self.row[o] for o in owners], dtype=np.int64)
        photos_of: dict[int, list[int]] = {}
        for photo, owner in enumerate(self.photo_owner):
            photos_of.setdefault(int(owner), []).append(photo)
        self.photos_of = {o: np.asarray(p) for o, p in photos_of.items()}
        self.text = np.zeros((len(self.listing_ids), text_vectors.shape[1]), dtype=np.float32)
        self.has_text = np.zeros(len(self.listing_ids), dtype=bool)
        for listing_id, vector in zip(text_ids, text_vectors):
            self.text[self.row[listing_id]] = vector
            self.has_text[self.row[listing_id]] = True
        category = dict(zip(listings["product_id"], listings["main_category"]))
        self.category = np.array([category.get(i, "") for i in self.listing_ids])

    def _photo_scores(self, query_photos: np.ndarray) -> np.ndarray:
        image = np.full(len(self.listing_ids), -np.inf, dtype=np.float32)
        per_photo = (self.image_vectors[query_photos] @ self.image_vectors.T).max(axis=0)
        np.maximum.at(image, self.photo_owner, per_photo)
        return image

    def _text_scores(self, query: np.ndarray) -> np.ndarray:
        return np.where(self.has_text, self.text @ query, -np.inf).astype(np.float32)

    def scores(self, listing_id: str) -> tuple[np.ndarray, np.ndarray]:
        """SimilarListings: (photo score, text score) of every catalogue listing for one query
        listing; -inf where a listing has no photo / no text, and for the query listing itself."""
        q = self.row[listing_id]
        image = (
            self._photo_scores(self.photos_of[q])
            if q in self.photos_of
            else np.full(len(self.listing_ids), -np.inf, dtype=np.float32)
        )
        text = self._text_scores(self.text[q])
        image[q] = text[q] = -np.inf
        return image, text

    def search_scores(self, listing_id: str, title_vector: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hybrid Search: (photo score, text score) of every catalogue listing for the query
        (the listing's first photo, its title's text vector), the listing itself at -inf."""
        q = self.row[listing_id]
        image = self._photo_scores(self.photos_of[q][:1])
        text = self._text_scores(np.asarray(title_vector, dtype=np.float32))
        image[q] = text[q] = -np.inf
        return image, text


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    finite = np.flatnonzero(np.isfinite(scores))
    return finite[np.argsort(-scores[finite], kind="stable")[:n]]


def rankings(image: np.ndarray, text: np.ndarray, k: int, weights) -> dict:
    """{weight: rows of the top-k listings}: ``None`` ranks by photos alone (as does any weight
    when there is no photo score), else the gateway's weighted-cosine fusion of each modality's
    top ``max(3k, 50)``."""
    out: dict = {}
    fused_weights = [w for w in weights if w is not None]
    if None in weights:
        out[None] = _top(image, k)
    if not fused_weights:
        return out
    if not np.isfinite(image).any():
        return out | {w: _top(text, k) for w in fused_weights}
    n = max(3 * k, 50)
    top_image, top_text = _top(image, n), _top(text, n)
    if len(top_text) == 0:
        return out | {w: top_image[:k] for w in fused_weights}
    candidates = np.union1d(top_image, top_text)
    image_part = np.full(len(candidates), image[top_image].min())
    text_part = np.full(len(candidates), text[top_text].min())
    in_image, in_text = np.isin(candidates, top_image), np.isin(candidates, top_text)
    image_part[in_image] = image[candidates[in_image]]
    text_part[in_text] = text[candidates[in_text]]
    for w in fused_weights:
        fused = (1 - w) * image_part + w * text_part
        out[w] = candidates[np.argsort(-fused, kind="stable")[:k]]
    return out


def similar_ranking(image: np.ndarray, text: np.ndarray, k: int, text_weight: float | None) -> np.ndarray:
    """Rows of the top-k listings for one weight (see `rankings`)."""
    return rankings(image, text, k, [text_weight])[text_weight]


def _precision(data: SimilarityData, query_ids: list[str], weights, k: int, scores_of) -> dict:
    hits: dict = {w: [] for w in weights}
    for listing_id in query_ids:
        image, text = scores_of(listing_id)
        own = data.category[data.row[listing_id]]
        for w, top in rankings(image, text, k, list(weights)).items():
            hits[w].append(float(np.mean(data.category[top] == own)) if len(top) else 0.0)
    return {w: float(np.mean(v)) if v else float("nan") for w, v in hits.items()}


def offline_precision(data: SimilarityData, query_ids: list[str], weights, k: int = K) -> dict:
    """SimilarListings: {weight (None = photos only): same-category precision@k} over the query
    listings."""
    return _precision(data, query_ids, weights, k, data.scores)


def search_precision(
    data: SimilarityData, query_ids: list[str], title_vectors: dict[str, np.ndarray], weights, k: int = K
) -> dict:
    """Hybrid Search: {weight: same-category precision@k} of (first photo + title) queries."""
    return _precision(
        data,
        query_ids,
        weights,
        k,
        lambda listing_id: data.search_scores(listing_id, title_vectors[listing_id]),
    )


def best_weight(curve: dict) -> float:
    """The grid weight with the best value (ties: the smaller weight)."""
    return max(WEIGHT_GRID, key=lambda w: (round(curve[w], 6), -w))


def choose_weight(data: SimilarityData, valid_ids: list[str]) -> tuple[float, dict]:
    """The SimilarListings text weight with the best valid precision@10, and the curve."""
    curve = offline_precision(data, valid_ids, WEIGHT_GRID)
    return best_weight(curve), curve


def choose_fusion_weights(
    data: SimilarityData, valid_ids: list[str], title_vectors: dict[str, np.ndarray], image_model_version: str
) -> FusionWeights:
    """Both weights chosen on the valid listings (those with a photo), with their curves."""
    queries = [i for i in valid_ids if data.row.get(i) in data.photos_of]
    if not queries:
        raise ValueError("no valid-split listing has an exported photo embedding to query with")
    similar = offline_precision(data, queries, WEIGHT_GRID)
    search = search_precision(data, queries, title_vectors, WEIGHT_GRID)
    return FusionWeights(
        search_text_weight=best_weight(search),
        similar_text_weight=best_weight(similar),
        image_model_version=image_model_version,
        text_model=TEXT_MODEL_NAME,
        chosen_on="valid",
        measures={"search": SEARCH_MEASURE, "similar": SIMILAR_MEASURE},
        valid_curves={
            "search": {f"{w:.1f}": round(p, 6) for w, p in search.items()},
            "similar": {f"{w:.1f}": round(p, 6) for w, p in similar.items()},
        },
        valid_queries=len(queries),
    )


def plot_curves(weights: FusionWeights, path: Path) -> None:
    """The two valid curves (precision@10 against the text weight), the choices marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for key, label, chosen in (
        ("search", "hybrid Search (photo + title)", weights.search_text_weight),
        ("similar", "SimilarListings (photos + text)", weights.similar_text_weight),
    ):
        curve = {float(w): p for w, p in weights.valid_curves[key].items()}
        (line,) = ax.plot(list(curve), list(curve.values()), marker="o", ms=3, label=label)
        ax.plot([chosen], [curve[chosen]], marker="*", ms=14, color=line.get_color())
        ax.annotate(
            f"w = {chosen:.1f}",
            (chosen, curve[chosen]),
            textcoords="offset points",
            xytext=(6, 6),
            color=line.get_color(),
        )
    ax.set_xlabel("text weight w   (score = (1 - w) photo cosine + w text cosine)")
    ax.set_ylabel(f"same-category precision@{K}, valid")
    ax.set_title(
        f"Fusion weights chosen on valid ({weights.valid_queries} listings)\n"
        f"image model {weights.image_model_version}",
        fontsize=9,
    )
    ax.margins(y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower center", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def load_image_embeddings(artifact_dir: Path) -> tuple[list[str], np.ndarray] | None:
    """(image ids, vectors) the artefact exports for the catalogue; None when it has none."""
    try:
        return read_image_embeddings(artifact_dir)
    except FileNotFoundError:
        return None


def fit(
    data_dir: Path,
    artifact_dir: Path,
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    listings: pd.DataFrame | None = None,
    images: pd.DataFrame | None = None,
    text_ids: list[str] | None = None,
    text_vectors: np.ndarray | None = None,
) -> FusionWeights | None:
    """Choose the weights for the artefact's image model and write ``fusion_weights.json`` and
    ``fusion_weights.png`` into ``out_dir``. Returns None (and writes nothing) when the artefact
    exports no image embeddings to rank with."""
    from common.prepared_data.frames import load_prepared
    from training.text import DEFAULT_CACHE_DIR, embed_texts, listing_splits

    started = time.perf_counter()
    artifact_dir, out_dir = Path(artifact_dir), Path(out_dir)
    photos = load_image_embeddings(artifact_dir)
    if photos is None:
        log.warning(
            "%s exports no image embeddings: no fusion weights chosen (the gateway keeps "
            "its built-in defaults)",
            artifact_dir,
        )
        return None
    if listings is None or images is None:
        listings, images, _ = load_prepared(data_dir)
    if text_vectors is None:
        loaded = read_text_embeddings(out_dir)
        if loaded is None:
            raise FileNotFoundError(f"{out_dir} has no text embeddings; run `python -m training.text` first")
        text_ids, text_vectors = loaded
    card = read_card(artifact_dir)
    data = SimilarityData(
        listings,
        photos[0],
        photos[1],
        dict(zip(images["image_id"], images["product_id"])),
        list(text_ids),
        np.asarray(text_vectors, dtype=np.float32),
    )
    split = listing_splits(images)
    valid_ids = sorted(pid for pid, s in split.items() if s == "valid")
    titles = dict(zip(listings["product_id"], listings["title"]))
    vectors = embed_texts(
        [listing_text(titles[i]) for i in valid_ids], cache_dir=cache_dir or DEFAULT_CACHE_DIR
    )
    weights = choose_fusion_weights(
        data, valid_ids, dict(zip(valid_ids, vectors)), str(card["model_version"])
    )
    weights.save(out_dir)
    plot_curves(weights, out_dir / FUSION_WEIGHTS_PLOT_FILE)
    log.info(
        "fusion weights on %d valid listings (%.0f s): hybrid Search w=%.1f, SimilarListings w=%.1f -> %s",
        weights.valid_queries,
        time.perf_counter() - started,
        weights.search_text_weight,
        weights.similar_text_weight,
        out_dir,
    )
    return weights


def format_curves(weights: FusionWeights) -> str:
    lines = [f"{'text weight':>12s} " + " ".join(f"{w:>6.1f}" for w in WEIGHT_GRID)]
    for key, chosen in (("search", weights.search_text_weight), ("similar", weights.similar_text_weight)):
        curve = weights.valid_curves[key]
        lines.append(
            f"{key:>12s} "
            + " ".join(f"{curve[f'{w:.1f}']:6.3f}" for w in WEIGHT_GRID)
            + f"   -> {chosen:.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from training.dataset import DEFAULT_OUT_DIR
    from training.text import DEFAULT_CACHE_DIR

    parser = argparse.ArgumentParser(
        prog="python -m training.fusion_weights", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT_DIR, help="prepared data folder")
    parser.add_argument(
        "--artifact", type=Path, required=True, help="artefact dir with embeddings/ (image and text vectors)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the artefact)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR, help="text embedding cache")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    weights = fit(args.data, args.artifact, args.out or args.artifact, cache_dir=args.cache)
    if weights is None:
        print(
            f"{args.artifact} has no {EMBEDDINGS_DIR}/{IMAGE_EMBEDDINGS_FILE}: nothing chosen",
            file=sys.stderr,
        )
        return 1
    print(format_curves(weights))
    print(
        f"chosen on valid ({weights.valid_queries} listings): search_text_weight="
        f"{weights.search_text_weight:.1f} similar_text_weight={weights.similar_text_weight:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
