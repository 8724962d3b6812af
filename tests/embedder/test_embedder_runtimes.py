"""Inference runtimes against the torch reference, on real photos and the real pretrained model.

Each runtime that is installed must give torch's outputs within its precision's check bounds on
photos other than the check photos; a runtime that is missing or fails the check is passed over
by ``auto`` (which then serves torch) and refused, naming the setting, when asked for explicitly.
"""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch

from common.artifact import CARD_FILE
from common import runtimes
from common.model import CHECK_PHOTOS_DIR, ONNX_FILE, ONNX_INT8_FILE, ArtifactError, add_runtime_files
from common.runtimes import CHECK_BOUNDS, CheckBounds, compare
from services.embedder.engine import ImageModel
from tests.support.photos import photo_files

pytestmark = pytest.mark.timeout(900)

CHECK, CALIBRATION, HELD_OUT = 8, 24, 6


@pytest.fixture(scope="module")
def files():
    chosen = photo_files(CHECK + CALIBRATION + HELD_OUT)
    if len(chosen) < CHECK + CALIBRATION + HELD_OUT:
        pytest.skip("the shared marketplace photos are not available")
    return chosen


@pytest.fixture(scope="module")
def runtime_artifact(test_artifact, files, tmp_path_factory):
    """The test artefact with its runtime files as training writes them: ONNX and check photos."""
    directory = tmp_path_factory.mktemp("runtime-artifact")
    shutil.copytree(test_artifact, directory, dirs_exist_ok=True)
    add_runtime_files(directory, check_photos=files[:CHECK])
    return directory


@pytest.fixture(scope="module")
def int8_artifact(runtime_artifact, files, tmp_path_factory):
    """Also the int8 model, calibrated on other photos than the check photos (slow: a minute)."""
    directory = tmp_path_factory.mktemp("int8-artifact")
    shutil.copytree(runtime_artifact, directory, dirs_exist_ok=True)
    add_runtime_files(
        directory, check_photos=files[:CHECK], calibration_photos=files[CHECK : CHECK + CALIBRATION]
    )
    return directory


@pytest.fixture(scope="module")
def held_out(files, runtime_artifact) -> torch.Tensor:
    """Real photos that are neither check nor calibration photos, preprocessed."""
    model = ImageModel.load(runtime_artifact, runtime="torch")
    return torch.stack([model.preprocess(p.read_bytes()) for p in files[-HELD_OUT:]])


@pytest.fixture(scope="module")
def torch_outputs(runtime_artifact, held_out):
    return ImageModel.load(runtime_artifact, runtime="torch").forward(held_out)


def _installed(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        return False


def test_the_artefact_records_its_runtime_files(runtime_artifact):
    import json

    card = json.loads((runtime_artifact / CARD_FILE).read_text())
    entry = card["runtimes"]
    assert entry["model_version"] == card["model_version"]
    assert entry["onnx"]["file"] == ONNX_FILE and entry["onnx"]["opset"] == runtimes.ONNX_OPSET
    assert entry["onnx"]["dynamic_batch"] and "torch" in entry["onnx"]["exported_with"]
    assert "int8" not in entry and not (runtime_artifact / ONNX_INT8_FILE).exists()
    assert len(list((runtime_artifact / CHECK_PHOTOS_DIR).iterdir())) == CHECK


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_each_runtime_gives_torchs_outputs_in_fp32(runtime_artifact, held_out, torch_outputs, runtime):
    if not _installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    model = ImageModel.load(runtime_artifact, runtime=runtime, threads=1, workers=2)
    assert (model.runtime, model.precision) == (runtime, "fp32")
    assert model.choice.check.passed and model.choice.check.photos == CHECK
    embeddings, probabilities = model.forward(held_out)
    min_cosine, agreement = compare(torch_outputs, (embeddings, probabilities))
    assert min_cosine >= CHECK_BOUNDS["fp32"].min_cosine and agreement == 1.0
    np.testing.assert_allclose(embeddings, torch_outputs[0], atol=1e-4)
    np.testing.assert_allclose(probabilities, torch_outputs[1], atol=1e-4)
    # dynamic batch size: one photo alone gives the same as in the batch
    alone, _ = model.forward(held_out[:1])
    np.testing.assert_allclose(alone[0], embeddings[0], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_int8_is_served_only_within_its_bounds(int8_artifact, held_out, torch_outputs, runtime):
    if not _installed(runtime):
        pytest.skip(f"{runtime} is not installed")
    import json

    entry = json.loads((int8_artifact / CARD_FILE).read_text())["runtimes"]["int8"]
    assert entry["file"] == ONNX_INT8_FILE and entry["calibration_photos"] == CALIBRATION
    try:
        model = ImageModel.load(int8_artifact, runtime=runtime, precision="int8")
    except ArtifactError as exc:  # refused: then it must really have failed the check
        assert f"EMBEDDER_RUNTIME={runtime} EMBEDDER_PRECISION=int8" in str(exc)
        assert "fails the load-time check" in str(exc)
        return
    assert model.precision == "int8" and model.choice.check.passed
    min_cosine, _ = compare(torch_outputs, model.forward(held_out))
    # held-out photos: the bound holds with a little room (the check saw other photos)
    assert min_cosine >= CHECK_BOUNDS["int8"].min_cosine - 0.02


def test_auto_serves_the_fastest_runtime_that_passes(runtime_artifact, held_out, torch_outputs):
    model = ImageModel.load(runtime_artifact, runtime="auto", threads=1, workers=1)
    speeds = model.choice.speeds  # every candidate that passed was timed, torch included
    if model.runtime != "torch":
        assert model.choice.check.passed and "torch/fp32" in speeds
    if speeds:
        assert speeds[f"{model.runtime}/fp32"] == min(speeds.values())
    else:
        assert model.runtime == "torch" and model.choice.passed_over  # it says why
    min_cosine, agreement = compare(torch_outputs, model.forward(held_out))
    assert min_cosine >= 0.999 and agreement == 1.0


def test_a_runtime_that_is_not_installed_is_passed_over_or_refused(runtime_artifact, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    model = ImageModel.load(runtime_artifact, runtime="auto")
    assert model.runtime == "torch" and model.precision == "fp32"
    reasons = " | ".join(model.choice.passed_over)
    assert "onnxruntime is not installed" in reasons and "openvino is not installed" in reasons
    for runtime in ("onnxruntime", "openvino"):
        with pytest.raises(ArtifactError, match=f"EMBEDDER_RUNTIME={runtime} .*not installed"):
            ImageModel.load(runtime_artifact, runtime=runtime)


def test_a_runtime_failing_the_check_is_passed_over_or_refused(runtime_artifact, monkeypatch):
    # bounds no runtime can reach: every candidate really runs and really falls short
    monkeypatch.setitem(CHECK_BOUNDS, "fp32", CheckBounds(min_cosine=1.5, min_top1_agreement=1.0))
    model = ImageModel.load(runtime_artifact, runtime="auto")
    assert model.runtime == "torch"
    assert any("fails the check" in reason for reason in model.choice.passed_over)
    runtime = "onnxruntime" if _installed("onnxruntime") else "openvino"
    with pytest.raises(
        ArtifactError,
        match=f"refusing EMBEDDER_RUNTIME={runtime} EMBEDDER_PRECISION=fp32: it fails the load-time check",
    ):
        ImageModel.load(runtime_artifact, runtime=runtime)


def test_an_artefact_without_runtime_files(test_artifact, files):
    """Older artefacts: no check photos -> auto serves torch, an explicit runtime is refused;
    with check photos given, the ONNX model is exported at load; int8 needs the artefact's own."""
    assert not (test_artifact / ONNX_FILE).exists()
    model = ImageModel.load(test_artifact, runtime="auto")
    assert model.runtime == "torch" and "no check photos" in model.choice.passed_over[0]
    with pytest.raises(ArtifactError, match="EMBEDDER_RUNTIME=onnxruntime .*check photos"):
        ImageModel.load(test_artifact, runtime="onnxruntime")
    runtime = "onnxruntime" if _installed("onnxruntime") else "openvino"
    exported = ImageModel.load(test_artifact, runtime=runtime, check_photos=files[:4])
    assert exported.runtime == runtime and exported.choice.check.passed
    with pytest.raises(ArtifactError, match="no int8 model .*training.runtimes .*--int8"):
        ImageModel.load(test_artifact, runtime=runtime, precision="int8", check_photos=files[:4])


def test_bf16_is_refused_where_the_runtime_cannot_honour_it(runtime_artifact):
    with pytest.raises(ArtifactError, match="EMBEDDER_PRECISION=bf16.*onnxruntime has no bf16"):
        ImageModel.load(runtime_artifact, runtime="onnxruntime", precision="bf16")
    if _installed("openvino") and "BF16" not in runtimes.openvino_capabilities():
        with pytest.raises(ArtifactError, match="bf16 is not available in runtime openvino"):
            ImageModel.load(runtime_artifact, runtime="openvino", precision="bf16")


def test_the_service_serves_torchs_embeddings_from_the_checked_runtime(
    runtime_artifact, files, torch_outputs
):
    import grpc

    from marketplace.embedder.v1 import embedder_pb2, embedder_pb2_grpc
    from services.embedder.config import EmbedderConfig
    from services.embedder.server import start
    from tests.embedder.helpers import vectors

    config = EmbedderConfig.local(
        artifact_dir=runtime_artifact,
        host="127.0.0.1",
        port=0,
        model_workers=2,
        torch_threads=1,
        decode_threads=2,
        text_model="off",
    )
    server = start(config)
    try:
        assert server.core.model.choice.check is None or server.core.model.choice.check.passed
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = embedder_pb2_grpc.EmbedderStub(channel)
            images = [path.read_bytes() for path in files[-HELD_OUT:]]
            served = vectors(stub.Embed(embedder_pb2.EmbedRequest(images=images), timeout=120))
    finally:
        server.stop(grace=1)
    min_cosine, _ = compare(torch_outputs[:1], (served,))
    assert min_cosine >= CHECK_BOUNDS["fp32"].min_cosine
