"""Shared test fixtures: one real model artefact per test session."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.support.artifacts import make_test_artifact

# Services that tests start as processes serve no /metrics unless a test asks for it: many test
# runs share this machine, and they must not all try the default metrics ports (9450-9452).
for _setting in ("GATEWAY_METRICS_PORT", "EMBEDDER_METRICS_PORT", "INDEXER_METRICS_PORT"):
    os.environ.setdefault(_setting, "0")


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """A service's or command's main() called in-process (e.g. `services.indexer.build.main`)
    sets up the process's logging (`common.logs.setup_logging`: the root logger's handlers and
    level); undo that after the test, so its JSON handler does not log into later tests' output."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="session")
def test_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model artefact directory (pretrained EfficientNet-Lite0, seeded head, 13 categories),
    exported once per session with ``save_artifact`` as training does."""
    return make_test_artifact(tmp_path_factory.mktemp("artifact"))
