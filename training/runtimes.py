"""Add the inference-runtime files to an existing artefact: ``model.onnx`` and the check photos
(validation photos), as training now writes them itself, and with ``--int8`` the int8 model
``model.int8.onnx`` quantised with a calibration set of training photos.

    python -m training.runtimes --artifact artifacts/current [--data build/data] [--int8]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from common.model import load_artifact
from training.dataset import DEFAULT_OUT_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.runtimes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--artifact", type=Path, required=True, help="artefact directory")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help="the prepared data the model was trained on (its train and valid photos calibrate and check)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also quantise to int8 (EMBEDDER_PRECISION=int8) with training photos",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    from training.dataset import load_training_photos
    from training.export import write_runtime_files

    started = time.perf_counter()
    artifact = load_artifact(args.artifact)
    card = write_runtime_files(args.artifact, artifact.model, load_training_photos(args.data), int8=args.int8)
    print(json.dumps(card["runtimes"], indent=2))
    print(f"runtime files written in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
