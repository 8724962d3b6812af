"""The feature extractor runs the frozen backbone with its batch norms folded: the same features
as the plain pretrained backbone, and a refusal when folding would change them."""

from __future__ import annotations

import numpy as np
import pytest
from torch import nn

from common import model as common_model
from common.backbones import get_backbone
from training.features import FeatureExtractor
from tests.support.photos import photo_files


@pytest.fixture(scope="module")
def files():
    chosen = photo_files(4)
    if not chosen:
        pytest.skip("the shared marketplace photos are not available")
    return chosen


def test_folded_backbone_gives_the_plain_backbones_features(files):
    backbone = get_backbone("efficientnet_lite0")
    keys = [path.name for path in files]
    folded = FeatureExtractor(backbone, cache_dir=None, progress=False)
    plain = FeatureExtractor(backbone, cache_dir=None, progress=False, features=backbone.build(True).eval())
    a, b = folded.get(files, keys)["pooled"], plain.get(files, keys)["pooled"]
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in folded.features.modules())
    assert any(isinstance(layer, nn.BatchNorm2d) for layer in plain.features.modules())
    np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)
    assert np.abs(a - b).max() < 1e-3 < np.abs(a).max()


def test_a_fold_that_changes_the_features_is_refused(monkeypatch):
    def wrong_fold(module: nn.Module) -> int:
        next(layer for layer in module.modules() if isinstance(layer, nn.Conv2d)).weight.data.mul_(3)
        return 0

    monkeypatch.setattr(common_model, "fold_batch_norms", wrong_fold)
    extractor = FeatureExtractor(get_backbone("efficientnet_lite0"), cache_dir=None, progress=False)
    with pytest.raises(RuntimeError, match="changed its features"):
        _ = extractor.features
