"""Load the prepared listings into the gateway's catalogue (SQLite).

    python -m services.gateway.load_catalogue --prepared build/data --db run/catalogue.sqlite3

Reads ``listings.csv`` and ``images.csv`` written by ``python -m training.prepare``; a listing's
image ids are the rows of images.csv whose file exists. Listings already in the catalogue are
left alone unless ``--replace``. One transaction: all rows or none. The gateway does the same at
start when ``GATEWAY_BOOTSTRAP_DIR`` is set and its catalogue is empty. Vectors are indexed separately
(``python -m services.gateway.index_catalogue``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from common.config import REPO_ROOT, Settings
from services.gateway.catalogue import Catalogue, CatalogueError, CatalogueUnavailable
from services.gateway.config import DB_SETTINGS, database_password

#: What the command reads, declared with the gateway's settings (same variables, same flag).
LOAD_CATALOGUE_SETTINGS = Settings(*DB_SETTINGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.gateway.load_catalogue", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--prepared",
        type=Path,
        default=REPO_ROOT / "build" / "data",
        help="prepared data folder (default build/data)",
    )
    parser.add_argument("--replace", action="store_true", help="empty the catalogue first")
    parser.add_argument(
        "--only-with-images", action="store_true", help="skip listings that have no usable photo"
    )
    parser.add_argument(
        "--no-check-files", action="store_true", help="keep images.csv rows even if their file is missing"
    )
    args = LOAD_CATALOGUE_SETTINGS.add_flags(parser).parse_args(argv)
    settings = LOAD_CATALOGUE_SETTINGS.read(args)
    args.db, password = settings["db_path"], database_password(settings)
    started = time.perf_counter()
    try:
        with Catalogue.open(args.db, password=password) as catalogue:
            report = catalogue.load_prepared(
                args.prepared,
                replace=args.replace,
                check_files=not args.no_check_files,
                only_with_images=args.only_with_images,
            )
            total, images = catalogue.count(), catalogue.count_images()
            where = catalogue.path
    except (FileNotFoundError, ValueError, CatalogueError, CatalogueUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"loaded {report.listings:,} listings with {report.images:,} images from {args.prepared} "
        f"into {where} in {time.perf_counter() - started:.1f}s"
    )
    print(
        f"skipped images: {report.images_skipped_missing_file:,} without a file, "
        f"{report.images_skipped_unknown_listing:,} of unknown listings; "
        f"{report.prices_unusable:,} flagged prices stored as unknown"
    )
    print(f"catalogue now holds {total:,} listings and {images:,} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
