"""Shared test fixtures: one real model artefact per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.artifacts import make_test_artifact

# Services that tests start as processes serve no /metrics unless a test asks for it: many test
# runs share this machine, and they must not all try the default metrics ports (9450-9452).
for _setting in ("GATEWAY_METRICS_PORT", "EMBEDDER_METRICS_PORT", "INDEXER_METRICS_PORT"):
    os.environ.setdefault(_setting, "0")


@pytest.fixture(scope="session")
def test_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model artefact directory (pretrained EfficientNet-Lite0, seeded head, 13 categories),
    exported once per session with ``save_artifact`` as training does."""
    return make_test_artifact(tmp_path_factory.mktemp("artifact"))
