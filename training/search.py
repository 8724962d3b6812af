"""A small hyper-parameter search for fine-tuning: lr x momentum x epochs x unfrozen blocks.

    python -m training.search --data build/data                       # the default grid
    python -m training.search --grid '{"lr": [0.003, 0.01], "unfrozen_blocks": [1, 3]}' --set epochs=4

Every trial trains on the train split from the cached activations (``training.features``; the
first trial pays for the backbone passes, later ones reuse them) and is scored on the *valid* split
only, so the search never looks at the test split. Prints one table, best trial first, and writes it
to ``--out`` as JSON; train the winner with ``python -m training.train --config <its JSON>``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from pathlib import Path

from training.config import TrainConfig, parse_override, preset
from training.dataset import DEFAULT_OUT_DIR
from training.features import DEFAULT_CACHE_DIR

DEFAULT_GRID = {"lr": [0.003, 0.01], "momentum": [0.9], "epochs": [3, 6], "unfrozen_blocks": [1, 4]}
DEFAULT_BASE = dict(
    preset("original-cached").to_dict(),
    name="search",
    optimizer="sgd",
    init_head_from_probe=True,
    freeze_bn=True,
    label_smoothing=0.1,
    schedule="cosine",
    aug_views=4,
)


def trials(base: TrainConfig, grid: dict[str, list]) -> list[TrainConfig]:
    keys = sorted(grid)
    return [
        base.with_overrides(**dict(zip(keys, values)), name=f"search-{i}")
        for i, values in enumerate(itertools.product(*(grid[k] for k in keys)))
    ]


def run_search(
    configs: list[TrainConfig], data_dir: Path, *, cache_dir: Path = DEFAULT_CACHE_DIR, progress: bool = True
) -> list[dict]:
    from training.evaluate import classification_metrics, softmax
    from training.dataset import load_training_photos
    from training.train import fit

    photos = load_training_photos(data_dir)
    valid = photos.mask("valid")
    rows = []
    for i, config in enumerate(configs, 1):
        t0 = time.perf_counter()
        result = fit(config, photos, cache_dir=cache_dir, progress=progress, exact_outputs=False)
        metrics = classification_metrics(
            softmax(result.logits[valid]), photos.labels[valid], photos.listing_ids[valid], photos.categories
        )
        row = {
            "trial": i,
            "unfrozen_blocks": config.unfrozen_blocks,
            "lr": config.lr,
            "momentum": config.momentum,
            "epochs": config.epochs,
            "best_epoch": next((h["best_epoch"] for h in result.history if "best_epoch" in h), None),
            "valid_image_top1": metrics["image_top1"],
            "valid_listing_top1": metrics["listing_top1"],
            "minutes": (time.perf_counter() - t0) / 60,
            "config": config.to_dict(),
        }
        rows.append(row)
        logging.getLogger("training").info(
            "trial %d/%d: %s", i, len(configs), format_table([row]).splitlines()[-1]
        )
    return sorted(rows, key=lambda r: -r["valid_image_top1"])


def format_table(rows: list[dict]) -> str:
    head = (
        f"{'trial':>5} {'unfrozen':>8} {'lr':>7} {'momentum':>8} {'epochs':>6} {'best ep':>7} "
        f"{'valid img top-1':>15} {'valid listing top-1':>19} {'min':>5}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['trial']:>5} {str(r['unfrozen_blocks']):>8} {r['lr']:>7g} {r['momentum']:>8g} "
            f"{r['epochs']:>6} {str(r['best_epoch']):>7} {r['valid_image_top1']:>15.3f} "
            f"{r['valid_listing_top1']:>19.3f} {r['minutes']:>5.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument(
        "--grid", default=json.dumps(DEFAULT_GRID), help="JSON {key: [values]} (default: %(default)s)"
    )
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a base config key")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--out", type=Path, default=Path("build/search/results.json"))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from training.train import set_threads

    set_threads()
    base = dict(DEFAULT_BASE)
    for text in args.set or []:
        key, value = parse_override(text)
        base[key] = value
    grid = json.loads(args.grid)
    configs = trials(TrainConfig.from_dict(base), grid)
    print(f"{len(configs)} trials over {grid}", file=sys.stderr)
    rows = run_search(configs, args.data, cache_dir=args.cache, progress=not args.no_progress)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(format_table(rows))
    print(
        f"best: trial {rows[0]['trial']} (valid image top-1 {rows[0]['valid_image_top1']:.3f}); "
        f"all configs in {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
