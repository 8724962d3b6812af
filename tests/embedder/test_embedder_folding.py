"""Folding batch norms into convolutions: same outputs, fewer layers, and a check that refuses a
model the folding got wrong."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common import model as common_model
from common.model import ArtifactError, fold_batch_norms, load_artifact
from services.embedder.engine import ImageModel


def _random_bn(channels: int, seed: int) -> nn.BatchNorm2d:
    generator = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    bn.running_mean.copy_(torch.randn(channels, generator=generator))
    bn.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    bn.weight.data.copy_(torch.randn(channels, generator=generator))
    bn.bias.data.copy_(torch.randn(channels, generator=generator))
    return bn.eval()


def test_folding_a_conv_bn_relu_stack_keeps_its_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        _random_bn(8, 1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(8, 4, 1, bias=False), _random_bn(4, 2)),
    ).eval()
    inputs = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        before = model(inputs)
        assert fold_batch_norms(model) == 2
        after = model(inputs)
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in model.modules())
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_a_batch_norm_without_a_conv_before_it_is_left_alone():
    model = nn.Sequential(nn.ReLU(), _random_bn(3, 3)).eval()
    assert fold_batch_norms(model) == 0
    assert isinstance(model[1], nn.BatchNorm2d)


def test_the_served_model_is_folded_and_embeds_as_the_unfolded_one(test_artifact, photos):
    batch_norms = sum(
        isinstance(layer, nn.BatchNorm2d) for layer in load_artifact(test_artifact).model.modules()
    )
    folded = ImageModel.load(test_artifact)
    plain = ImageModel.load(test_artifact, fold_bn=False)
    assert folded.folded_batch_norms == batch_norms > 40  # EfficientNet-Lite0 has 49
    assert plain.folded_batch_norms == 0
    assert not any(isinstance(layer, nn.BatchNorm2d) for layer in folded._model.modules())
    inputs = torch.stack([folded.preprocess(data) for data in photos])
    e_folded, p_folded = folded.forward(inputs)
    e_plain, p_plain = plain.forward(inputs)
    assert np.min(np.sum(e_folded * e_plain, axis=1)) > 0.99999
    np.testing.assert_allclose(p_folded, p_plain, atol=1e-5)


def test_a_fold_that_changes_the_outputs_refuses_to_serve(test_artifact, monkeypatch):
    def wrong_fold(module: nn.Module) -> int:  # stands in for a layout folded the wrong way
        count = fold_batch_norms(module)  # (its recursion calls wrong_fold too)
        if isinstance(module, nn.Conv2d):
            module.weight.data.mul_(3.0)
        return count

    monkeypatch.setattr(common_model, "fold_batch_norms", wrong_fold)
    with pytest.raises(ArtifactError, match="EMBEDDER_FOLD_BN=off"):
        ImageModel.load(test_artifact)
    assert ImageModel.load(test_artifact, fold_bn=False).folded_batch_norms == 0
