"""Category accuracy and embedding retrieval quality of the image model, trained from the
pretrained backbone on the shared data, one table for several training modes.

    python -m benchmarks.accuracy                       # prepare + probe + best, fresh feature cache
    python -m benchmarks.accuracy --modes probe         # only the fast mode
    python -m benchmarks.accuracy --modes lite2-finetune  # the best valid top-1, 45 min more
    python -m benchmarks.accuracy --reuse-cache         # reuse build/cache/features (minutes saved,
                                                        # wall time then excludes backbone passes)

Steps: ``training.prepare`` writes the leak-free split of the shared photos into
``build/benchmarks/data`` (skipped when already there); every mode then trains with
``training.train.run`` into ``build/benchmarks/artifacts/<mode>`` and is evaluated on the test
split (see `training.evaluate` for the definitions). By default each mode gets an empty feature
cache, so its wall time includes every backbone pass it needs ("from scratch"); nothing from a
previous run is reused unless ``--reuse-cache`` is given.

Columns: mode, train photos, image top-1 (test photos, each on its own), listing top-1 (a test
listing's photos vote), precision@10 (test photos against the train index, same category),
same-listing recall@5 (test listings with two photos: query with one, find the other among the
whole catalogue of every prepared photo; and, easier, among the test photos only), valid image top-1
(what picks the best mode), minutes of wall time.
The last line is ``RESULT image_top1=... listing_top1=... p_at_10=... same_listing_r5=... minutes=...``
for the best mode (highest image top-1 on the *valid* split, so the test split chooses nothing).

``--precisions`` also serves the best mode's artefact in every inference runtime and precision
(`common.runtimes`; int8 quantised with training photos) and reports the image top-1 each gives
on the test photos, with whether it passes the embedder's load-time check.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from common.artifact import METRICS_FILE
from common.prepared_data import IMAGES_FILE, LABELS_FILE
from training.config import PRESETS, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / "build" / "benchmarks"

#: The modes this benchmark knows, as training configurations.
MODES: dict[str, dict] = {
    name: PRESETS[name]
    for name in ("probe", "lite2-probe", "finetune", "lite2-finetune", "original-cached", "original")
}
DEFAULT_MODES = ("probe", "lite2-probe", "finetune")


def _prepare(data: Path | None, out: Path, progress: bool) -> Path:
    from training.dataset import data_dir_default
    from training.prepare import prepare

    if (out / IMAGES_FILE).is_file() and (out / LABELS_FILE).is_file():
        return out
    prepare(data if data is not None else data_dir_default(), out, progress=progress)
    return out


def _row(mode: str, card: dict, metrics: dict, seconds: float) -> dict:
    test, retrieval = metrics["test"], metrics["retrieval"]
    return {
        "mode": mode,
        "backbone": card["backbone"].replace("efficientnet_", ""),
        "train": card["data_counts"]["train"]
        + (card["data_counts"]["valid"] if card["train_config"]["fit_on"] == "train+valid" else 0),
        "image_top1": test["image_top1"],
        "listing_top1": test["listing_top1"],
        "image_top3": test["image_top3"],
        "p_at_10": retrieval["precision_at_10"],
        "same_listing_r5": retrieval["same_listing_recall_at_5"],
        "same_listing_r5_test_gallery": retrieval.get("test_gallery", {}).get("same_listing_recall_at_5"),
        "valid_image_top1": metrics.get("valid", {}).get("image_top1"),
        "valid_listing_top1": metrics.get("valid", {}).get("listing_top1"),
        "minutes": seconds / 60,
    }


def format_table(rows: list[dict]) -> str:
    columns = [
        ("mode", "mode", "{}"),
        ("backbone", "backbone", "{}"),
        ("train", "train photos", "{}"),
        ("image_top1", "image top-1", "{:.1%}"),
        ("listing_top1", "listing top-1", "{:.1%}"),
        ("p_at_10", "P@10", "{:.3f}"),
        ("same_listing_r5", "same-listing R@5", "{:.3f}"),
        ("same_listing_r5_test_gallery", "R@5 test gallery", "{:.3f}"),
        ("valid_image_top1", "valid image top-1", "{:.1%}"),
        ("minutes", "wall min", "{:.1f}"),
    ]
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(key) is None else fmt.format(row[key])) for key, _, fmt in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


#: (runtime, precision) pairs ``--precisions`` evaluates; torch fp32 is the reference.
PRECISION_COLUMNS = (
    ("torch", "fp32"),
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
    ("onnxruntime", "int8"),
    ("openvino", "int8"),
)


def precision_accuracy(artifact_dir: Path, files: list[Path], labels, *, batch_size: int = 32) -> list[dict]:
    """Image top-1 of ``files`` (true category indices ``labels``) for each runtime/precision the
    artefact can be served in; a refused one gets its reason instead (bounds do not apply: the
    check is bypassed by comparing with very loose bounds, so the accuracy is still reported)."""
    import numpy as np
    import torch

    from common import runtimes
    from common.model import ArtifactError
    from services.embedder.engine import ImageModel

    rows = []
    loose = {p: runtimes.CheckBounds(-1.0, 0.0) for p in runtimes.PRECISIONS}
    for runtime, precision in PRECISION_COLUMNS:
        strict = dict(runtimes.CHECK_BOUNDS)
        try:
            model = ImageModel.load(artifact_dir, runtime=runtime, precision=precision)
            passed = True
        except ArtifactError as exc:
            if "fails the load-time check" not in str(exc):
                rows.append({"runtime": runtime, "precision": precision, "error": str(exc)})
                continue
            runtimes.CHECK_BOUNDS.update(loose)  # load it anyway to measure what it would cost
            try:
                model = ImageModel.load(artifact_dir, runtime=runtime, precision=precision)
            finally:
                runtimes.CHECK_BOUNDS.update(strict)
            passed = False
        predicted = []
        for start in range(0, len(files), batch_size):
            batch = torch.stack(
                [model.preprocess(Path(p).read_bytes()) for p in files[start : start + batch_size]]
            )
            predicted.append(model.forward(batch)[1].argmax(1))
        top1 = float(np.mean(np.concatenate(predicted) == np.asarray(labels)))
        check = model.choice.check
        rows.append(
            {
                "runtime": runtime,
                "precision": precision,
                "image_top1": top1,
                "passes_check": passed,
                "min_cosine": check.min_cosine if check else 1.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=None, help="raw data (default: env DATA or shared)")
    parser.add_argument(
        "--prepared",
        type=Path,
        default=None,
        help="use this prepared folder instead of preparing into build/benchmarks/data",
    )
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, from {', '.join(MODES)} (default: %(default)s)",
    )
    parser.add_argument("--work", type=Path, default=WORK_DIR, help="where data, caches, artefacts go")
    parser.add_argument(
        "--reuse-cache",
        action="store_true",
        help="reuse the shared feature cache (build/cache/features) instead of a fresh one",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--precisions",
        action="store_true",
        help="also the test image top-1 of the best mode in every runtime/precision",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from common.model import load_artifact
    from training.features import DEFAULT_CACHE_DIR
    from training.dataset import load_training_photos
    from training.train import run, set_threads

    set_threads()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    started = time.perf_counter()
    data_dir = args.prepared or _prepare(args.data, args.work / "data", not args.no_progress)
    prepare_s = time.perf_counter() - started
    photos = load_training_photos(data_dir)
    rows = []
    for mode in modes:
        config = TrainConfig.from_dict(MODES[mode])
        out = args.work / "artifacts" / mode
        cache = DEFAULT_CACHE_DIR if args.reuse_cache else args.work / "cache" / mode
        if not args.reuse_cache:
            shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        card = run(
            config, data_dir, out, cache_dir=cache, force=True, progress=not args.no_progress, photos=photos
        )
        seconds = time.perf_counter() - t0
        metrics = json.loads((out / METRICS_FILE).read_text())
        rows.append(_row(mode, card, metrics, seconds))
        print(f"{mode}: done in {seconds / 60:.1f} min -> {out}", file=sys.stderr, flush=True)
    print(
        f"data: {data_dir} ({len(photos.images)} photos, prepared in {prepare_s:.0f} s); "
        f"feature cache: {'shared, reused' if args.reuse_cache else 'fresh per mode'}"
    )
    print(format_table(rows))
    best = max(rows, key=lambda r: (round(r["valid_image_top1"] or 0, 4), r["valid_listing_top1"] or 0))
    print(f"best mode (by valid image top-1): {best['mode']}")
    if args.precisions:
        from training.export import write_runtime_files

        best_dir = args.work / "artifacts" / best["mode"]
        write_runtime_files(best_dir, load_artifact(best_dir).model, photos, int8=True)
        test = photos.mask("test")
        files = [f for f, keep in zip(photos.files, test) if keep]
        print(f"\n{best['mode']} on the {len(files)} test photos in each runtime and precision:")
        for row in precision_accuracy(best_dir, files, photos.labels[test]):
            if "error" in row:
                print(f"  {row['runtime']:>12} {row['precision']:>5}: not available: {row['error']}")
            else:
                print(
                    f"  {row['runtime']:>12} {row['precision']:>5}: image top-1 "
                    f"{row['image_top1']:.4f}, min check cosine {row['min_cosine']:.4f}, "
                    f"{'passes' if row['passes_check'] else 'FAILS'} the load-time check"
                )
    print(
        f"RESULT image_top1={best['image_top1']:.4f} listing_top1={best['listing_top1']:.4f} "
        f"p_at_10={best['p_at_10']:.4f} same_listing_r5={best['same_listing_r5']:.4f} "
        f"minutes={best['minutes']:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
