"""common.fusion_weights: the artefact's fusion weights file, written and read back, and refused
when it was chosen for another image model (with the command that chooses them again)."""

from __future__ import annotations

import json

import pytest

from common.fusion_weights import FusionWeights, FusionWeightsError, FusionWeightsMissing
from common.artifact import CARD_FILE, FUSION_WEIGHTS_FILE


def weights(**changes) -> FusionWeights:
    fields = dict(
        search_text_weight=0.7,
        similar_text_weight=0.8,
        image_model_version="lite0-aaa",
        text_model="all-MiniLM-L6-v2",
        valid_curves={"search": {"0.0": 0.4}},
        valid_queries=3,
    )
    return FusionWeights(**(fields | changes))


def test_written_weights_read_back_for_their_image_model(tmp_path):
    path = weights().save(tmp_path)
    assert path == tmp_path / FUSION_WEIGHTS_FILE
    assert json.loads(path.read_text())["format_version"] == 1
    assert FusionWeights.load(tmp_path, image_model_version="lite0-aaa") == weights()
    # the version defaults to the model card beside the file
    (tmp_path / CARD_FILE).write_text(json.dumps({"model_version": "lite0-aaa"}))
    assert FusionWeights.load(tmp_path).similar_text_weight == 0.8


def test_weights_chosen_for_another_image_model_are_refused_with_the_command(tmp_path):
    weights().save(tmp_path)
    (tmp_path / CARD_FILE).write_text(json.dumps({"model_version": "lite0-bbb"}))
    for load in (
        lambda: FusionWeights.load(tmp_path),
        lambda: FusionWeights.load(tmp_path, image_model_version="lite0-bbb"),
    ):
        with pytest.raises(FusionWeightsError) as raised:
            load()
        message = str(raised.value)
        assert "chosen for image model lite0-aaa" in message and "now lite0-bbb" in message
        assert f"python -m training.fusion_weights --data build/data --artifact {tmp_path}" in message


def test_missing_malformed_or_out_of_range_files_are_refused(tmp_path):
    with pytest.raises(
        FusionWeightsMissing,
        match="is missing; choose the fusion weights with `python -m training.fusion_weights",
    ):
        FusionWeights.load(tmp_path)
    path = tmp_path / FUSION_WEIGHTS_FILE
    path.write_text("{not json")
    with pytest.raises(FusionWeightsError, match="cannot read"):
        FusionWeights.load(tmp_path)
    path.write_text(json.dumps({"format_version": 9}))
    with pytest.raises(FusionWeightsError, match="format_version 9"):
        FusionWeights.load(tmp_path)
    path.write_text(json.dumps({"format_version": 1, "search_text_weight": 0.5}))
    with pytest.raises(FusionWeightsError, match="incomplete"):
        FusionWeights.load(tmp_path)
    for bad in (1.5, -0.1, float("nan"), "0.5"):
        with pytest.raises(FusionWeightsError, match="search_text_weight must be a number in"):
            weights(search_text_weight=bad)
    with pytest.raises(FusionWeightsError, match="image_model_version is empty"):
        weights(image_model_version="")
