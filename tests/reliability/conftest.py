"""Reliability fixtures: one real stack (subprocesses on loopback) per test module that asks for
it, and a terminal-summary section that prints the suite's figures at the end of every run."""

from __future__ import annotations

import pytest

from tests.reliability.suite import FIGURES, Stack


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for line in FIGURES:
        terminalreporter.write_line(line)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, test_artifact):
    """Embedder (test artefact), two indexer shards and the gateway as subprocesses on fixed
    ephemeral loopback ports, debug logs, a write token, eight seeded listings. The embedder's
    text model is off here (it costs several seconds at each embedder start, and the fault test
    restarts it); ``python -m benchmarks.reliability`` runs with it on."""
    root = tmp_path_factory.mktemp("reliability")
    running = Stack.start(root, test_artifact, shards=2, bootstrap_listings=8, photos=16, text_model="off")
    try:
        yield running
    finally:
        codes = running.close()
    assert codes == {key: 0 for key in codes}, f"unclean shutdown on SIGTERM: {codes}"
