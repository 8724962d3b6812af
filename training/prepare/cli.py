"""``python -m training.prepare``: the command line over `training.prepare.pipeline.prepare`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from training.dataset import DEFAULT_OUT_DIR, data_dir_default
from training.prepare.photos import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_SIZE,
    DEFAULT_WORKERS,
)
from training.prepare.pipeline import prepare
from training.prepare.report import format_summary
from training.prepare.splits import DEFAULT_SEED
from training.prepare.tables import DEFAULT_ABSURD_PRICE

DESCRIPTION = "Turn the raw marketplace tables and photos into a reproducible, leak-free dataset."


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.prepare", description=DESCRIPTION)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="raw data folder (default: env DATA or ../shared/data/marketplace)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, help=f"output folder (default: {DEFAULT_OUT_DIR})"
    )
    parser.add_argument("--images", type=Path, default=None, help="photo folder (default: DATA/images)")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="square output size in pixels")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="photo-cleaning processes")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="split seed")
    parser.add_argument(
        "--absurd-price", type=float, default=DEFAULT_ABSURD_PRICE, help="flag prices above this"
    )
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="skip photos larger than this"
    )
    parser.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="skip photos with more pixels"
    )
    parser.add_argument(
        "--keep-alignment", action="store_true", help="do not re-centre top-left letterboxed photos"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        data_dir = args.data if args.data is not None else data_dir_default()
        summary = prepare(
            data_dir,
            args.out,
            images_dir=args.images,
            size=args.size,
            workers=args.workers,
            seed=args.seed,
            absurd_price=args.absurd_price,
            max_bytes=args.max_bytes,
            max_pixels=args.max_pixels,
            recentre=not args.keep_alignment,
            progress=not args.no_progress,
        )
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
