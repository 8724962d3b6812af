"""Configuration from env and flags, and refusing to start on a missing or inconsistent artefact
(with a clear message, and without ever unpickling anything)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.config import REPO_ROOT, ConfigError
from common.files import sha256_file
from common.model import CARD_FILE, LABELS_FILE, WEIGHTS_FILE, ArtifactError
from common.serving import MiB
from services.embedder.config import MAX_RECEIVE_CEILING, EmbedderConfig
from services.embedder.server import start

pytestmark = pytest.mark.timeout(120)

ENV_NAMES = (
    "EMBEDDER_ARTIFACT_DIR",
    "EMBEDDER_PORT",
    "EMBEDDER_MAX_BATCH",
    "EMBEDDER_BATCH_SIZE",
    "EMBEDDER_MAX_WAIT_MS",
    "EMBEDDER_TORCH_THREADS",
    "EMBEDDER_MAX_IMAGE_BYTES",
    "EMBEDDER_MAX_PIXELS",
    "EMBEDDER_RUNTIME",
    "EMBEDDER_PRECISION",
    "EMBEDDER_DECODE_THREADS",
    "EMBEDDER_MODEL_WORKERS",
    "EMBEDDER_FOLD_BN",
)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_artifact_dir_is_required_and_the_error_names_the_variable(clean_env):
    with pytest.raises(ConfigError, match="EMBEDDER_ARTIFACT_DIR is required"):
        EmbedderConfig.from_env([])


def test_env_sets_values_and_flags_override_them(clean_env, tmp_path):
    clean_env.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    clean_env.setenv("EMBEDDER_BATCH_SIZE", "4")
    clean_env.setenv("EMBEDDER_MAX_WAIT_MS", "2.5")
    clean_env.setenv("EMBEDDER_MAX_IMAGE_BYTES", str(MiB))
    clean_env.setenv("EMBEDDER_RUNTIME", "OpenVINO")
    clean_env.setenv("EMBEDDER_PRECISION", "bf16")
    config = EmbedderConfig.from_env(["--batch-size", "16", "--torch-threads", "3"])
    assert config.artifact_dir == tmp_path
    assert (config.batch_size, config.max_wait_ms, config.torch_threads) == (16, 2.5, 3)
    assert config.max_image_bytes == MiB
    assert (config.runtime, config.precision) == ("openvino", "bf16")
    overridden = EmbedderConfig.from_env(["--runtime", "torch", "--precision", "int8"])
    assert (overridden.runtime, overridden.precision) == ("torch", "int8")


def test_runtime_defaults_to_auto_in_fp32(clean_env, tmp_path):
    clean_env.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    config = EmbedderConfig.from_env([])
    assert (config.runtime, config.precision) == ("auto", "fp32")


@pytest.mark.parametrize("cores, workers, threads", [(1, 1, 1), (2, 2, 1), (16, 2, 8)])
def test_model_workers_share_the_cores_out_by_default(monkeypatch, tmp_path, cores, workers, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    config = EmbedderConfig(artifact_dir=tmp_path)
    assert (config.resolved_model_workers, config.resolved_torch_threads) == (workers, threads)
    chosen = EmbedderConfig(artifact_dir=tmp_path, model_workers=3, torch_threads=5)
    assert (chosen.resolved_model_workers, chosen.resolved_torch_threads) == (3, 5)


def test_model_workers_and_folding_come_from_env(clean_env, tmp_path):
    clean_env.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    clean_env.setenv("EMBEDDER_MODEL_WORKERS", "3")
    clean_env.setenv("EMBEDDER_FOLD_BN", "off")
    config = EmbedderConfig.from_env([])
    assert (config.model_workers, config.fold_bn) == (3, False)
    assert EmbedderConfig.from_env(["--fold-bn"]).fold_bn is True


@pytest.mark.parametrize(
    "name, value",
    [
        ("EMBEDDER_MAX_BATCH", "0"),
        ("EMBEDDER_PORT", "x"),
        ("EMBEDDER_RUNTIME", "tensorflow"),
        ("EMBEDDER_PRECISION", "fp16"),
    ],
)
def test_malformed_settings_fail_fast_naming_the_variable(clean_env, tmp_path, name, value):
    clean_env.setenv("EMBEDDER_ARTIFACT_DIR", str(tmp_path))
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        EmbedderConfig.from_env([])


def test_receive_limit_fits_a_full_request_and_is_bounded(tmp_path):
    small = EmbedderConfig(artifact_dir=tmp_path, max_batch=4, max_image_bytes=MiB)
    assert 4 * MiB < small.server_limits().max_receive_bytes < 5 * MiB
    huge = EmbedderConfig(artifact_dir=tmp_path, max_batch=1000, max_image_bytes=100 * MiB)
    assert huge.server_limits().max_receive_bytes == MAX_RECEIVE_CEILING


# ---------------------------------------------------------------- broken artefacts


def copy_artifact(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in (CARD_FILE, LABELS_FILE):
        shutil.copy(source / name, target / name)
    (target / WEIGHTS_FILE).symlink_to(source / WEIGHTS_FILE)
    return target


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def refuses(config: EmbedderConfig, *words: str) -> None:
    with pytest.raises(ArtifactError) as raised:
        start(config).stop(0)
    for word in words:
        assert word in str(raised.value)


def config_for(directory: Path) -> EmbedderConfig:
    return EmbedderConfig.local(artifact_dir=directory, host="127.0.0.1", port=0, torch_threads=1)


def test_refuses_a_missing_directory(tmp_path):
    refuses(config_for(tmp_path / "nowhere"), "does not exist")


def test_refuses_missing_files(test_artifact, tmp_path):
    broken = copy_artifact(test_artifact, tmp_path / "a")
    (broken / WEIGHTS_FILE).unlink()
    refuses(config_for(broken), "missing", WEIGHTS_FILE)
    (broken / CARD_FILE).unlink()
    refuses(config_for(broken), "missing", CARD_FILE)


def test_refuses_labels_that_disagree_with_the_card(test_artifact, tmp_path):
    broken = copy_artifact(test_artifact, tmp_path / "a")
    edit_json(broken / LABELS_FILE, categories=["only", "two"])
    refuses(config_for(broken), "disagree")


def test_refuses_a_card_inconsistent_with_the_backbone(test_artifact, tmp_path):
    broken = copy_artifact(test_artifact, tmp_path / "a")
    edit_json(broken / CARD_FILE, embedding_dim=512)
    refuses(config_for(broken), "embedding_dim")


class _Booby:
    """Unpickling this would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_never_unpickles_a_pickled_weights_file(test_artifact, tmp_path):
    broken = copy_artifact(test_artifact, tmp_path / "a")
    marker = tmp_path / "unpickled"
    (broken / WEIGHTS_FILE).unlink()
    torch.save({"payload": _Booby(marker)}, broken / WEIGHTS_FILE)
    edit_json(broken / CARD_FILE, weights_sha256=sha256_file(broken / WEIGHTS_FILE))
    refuses(config_for(broken), "cannot load")
    assert not marker.exists()


@pytest.mark.slow
def test_the_process_exits_with_a_clear_message_when_the_artifact_is_missing(tmp_path):
    missing = tmp_path / "no-model-here"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "EMBEDDER_ARTIFACT_DIR": str(missing)}
    result = subprocess.run(
        [sys.executable, "-m", "services.embedder", "--port", "0"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "cannot start" in result.stderr and str(missing) in result.stderr
