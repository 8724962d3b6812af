"""Text search quality and the text / text+image category accuracy of an exported artefact.

    python -m benchmarks.search_quality [--artifact DIR] [--data build/data] [--quick]

Search: the listing-text embeddings the artefact exports for the indexer's "text" collection
(``embeddings/text_embeddings.npy`` + ``text_ids.json``, every listing) go into an in-process
faiss ``IndexFlatIP`` (cosine: the vectors are unit-norm). For 200 held-out listings (test split,
a fixed random sample) the query is the listing's own *title*, embedded exactly as the gateway
embeds a query (`common.text.listing_text(title)`), and the listing itself is removed from the
results. precision@10 = share of the top 10 whose main category is the query listing's. A
stricter variant also removes listings whose text is a near-duplicate (cosine >= 0.95) of the
query listing's (re-posts of the same item), which the plain number counts as hits.

Accuracy: the artefact's exported heads (`common.text.TextHead`) re-applied to the test split,
listing level: image-only, text-only and text+image top-1 (this re-computes, from the files, what
``training.text`` wrote to ``text_metrics.json``); skipped, and left out of the RESULT line, for an
artefact without text heads (the demo's exports only the vectors).

SimilarListings (`benchmarks.similar_quality`, when the artefact exports image embeddings): the
text weight of its photo + text fusion as chosen on the valid split (the artefact's
``fusion_weights.json``, which the gateway reads from the embedder; chosen here when it has none),
then same-category precision@10 of the test listings through the real services (started here on
free loopback ports), fused and photos only, beside the same figures recomputed offline from the
vectors. With the artefact's weights, also hybrid Search offline: a test listing's first photo +
its title as the query (the listing itself excluded), same-category precision@10 with the
artefact's search text weight, beside photo-only and title-only.

The last line is ``RESULT text_top1=... fused_top1=... text_p_at_10=... [similar_p_at_10=...
similar_photos_p_at_10=... similar_text_weight=... [hybrid_p_at_10=... search_text_weight=...]]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

from common.artifact import (
    CARD_FILE,
    EMBEDDINGS_DIR,
    IMAGE_EMBEDDINGS_FILE,
    TEXT_CARD_FILE,
    read_image_embeddings,
    read_text_embeddings,
)
from common.prepared_data.frames import load_prepared
from common.text import TextHead, image_listing_log_probs, listing_text
from training.dataset import DEFAULT_OUT_DIR
from training.text import (
    DEFAULT_CACHE_DIR,
    NEAR_DUPLICATE_COSINE,
    embed_texts,
    image_logits,
    listing_splits,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
QUERIES = 200
K = 10
SEED = 0


def find_artifact(root: Path = REPO_ROOT / "artifacts") -> Path:
    """``artifacts/current`` when it has a text head, else the most recently written artefact
    directory that has one."""
    if (Path(root) / "current" / TEXT_CARD_FILE).is_file():
        return (Path(root) / "current").resolve()
    cards = sorted(Path(root).glob(f"*/{TEXT_CARD_FILE}"), key=lambda p: p.stat().st_mtime)
    if not cards:
        raise SystemExit(
            f"no artefact with a text head under {root}; run "
            "`python -m training.text --artifact DIR` first or pass --artifact"
        )
    return cards[-1].parent


def load_text_index(artifact: Path) -> tuple[list[str], np.ndarray]:
    try:
        loaded = read_text_embeddings(artifact)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if loaded is None:
        raise SystemExit(f"{artifact} has no text embeddings; run `python -m training.text --artifact DIR`")
    return loaded


def search_quality(
    listings, ids: list[str], vectors: np.ndarray, query_rows: np.ndarray, cache_dir: Path, k: int = K
) -> dict:
    """precision@k of title queries with the listing itself (and, for the strict number, its
    near-duplicates) removed. Returns per-query results too."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    category_of = dict(zip(listings["product_id"], listings["main_category"]))
    row_of = {pid: i for i, pid in enumerate(ids)}
    titles = listings["title"].to_numpy()[query_rows]
    query_ids = listings["product_id"].to_numpy()[query_rows]
    queries = embed_texts([listing_text(t) for t in titles], cache_dir=cache_dir)
    depth = k + 1 + 50  # room for the removed listing and its near-duplicates
    scores, found = index.search(queries, depth)
    plain, strict, first, per_query = [], [], [], []
    for q, (pid, row_scores, row_found) in enumerate(zip(query_ids, scores, found)):
        own = vectors[row_of[pid]]
        hits = [(ids[j], float(s)) for j, s in zip(row_found, row_scores) if j >= 0 and ids[j] != pid]
        top = hits[:k]
        dup = [h for h in hits if float(vectors[row_of[h[0]]] @ own) < NEAR_DUPLICATE_COSINE][:k]
        want = category_of[pid]
        plain.append(np.mean([category_of[h] == want for h, _ in top]))
        strict.append(np.mean([category_of[h] == want for h, _ in dup]))
        first.append(category_of[top[0][0]] == want)
        per_query.append({"id": pid, "title": titles[q], "category": want, "top": top})
    return {
        "p_at_k": float(np.mean(plain)),
        "p_at_k_no_near_duplicates": float(np.mean(strict)),
        "p_at_1": float(np.mean(first)),
        "queries": per_query,
        "catalogue": len(ids),
    }


def accuracy_rows(
    artifact: Path, data_dir: Path, listings, images, test_ids: list[str], text_vectors: dict, cache_dir: Path
) -> dict:
    """Listing-level test top-1 of image-only, text-only and text+image, from the exported files."""
    head = TextHead.load(artifact)
    card = json.loads((artifact / CARD_FILE).read_text())
    head.check_image_model(card["model_version"])
    label = {name: k for k, name in enumerate(head.categories)}
    category_of = dict(zip(listings["product_id"], listings["main_category"]))
    y = np.array([label[category_of[pid]] for pid in test_ids])
    test_images = images[images["product_id"].isin(set(test_ids))].reset_index(drop=True)
    logits = image_logits(artifact, data_dir, test_images, cache_dir=cache_dir)
    group_ids, image_lp = image_listing_log_probs(logits, test_images["product_id"].tolist())
    image_lp = image_lp[[group_ids.index(pid) for pid in test_ids]]
    x = np.stack([text_vectors[pid] for pid in test_ids])
    row_of = {pid: i for i, pid in enumerate(listings["product_id"])}
    texts = [
        listing_text(listings.at[row_of[pid], "title"], listings.at[row_of[pid], "description"])
        for pid in test_ids
    ]
    text_p, fused_p = head.predict_text(x, texts), head.predict_fused(x, image_lp, texts)
    return {
        "image": float((image_lp.argmax(1) == y).mean()),
        "text": float((text_p.argmax(1) == y).mean()),
        "text+image": float((fused_p.argmax(1) == y).mean()),
        "listings": int(len(y)),
        "fusion": head.card.get("fusion", {}).get("name"),
        "text_fusion": head.card.get("text_fusion", {}).get("name"),
        "text_inputs": list(head.card["text_fusion_inputs"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--artifact",
        type=Path,
        default=None,
        help="artefact dir with a text head (default: newest under artifacts/)",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--queries", type=int, default=QUERIES)
    parser.add_argument(
        "--examples", type=int, default=3, help="example sessions to print (query -> top results)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the same measurement without the per-category breakdown and with "
        "one example (everything is cached, so both are about a minute)",
    )
    parser.add_argument(
        "--query",
        action="append",
        default=[],
        help="also print the top 5 listings for this free-text query "
        "(repeatable); the session the README shows",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument(
        "--no-similar",
        action="store_true",
        help="skip the SimilarListings measurement (it starts the services)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import torch

    torch.set_num_threads(1)
    start = time.time()
    artifact = args.artifact or find_artifact()
    listings, images, _ = load_prepared(args.data)
    split_of = listing_splits(images)
    ids, vectors = load_text_index(artifact)
    # training.text embeds every listing, the demo the photographed ones (the valid and test
    # listings all are): the text index is what the artefact exports, the queries must be in it
    missing = set(listings["product_id"][listings["product_id"].isin(split_of.index)]) - set(ids)
    if missing:
        raise SystemExit(
            f"{len(missing)} photographed listings have no text embedding in {artifact}; re-run training.text"
        )
    test_rows = np.flatnonzero(listings["product_id"].map(split_of).eq("test").to_numpy())
    rng = np.random.default_rng(SEED)
    query_rows = np.sort(rng.choice(test_rows, size=min(args.queries, len(test_rows)), replace=False))
    search = search_quality(listings, ids, vectors, query_rows, args.cache)
    test_ids = listings["product_id"].to_numpy()[test_rows].tolist()
    text_vectors = dict(zip(ids, vectors))
    acc = None  # the category heads are training.text's; an artefact may export only the vectors
    if (artifact / TEXT_CARD_FILE).is_file():
        acc = accuracy_rows(artifact, args.data, listings, images, test_ids, text_vectors, args.cache)

    print(f"artefact: {artifact}")
    print(
        f"text index: {search['catalogue']} listings (faiss IndexFlatIP, all-MiniLM-L6-v2 of "
        f"title + description); {len(query_rows)} test-split listings queried by their title, "
        "the listing itself removed"
    )
    print()
    print(f"{'measure':52s} {'value':>8s}")
    print(f"{'category precision@10 (title query)':52s} {search['p_at_k']:8.1%}")
    print(f"{'  same, near-duplicate re-posts also removed':52s} {search['p_at_k_no_near_duplicates']:8.1%}")
    print(f"{'category precision@1 (title query)':52s} {search['p_at_1']:8.1%}")
    print()
    if acc is None:
        print(
            f"category top-1: not measured, {artifact} has no text heads (`python -m training.text "
            f"--artifact {artifact}` fits them)"
        )
    else:
        print(f"{'category top-1, test split, listing level':52s} {'':>8s}   ({acc['listings']} listings)")
        for name in ("image", "text", "text+image"):
            print(f"{'  ' + name:52s} {acc[name]:8.1%}")
        print(
            f"  text = {' + '.join(acc['text_inputs'])} heads fused by {acc['text_fusion']}; "
            f"text+image fused by {acc['fusion']} (both fit on the validation split)"
        )
    if not args.quick:
        by_cat: dict[str, list] = {}
        for q in search["queries"]:
            by_cat.setdefault(q["category"], []).append(
                np.mean(
                    [
                        listings.set_index("product_id").at[h, "main_category"] == q["category"]
                        for h, _ in q["top"]
                    ]
                )
            )
        print("\nprecision@10 by category:")
        for name in sorted(by_cat):
            print(f"  {name:40s} {np.mean(by_cat[name]):6.1%}  ({len(by_cat[name])} queries)")
    examples = 1 if args.quick else args.examples
    if examples:
        titles = dict(zip(listings["product_id"], listings["title"]))
        cats = dict(zip(listings["product_id"], listings["main_category"]))
        step = max(1, len(search["queries"]) // examples)
        for q in search["queries"][::step][:examples]:
            print(f"\nquery: {q['title']!r}   (listing's category: {q['category']})")
            for rank, (pid, score) in enumerate(q["top"][:5], start=1):
                print(f"  {rank}. {score:.3f}  {titles[pid][:60]!r}  [{cats[pid]}]")
    if args.query:
        import faiss

        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        titles = dict(zip(listings["product_id"], listings["title"]))
        cats = dict(zip(listings["product_id"], listings["main_category"]))
        prices = dict(zip(listings["product_id"], listings["price"]))
        scores, found = index.search(
            embed_texts([listing_text(q) for q in args.query], cache_dir=args.cache), 5
        )
        for query, row_scores, row_found in zip(args.query, scores, found):
            print(f"\nSearchByText {query!r}:")
            for rank, (j, score) in enumerate(zip(row_found, row_scores), start=1):
                pid = ids[j]
                print(f"  {rank}. {score:.3f}  {titles[pid][:55]!r}  £{prices[pid]:g}  [{cats[pid]}]")
    similar = None
    if (artifact / EMBEDDINGS_DIR / IMAGE_EMBEDDINGS_FILE).is_file() and not args.no_similar:
        valid_rows = np.flatnonzero(listings["product_id"].map(split_of).eq("valid").to_numpy())
        if args.quick:
            valid_rows = np.sort(
                rng.choice(valid_rows, size=min(args.queries, len(valid_rows)), replace=False)
            )
        similar = similar_listings_quality(
            artifact,
            args.data,
            listings,
            images,
            ids,
            vectors,
            listings["product_id"].to_numpy()[valid_rows].tolist(),
            listings["product_id"].to_numpy()[query_rows].tolist(),
            args.cache,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {k: v for k, v in search.items() if k != "queries"} | {"top1": acc, "similar": similar},
                indent=2,
                default=str,
            )
            + "\n"
        )
    print(f"\n({time.time() - start:.0f} s)")
    extra = ""
    if similar is not None:
        extra = (
            f" similar_p_at_10={similar['services']['fused']:.4f} "
            f"similar_photos_p_at_10={similar['services']['photos_only']:.4f} "
            f"similar_text_weight={similar['text_weight']:.1f}"
        )
        if "search" in similar:
            extra += (
                f" hybrid_p_at_10={similar['search']['fused']:.4f} "
                f"search_text_weight={similar['search']['text_weight']:.1f}"
            )
    top1 = "" if acc is None else f"text_top1={acc['text']:.4f} fused_top1={acc['text+image']:.4f} "
    print(f"RESULT {top1}text_p_at_10={search['p_at_k']:.4f}{extra}")
    return 0


def similar_listings_quality(
    artifact: Path,
    data_dir: Path,
    listings,
    images,
    text_ids: list[str],
    text_vectors: np.ndarray,
    valid_ids: list[str],
    test_ids: list[str],
    cache_dir: Path = DEFAULT_CACHE_DIR,
) -> dict:
    """SimilarListings same-category precision@10 (`benchmarks.similar_quality`) with the text
    weight the artefact's ``fusion_weights.json`` holds (chosen on valid by training; when the
    artefact has none, chosen here on the valid listings offline), the test listings through the
    real services (the gateway reading the weight from the embedder), photos only and fused, beside
    the offline recomputation of the same figures; and hybrid Search (a test listing's first photo
    + its title, itself excluded) offline with the artefact's search weight, beside photo-only and
    text-only."""
    from benchmarks import similar_quality as SQ
    from common.fusion_weights import FusionWeights, FusionWeightsMissing

    image_ids, image_vectors = read_image_embeddings(artifact)
    data = SQ.SimilarityData(
        listings,
        image_ids,
        image_vectors,
        dict(zip(images["image_id"], images["product_id"])),
        text_ids,
        text_vectors,
    )
    photographed = set(images["product_id"])
    valid_ids = [i for i in valid_ids if i in photographed]
    test_ids = [i for i in test_ids if i in photographed]
    print(f"\nSimilarListings, same-category precision@{SQ.K} (query: a listing; itself excluded)")
    try:
        chosen = FusionWeights.load(artifact)  # a stale file is refused with the command to run
    except FusionWeightsMissing:
        chosen = None
    if chosen is not None:
        weight, served_weight, search_weight = chosen.similar_text_weight, None, chosen.search_text_weight
        curve = {float(w): p for w, p in chosen.valid_curves["similar"].items()}
        source = f"{artifact.name}/fusion_weights.json, {chosen.valid_queries} valid listings"
    else:
        weight, curve = SQ.choose_weight(data, valid_ids)
        served_weight, search_weight = weight, None
        source = f"chosen here: the artefact has no fusion_weights.json; {len(valid_ids)} valid listings"
    print(
        f"  text weight on the valid split ({source}): "
        + "  ".join(f"{w:.1f}:{p:.3f}" for w, p in curve.items())
        + f"  -> {weight:.1f}"
    )
    offline = SQ.offline_precision(data, test_ids, (None, weight))
    services = SQ.through_services(artifact, Path(data_dir), test_ids, served_weight)
    print(f"  {'test split, ' + str(len(test_ids)) + ' listings':40s} {'services':>9s} {'offline':>9s}")
    print(f"  {'photos only':40s} {services['photos_only']:9.3f} {offline[None]:9.3f}")
    print(f"  {f'photos + text (w = {weight:.1f})':40s} {services['fused']:9.3f} {offline[weight]:9.3f}")
    result = {
        "text_weight": weight,
        "weight_from_artifact": chosen is not None,
        "valid_curve": {str(w): p for w, p in curve.items()},
        "services": services,
        "offline": {"photos_only": offline[None], "fused": offline[weight]},
    }
    if search_weight is not None:
        titles = dict(zip(listings["product_id"], listings["title"]))
        vectors = embed_texts([listing_text(titles[i]) for i in test_ids], cache_dir=cache_dir)
        hybrid = SQ.search_precision(data, test_ids, dict(zip(test_ids, vectors)), (0.0, search_weight, 1.0))
        print(
            f"\nhybrid Search, same-category precision@{SQ.K} (query: a test listing's first photo + "
            f"its title; itself excluded), offline, {len(test_ids)} listings"
        )
        print(f"  {'photo only (w = 0)':40s} {hybrid[0.0]:9.3f}")
        print(f"  {'title only (w = 1)':40s} {hybrid[1.0]:9.3f}")
        print(f"  {f'photo + title (w = {search_weight:.1f}, artefact)':40s} {hybrid[search_weight]:9.3f}")
        result["search"] = {
            "text_weight": search_weight,
            "photo_only": hybrid[0.0],
            "text_only": hybrid[1.0],
            "fused": hybrid[search_weight],
        }
    return result


if __name__ == "__main__":
    sys.exit(main())
