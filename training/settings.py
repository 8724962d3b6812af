"""Training's settings, each declared once (`common.config`); read from the environment only
(the training commands take their other options as flags of their own)."""

from __future__ import annotations

from pathlib import Path

from common.backbones import RESNET34_WEIGHTS
from common.config import REPO_ROOT, Setting
from common.runtimes import PRECISIONS, RUNTIME_SETTINGS

#: Where the raw data is by default: the shared data folder beside the repository.
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "marketplace"

DATA = Setting(
    "DATA",
    "data_dir",
    Path,
    SHARED_DATA_DIR,
    flag=None,
    shown="`../shared/data/marketplace`",
    help="raw data: `Products.csv`, `Images.csv`, `images/` (the demo's and "
    "`training.prepare`'s `--data` default)",
)
TRAINING_RUNTIME = Setting(
    "TRAINING_RUNTIME",
    "runtime",
    default="auto",
    choices=RUNTIME_SETTINGS,
    flag=None,
    help="the runtime of the backbone pass over the photos (same choice and check as the "
    "embedder's, on the first batch of photos)",
)
TRAINING_PRECISION = Setting(
    "TRAINING_PRECISION",
    "precision",
    default="fp32",
    choices=PRECISIONS,
    flag=None,
    help="the precision of that pass (as `EMBEDDER_PRECISION`)",
)
TORCH_THREADS = Setting(
    "TORCH_THREADS",
    "torch_threads",
    int,
    0,
    minimum=0,
    flag=None,
    shown="min(cores, 8)",
    help="threads of training's convolution passes (0: every core, at most 8)",
)

TRAINING_SETTINGS = (DATA, TRAINING_RUNTIME, TRAINING_PRECISION, TORCH_THREADS, RESNET34_WEIGHTS)
