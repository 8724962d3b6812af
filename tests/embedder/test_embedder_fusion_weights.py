"""The embedder reports its artefact's fusion weights (the gateway's defaults) in GetModelInfo,
and refuses a file chosen for another image model: not served, the reason (with the command that
chooses them again) in ``fusion_weights_problem``. Real servers on ephemeral ports."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest

from common.artifact import CARD_FILE
from common.fusion_weights import FusionWeights
from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
from services.embedder.server import start


def model_info(config) -> embedder_pb2.ModelInfo:
    server = start(config)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            return embedder_pb2_grpc.EmbedderStub(channel).GetModelInfo(
                embedder_pb2.GetModelInfoRequest(), timeout=30
            )
    finally:
        server.stop(grace=0)


@pytest.fixture
def artefact(tmp_path, test_artifact):
    directory = tmp_path / "artefact"
    shutil.copytree(test_artifact, directory)
    return directory


def test_an_artefact_without_fusion_weights_serves_none_and_says_why(stub):
    info = stub.GetModelInfo(embedder_pb2.GetModelInfoRequest(), timeout=30)
    assert not info.HasField("fusion_weights")
    assert "fusion_weights.json is missing" in info.fusion_weights_problem
    assert "python -m training.fusion_weights" in info.fusion_weights_problem


def test_fusion_weights_for_the_served_model_are_reported(artefact, embedder_config):
    from dataclasses import replace

    version = json.loads((artefact / CARD_FILE).read_text())["model_version"]
    FusionWeights(search_text_weight=0.6, similar_text_weight=0.9, image_model_version=version).save(artefact)
    info = model_info(replace(embedder_config, artifact_dir=artefact))
    assert info.HasField("fusion_weights") and info.fusion_weights_problem == ""
    assert info.fusion_weights.search_text_weight == pytest.approx(0.6)
    assert info.fusion_weights.similar_text_weight == pytest.approx(0.9)
    assert info.fusion_weights.chosen_on == "valid"
    assert info.fusion_weights.source == f"fusion_weights.json of {version}"


def test_stale_fusion_weights_are_refused_with_the_command_to_run(artefact, embedder_config, caplog):
    from dataclasses import replace

    FusionWeights(
        search_text_weight=0.6, similar_text_weight=0.9, image_model_version="efficientnet_lite0-0123456789ab"
    ).save(artefact)
    with caplog.at_level("WARNING", logger="services.embedder"):
        info = model_info(replace(embedder_config, artifact_dir=artefact))
    assert not info.HasField("fusion_weights")
    problem = info.fusion_weights_problem
    assert "chosen for image model efficientnet_lite0-0123456789ab" in problem
    assert f"now {info.model_version}" in problem
    assert f"python -m training.fusion_weights --data build/data --artifact {artefact}" in problem
    assert any("fusion weights refused" in r.getMessage() for r in caplog.records)
