"""services.gateway.fusion_defaults: the default text weights of hybrid Search and SimilarListings
(a setting, else the embedder's artefact, else the built-in default), and what the log says."""

from __future__ import annotations

import logging

import pytest

from services.gateway.domain import ModelInfo, ServedFusionWeights, Unavailable
from services.gateway.fusion_defaults import FusionDefaults


class ModelInfoSource:
    """What EmbedderClient.model_info returns, switchable between answers and outages."""

    def __init__(self, info: ModelInfo) -> None:
        self.info, self.down = info, False

    def __call__(self, deadline) -> ModelInfo:
        if self.down:
            raise Unavailable("embedder 127.0.0.1:1 is unavailable")
        return self.info


def info(weights: ServedFusionWeights | None, problem: str = "") -> ModelInfo:
    return ModelInfo(
        categories=("A",),
        embedding_dim=4,
        model_version="lite0-x",
        fusion_weights=weights,
        fusion_weights_problem=problem,
    )


SERVED = ServedFusionWeights(0.7, 0.8, "valid", "fusion_weights.json of lite0-x")


def test_the_artefacts_weights_unless_a_setting_overrides(caplog):
    source = ModelInfoSource(info(SERVED))
    defaults = FusionDefaults(source)
    with caplog.at_level(logging.INFO, logger="services.gateway.fusion_defaults"):
        assert defaults.search_text_weight(None) == 0.7
        assert defaults.similar_text_weight(None) == 0.8
        assert defaults.search_text_weight(None) == 0.7  # logged once, not per request
    assert [r.getMessage() for r in caplog.records] == [
        "hybrid Search text weight 0.70, from the embedder's artefact (fusion_weights.json of lite0-x, "
        "chosen on the valid split)",
        "SimilarListings text weight 0.80, from the embedder's artefact (fusion_weights.json of "
        "lite0-x, chosen on the valid split)",
    ]
    overridden = FusionDefaults(source, search_override=0.2, similar_override=0.0)
    assert (overridden.search_text_weight(None), overridden.similar_text_weight(None)) == (0.2, 0.0)
    assert "from GATEWAY_SEARCH_TEXT_WEIGHT" in overridden.describe_settings()
    assert "SimilarListings text weight 0 from GATEWAY_SIMILAR_TEXT_WEIGHT" in overridden.describe_settings()
    assert "from the embedder's artefact" in defaults.describe_settings()


def test_built_in_defaults_when_the_embedder_serves_none_and_why(caplog):
    defaults = FusionDefaults(ModelInfoSource(info(None, "fusion_weights.json was chosen for image model y")))
    with caplog.at_level(logging.INFO, logger="services.gateway.fusion_defaults"):
        assert (defaults.search_text_weight(None), defaults.similar_text_weight(None)) == (0.5, 0.7)
    assert "chosen for image model y" in caplog.records[0].getMessage()
    assert (
        caplog.records[0].getMessage().startswith("hybrid Search text weight 0.50, from the built-in default")
    )


def test_an_unreachable_embedder_keeps_the_last_weight_and_a_new_artefact_brings_its_own(caplog, monkeypatch):
    from services.gateway import fusion_defaults

    source = ModelInfoSource(info(SERVED))
    defaults = FusionDefaults(source)
    assert defaults.similar_text_weight(None) == 0.8
    source.down = True
    assert defaults.similar_text_weight(None) == 0.8
    assert defaults.search_text_weight(None) == 0.5  # never resolved: the built-in default
    source.down = False
    source.info = info(ServedFusionWeights(0.1, 0.1, "valid", "fusion_weights.json of lite0-y"))
    assert defaults.similar_text_weight(None) == 0.8  # not asked again right after a failure
    monkeypatch.setattr(fusion_defaults, "RETRY_AFTER_S", 0.0)
    source.info = info(ServedFusionWeights(0.4, 0.3, "valid", "fusion_weights.json of lite0-z"))
    with caplog.at_level(logging.INFO, logger="services.gateway.fusion_defaults"):
        assert defaults.similar_text_weight(None) == 0.3
    assert "lite0-z" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("weight", [None, 0.0, 1.0])
def test_overrides_are_mutable_for_a_running_core(weight):
    defaults = FusionDefaults(ModelInfoSource(info(SERVED)))
    defaults.overrides["similar"] = weight
    assert defaults.similar_text_weight(None) == (0.8 if weight is None else weight)
