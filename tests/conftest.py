"""Shared test fixtures: one real model artefact per test session."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.artifacts import make_test_artifact


@pytest.fixture(scope="session")
def test_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model artefact directory (pretrained EfficientNet-Lite0, seeded head, 13 categories),
    exported once per session with ``save_artifact`` as training does."""
    return make_test_artifact(tmp_path_factory.mktemp("artifact"))
