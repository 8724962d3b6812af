"""The main job end to end: real marketplace photos -> prepared data -> trained model ->
catalogue embeddings -> FAISS index -> running services -> sample queries, printed and drawn.

    make demo                      # DATA=../shared/data/marketplace by default
    python -m scripts.demo --data /path/to/marketplace

Every stage reuses what is already built when its inputs did not change, so a re-run only starts
the services and asks the queries. The picture of the results is written to build/demo/results.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd

from common.prepared_data import image_path
from scripts import stack

REPO = stack.REPO
BUILD = REPO / "build"
PREPARED = BUILD / "data"
RUN_DIR = REPO / "run" / "demo"
RESULT_PICTURE = BUILD / "demo" / "results.png"
SHARDS = 2
DEMO_TOKEN = "demo-write-token"


class Stages:
    """Numbered stage headers with elapsed times, so a person sees where the time goes."""

    def __init__(self, total: int) -> None:
        self.total, self.number, self.started = total, 0, time.perf_counter()
        self.stage_started = self.started

    def start(self, title: str) -> None:
        self.number += 1
        self.stage_started = time.perf_counter()
        print(f"\n=== [{self.number}/{self.total}] {title}", flush=True)

    def done(self, note: str = "") -> None:
        print(f"    done in {time.perf_counter() - self.stage_started:.1f}s {note}".rstrip(), flush=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def prepare_data(data_dir: Path) -> None:
    from training.prepare import format_summary, prepare

    summary = prepare(data_dir, PREPARED)
    print(textwrap.indent(format_summary(summary), "    "))


def train_model(preset_name: str) -> Path:
    from training.config import preset
    from training.train import format_summary, run

    config = preset(preset_name)
    out_dir = REPO / "artifacts" / config.name
    card = run(config, PREPARED, out_dir)
    state = "reused (inputs unchanged)" if card.get("up_to_date") else "trained"
    print(f"    {state}: {format_summary(card)}")
    current = REPO / "artifacts" / "current"
    if current.is_symlink() or not current.exists():
        if current.is_symlink():
            current.unlink()
        current.symlink_to(out_dir.name)
    return out_dir


def embed_listing_text(artifact_dir: Path) -> None:
    """Embed the text (title + description) of every listing that has photos, once: vectors are
    cached by text, so a re-run costs nothing. Written beside the image embeddings, where the
    indexing step picks them up for the "text" collection."""
    import logging

    from common.artifact import EMBEDDINGS_DIR, write_text_embeddings
    from common.prepared_data.frames import load_prepared
    from training.text import embed_texts, listing_texts

    logging.basicConfig(level=logging.INFO, format="    %(message)s")
    listings, images, _ = load_prepared(PREPARED)
    listings = listings[listings.product_id.isin(set(images.product_id))]
    vectors = embed_texts(listing_texts(listings))
    write_text_embeddings(artifact_dir, listings.product_id.tolist(), vectors)
    out = artifact_dir / EMBEDDINGS_DIR
    print(f"    {len(listings):,} listing texts embedded ({vectors.shape[1]}-d) -> {out.relative_to(REPO)}")
    choose_fusion_weights(artifact_dir, listings.product_id.tolist(), vectors)


def choose_fusion_weights(artifact_dir: Path, text_ids: list[str], text_vectors) -> None:
    """The gateway's default text weights (hybrid Search, SimilarListings), chosen on the valid
    split for this image model (`training.fusion_weights`), unless the artefact has them already."""
    from common.artifact import FUSION_WEIGHTS_FILE
    from common.fusion_weights import FusionWeights, FusionWeightsError
    from training import fusion_weights

    try:
        weights = FusionWeights.load(artifact_dir)
        state = "reused (same image model)"
    except FusionWeightsError:
        weights = fusion_weights.fit(
            PREPARED, artifact_dir, artifact_dir, text_ids=text_ids, text_vectors=text_vectors
        )
        state = "chosen on valid"
    if weights is not None:
        print(
            f"    fusion weights {state}: hybrid Search text weight {weights.search_text_weight:.1f}, "
            f"SimilarListings {weights.similar_text_weight:.1f} -> "
            f"{(artifact_dir / FUSION_WEIGHTS_FILE).relative_to(REPO)}"
        )


def load_catalogue(db_path: Path) -> None:
    from services.gateway.catalogue import Catalogue

    catalogue = Catalogue.open(db_path)
    try:
        stats = catalogue.load_prepared(PREPARED, replace=True)
    finally:
        catalogue.close()
    print(f"    catalogue {db_path.relative_to(REPO)}: {stats}")


def start_services(artifact_dir: Path) -> dict[str, stack.ServiceProcess]:
    ports = {name: stack.free_port() for name in ("embedder", "gateway")}
    shard_ports = [stack.free_port() for _ in range(SHARDS)]
    common_env = {"WRITE_TOKEN": DEMO_TOKEN, "LOG_LEVEL": "info", "HF_HUB_OFFLINE": "1"}
    logs = RUN_DIR / "logs"
    procs: dict[str, stack.ServiceProcess] = {}
    for shard, port in enumerate(shard_ports):
        procs[f"indexer-{shard}"] = stack.spawn(
            "indexer",
            port,
            logs / f"indexer-{shard}.log",
            {**common_env, "INDEXER_DATA_DIR": str(RUN_DIR / f"indexer-{shard}")},
        )
    procs["embedder"] = stack.spawn(
        "embedder",
        ports["embedder"],
        logs / "embedder.log",
        {**common_env, "EMBEDDER_ARTIFACT_DIR": str(artifact_dir)},
    )
    procs["gateway"] = stack.spawn(
        "gateway",
        ports["gateway"],
        logs / "gateway.log",
        {
            **common_env,
            "EMBEDDER_ADDR": f"127.0.0.1:{ports['embedder']}",
            "INDEXER_ADDRS": ",".join(f"127.0.0.1:{p}" for p in shard_ports),
            "GATEWAY_DB": str(RUN_DIR / "catalogue.sqlite3"),
        },
    )
    try:
        for name, proc in procs.items():
            stack.wait_ready(proc, 300)
            print(f"    {name:10s} SERVING on {proc.address}  (log {proc.log_path.relative_to(REPO)})")
    except Exception:
        stop_services(procs)
        raise
    return procs


def stop_services(procs: dict[str, stack.ServiceProcess]) -> None:
    for name in reversed(list(procs)):
        code = procs[name].stop()
        print(f"    stopped {name} (exit code {code})")


def index_catalogue(artifact_dir: Path, procs: dict[str, stack.ServiceProcess]) -> None:
    # Listing texts come from the artefact's text embeddings (python -m training.text) when it
    # has them, else through the running embedder's EmbedText.
    stack.index_catalogue(RUN_DIR / "catalogue.sqlite3", artifact_dir, PREPARED, procs)


def pick_query_photo() -> pd.Series:
    """A held-out (test split) photo of a listing that has another photo, chosen reproducibly."""
    from common.prepared_data.frames import load_prepared

    images = load_prepared(PREPARED).images
    test = images[images.split == "test"]
    per_listing = test.groupby("product_id").image_id.transform("count")
    return test[per_listing >= 2].sort_values("image_id").iloc[0]


TEXT_QUERY = "wooden dining table"


def run_queries(gateway_address: str) -> list[tuple[str, Path, list]]:
    import grpc

    from services.gateway.cli import listing_table, results_table
    from services.gateway.client import GatewayClient

    query = pick_query_photo()
    photo = PREPARED / query.path
    panels = []
    with GatewayClient(gateway_address, timeout=60) as gateway:
        print(f"\n--- ClassifyImage: held-out test photo {query.image_id}")
        print(f"    true main category: {query.main_category}")
        classification = gateway.classify(photo, top_k=3)
        for rank, score in enumerate(classification.categories, 1):
            print(f"    {rank}. {score.category:36s} {score.probability:6.1%}")
        print(f"    model {classification.model_version}")

        print("\n--- SearchByImage: the same photo, top 5 listings")
        found = gateway.search_by_image(photo, k=5)
        print(textwrap.indent(results_table(found), "    "))
        panels.append(("SearchByImage", photo, found))

        listing = gateway.get(query.product_id)
        print(f"\n--- SimilarListings of listing {listing.id}")
        print(textwrap.indent(listing_table(listing), "    "))
        similar = gateway.similar(listing.id, k=5)
        print(textwrap.indent(results_table(similar), "    "))
        panels.append(("SimilarListings", PREPARED / image_path(listing.image_ids[0]), similar))

        print(f'\n--- SearchByText: "{TEXT_QUERY}", top 5 listings')
        try:
            by_text = gateway.search_by_text(TEXT_QUERY, k=5)
        except grpc.RpcError as error:  # e.g. the embedder has no text model
            print(f"    skipped: {error.code().name}: {error.details()}")
            by_text = []
        print(textwrap.indent(results_table(by_text), "    "))

        # A user who liked the query listing and its most similar listing of the same category,
        # and skipped the best text match from another category.
        liked = [listing.id] + [
            r.listing.id for r in similar if r.listing.main_category == listing.main_category
        ][:1]
        skipped = [r.listing.id for r in by_text if r.listing.main_category != listing.main_category][:1]
        print(
            f"\n--- Recommend: liked {', '.join(liked)} ({listing.main_category}); "
            f"skipped {', '.join(skipped) or 'nothing'}"
        )
        recommended = gateway.recommend(liked, skipped, k=5)
        print(textwrap.indent(results_table(recommended), "    "))
        panels.append(("Recommend", PREPARED / image_path(listing.image_ids[0]), recommended))
    return panels


def draw_results(panels: list[tuple[str, Path, list]], out: Path) -> None:
    """Each query photo next to its top results, with category, price and score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns = 1 + max(len(results) for _, _, results in panels)
    fig, axes = plt.subplots(len(panels), columns, figsize=(2.6 * columns, 3.2 * len(panels)), squeeze=False)
    for row, (title, photo, results) in enumerate(panels):
        for ax in axes[row]:
            ax.axis("off")
        axes[row][0].imshow(Image.open(photo))
        axes[row][0].set_title(f"{title}\nquery", fontsize=9, fontweight="bold")
        for col, result in enumerate(results, 1):
            image_id = result.matched_image_id or (result.listing.image_ids or [""])[0]
            path = PREPARED / image_path(image_id)
            if path.exists():
                axes[row][col].imshow(Image.open(path))
            price = "-" if result.listing.price is None else f"£{result.listing.price:,.0f}"
            axes[row][col].set_title(
                f"#{result.rank} score {result.score:.2f}\n{textwrap.shorten(result.listing.title, 26)}\n"
                f"{textwrap.shorten(result.listing.main_category, 26)} · {price}",
                fontsize=7,
            )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="marketplace data folder (default: env DATA or ../shared/data/marketplace)",
    )
    parser.add_argument("--preset", default="probe", help="training preset (default: the fast probe)")
    args = parser.parse_args(argv)

    from training.dataset import DataNotFoundError, check_data_dir, data_dir_default

    try:
        data_dir = args.data if args.data else data_dir_default()
        check_data_dir(data_dir)
    except DataNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["WRITE_TOKEN"] = DEMO_TOKEN  # the in-process indexing step writes to the shards
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    stages = Stages(8)
    stages.start(f"prepare data from {data_dir}")
    prepare_data(data_dir)
    stages.done()
    stages.start(f"train (preset {args.preset})")
    artifact_dir = train_model(args.preset)
    stages.done()
    stages.start("embed listing text (title + description) with MiniLM; fusion weights on valid")
    embed_listing_text(artifact_dir)
    stages.done()
    stages.start("load the listing catalogue")
    load_catalogue(RUN_DIR / "catalogue.sqlite3")
    stages.done()
    stages.start(f"start indexer x{SHARDS}, embedder, gateway")
    procs = start_services(artifact_dir)
    stages.done()
    try:
        stages.start("index the catalogue embeddings (routed to shards by listing)")
        index_catalogue(artifact_dir, procs)
        stages.done()
        stages.start("sample queries through the gateway")
        panels = run_queries(procs["gateway"].address)
        draw_results(panels, RESULT_PICTURE)
        print(f"\n    picture of the results: {RESULT_PICTURE.relative_to(REPO)}")
        stages.done()
    finally:
        stages.start("stop the services")
        stop_services(procs)
        stages.done()
    print(f"\ndemo finished in {stages.elapsed / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
