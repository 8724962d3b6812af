"""The training feature pass runs the backbone in the faster runtimes (TRAINING_RUNTIME): the same
pooled features as torch on real photos, chosen only after the check against torch, and a clear
refusal when an explicitly requested runtime cannot be used."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from common.backbones import get_backbone
from common.runtimes import RuntimeUnavailable
from tests.support.photos import photo_files
from training.features import FeatureExtractor

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def files():
    chosen = photo_files(6)
    if len(chosen) < 6:
        pytest.skip("the shared marketplace photos are not available")
    return chosen


@pytest.fixture(scope="module")
def torch_features(files):
    extractor = FeatureExtractor(
        get_backbone("efficientnet_lite0"), cache_dir=None, progress=False, runtime="torch"
    )
    return extractor.get(files, [p.name for p in files])["pooled"]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino", "auto"])
def test_pooled_features_match_torch_in_each_runtime(files, torch_features, runtime):
    pytest.importorskip(runtime if runtime != "auto" else "onnxruntime")
    extractor = FeatureExtractor(
        get_backbone("efficientnet_lite0"), cache_dir=None, progress=False, runtime=runtime, batch_size=4
    )
    pooled = extractor.get(files, [p.name for p in files])["pooled"]
    assert extractor.choice is not None
    if runtime != "auto":
        assert extractor.choice.session.runtime == runtime and extractor.choice.check.passed
    np.testing.assert_allclose(pooled, torch_features, atol=1e-3)
    cosine = (pooled * torch_features).sum(1) / (
        np.linalg.norm(pooled, axis=1) * np.linalg.norm(torch_features, axis=1)
    )
    assert cosine.min() > 0.9999


def test_an_explicit_runtime_that_is_missing_is_refused_naming_the_setting(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    extractor = FeatureExtractor(
        get_backbone("efficientnet_lite0"), cache_dir=None, progress=False, runtime="onnxruntime"
    )
    with pytest.raises(RuntimeUnavailable, match="TRAINING_RUNTIME=onnxruntime .*not installed"):
        extractor.get(files[:2], [p.name for p in files[:2]])
    monkeypatch.setitem(sys.modules, "openvino", None)
    auto = FeatureExtractor(
        get_backbone("efficientnet_lite0"), cache_dir=None, progress=False, runtime="auto"
    )
    auto.get(files[:2], [p.name for p in files[:2]])
    assert auto.choice.session.runtime == "torch"


@pytest.mark.parametrize("view", ["center", "aug1"])
def test_cut_activations_for_fine_tuning_match_torch_in_the_runtime(files, view):
    """The cached fine-tuning's pass (cut activations + pooled features, augmented views too) from
    the runtime fills the float16 cache with what torch block by block gives, to fp16 rounding."""
    pytest.importorskip("onnxruntime")
    outputs = ("pooled", "cut11")
    keys = [p.name for p in files]
    expected = FeatureExtractor(
        get_backbone("efficientnet_lite0"), cache_dir=None, progress=False, runtime="torch", batch_size=4
    ).get(files, keys, view, outputs)
    extractor = FeatureExtractor(
        get_backbone("efficientnet_lite0"),
        cache_dir=None,
        progress=False,
        runtime="onnxruntime",
        batch_size=4,
    )
    got = extractor.get(files, keys, view, outputs)
    assert extractor.choice.session.runtime == "onnxruntime" and extractor.choice.check.passed
    assert got["cut11"].dtype == np.float16 and got["cut11"].shape == expected["cut11"].shape
    for name in outputs:
        a = expected[name].reshape(len(files), -1).astype(np.float64)
        b = got[name].reshape(len(files), -1).astype(np.float64)
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cosine.min() > 0.9999, name
    np.testing.assert_allclose(got["pooled"], expected["pooled"], atol=1e-3)
